"""The single page of ``vop serve``: a search box, a prompt-set selector, frame strips, a video player.

Plain HTML, CSS and JavaScript (no framework, nothing fetched from elsewhere). Every value from the
server is inserted with ``textContent`` / attributes, never as HTML.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vop search</title>
<style>
  :root { --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --accent: #2e5bff; --bg: #f7f8fa; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
  header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid var(--line); padding: 12px 20px; z-index: 2; }
  form { display: flex; gap: 8px; flex-wrap: wrap; align-items: center; }
  h1 { font-size: 17px; margin: 0 12px 0 0; }
  #q { flex: 1 1 320px; font-size: 16px; padding: 8px 10px; border: 1px solid #c9ced6; border-radius: 6px; }
  select, button { font-size: 14px; padding: 7px 8px; border: 1px solid #c9ced6; border-radius: 6px; background: #fff; }
  button { background: var(--accent); color: #fff; border-color: var(--accent); cursor: pointer; }
  #status { color: var(--muted); font-size: 13px; margin-top: 6px; min-height: 18px; }
  #status.error { color: #b42318; }
  main { display: flex; gap: 20px; padding: 16px 20px; align-items: flex-start; }
  #results { flex: 1; display: flex; flex-direction: column; gap: 10px; min-width: 0; }
  .result { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; cursor: pointer; }
  .result:hover, .result.playing { border-color: var(--accent); }
  .meta { display: flex; gap: 12px; align-items: baseline; margin-bottom: 6px; font-size: 14px; }
  .rank { font-weight: 600; min-width: 2.2em; }
  .score { font-variant-numeric: tabular-nums; color: var(--accent); min-width: 4.5em; }
  .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; flex: 1; }
  .dur { color: var(--muted); }
  .strip { display: block; height: 96px; max-width: 100%; object-fit: contain; object-position: left; border-radius: 4px; background: #000; }
  .captions { color: var(--muted); font-size: 13px; margin-top: 4px; }
  #player { position: sticky; top: 90px; width: min(44vw, 560px); background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px; }
  #player video { width: 100%; background: #000; border-radius: 4px; }
  #player .bar { display: flex; justify-content: space-between; align-items: center; gap: 8px; font-size: 13px; }
  #close { background: #fff; color: var(--fg); border-color: #c9ced6; padding: 3px 8px; }
  .empty { color: var(--muted); padding: 20px 0; }
</style>
</head>
<body>
<header>
  <form id="form" autocomplete="off">
    <h1>vop search</h1>
    <input id="q" name="q" type="search" maxlength="1000" placeholder="describe what happens, e.g. a red circle moves left" autofocus>
    <label for="index" hidden>prompt set</label>
    <select id="index" name="index" title="prompt set (index)"></select>
    <select id="k" name="k" title="results"><option>5</option><option selected>10</option><option>20</option><option>50</option></select>
    <button id="go" type="submit">Search</button>
  </form>
  <div id="status" role="status"></div>
</header>
<main>
  <section id="results" aria-live="polite"></section>
  <aside id="player" hidden>
    <div class="bar"><span id="playing"></span><button id="close" type="button">close</button></div>
    <video id="video" controls preload="metadata"></video>
  </aside>
</main>
<script>
"use strict";
const $ = (s) => document.querySelector(s);
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; };
let seq = 0;

function status(msg, error) { const s = $("#status"); s.textContent = msg; s.classList.toggle("error", !!error); }

async function loadIndexes() {
  const r = await fetch("/api/indexes");
  const j = await r.json();
  const sel = $("#index");
  for (const ix of j.indexes) {
    const o = el("option", null, `${ix.name} · ${ix.method} · ${ix.videos} videos`);
    o.value = ix.name;
    sel.append(o);
  }
  sel.hidden = j.indexes.length < 2;
  const p = new URLSearchParams(location.search);
  if (p.get("index")) sel.value = p.get("index");
  if (p.get("k")) $("#k").value = p.get("k");
  if (p.get("q")) { $("#q").value = p.get("q"); search(); }
  else status(`${j.indexes.length} index${j.indexes.length > 1 ? "es" : ""} loaded`);
}

function card(r, index) {
  const c = el("div", "result");
  c.dataset.row = r.row;
  const m = el("div", "meta");
  m.append(el("span", "rank", `#${r.rank}`), el("span", "score", r.score.toFixed(4)), el("span", "name", r.id));
  if (r.duration != null) m.append(el("span", "dur", `${r.duration.toFixed(1)} s`));
  const img = el("img", "strip");
  img.src = r.thumb; img.alt = `frames of ${r.id}`; img.loading = "lazy";
  c.append(m, img);
  if (r.captions && r.captions.length) c.append(el("div", "captions", r.captions.slice(0, 3).join(" · ")));
  c.addEventListener("click", () => play(r, c));
  return c;
}

function play(r, c) {
  document.querySelectorAll(".result.playing").forEach((x) => x.classList.remove("playing"));
  c.classList.add("playing");
  $("#player").hidden = false;
  $("#playing").textContent = r.id;
  const v = $("#video");
  v.src = r.video;
  v.play().catch(() => {});
}

async function search() {
  const q = $("#q").value.trim();
  if (!q) { status("type a query first", true); return; }
  const params = new URLSearchParams({ q, k: $("#k").value, index: $("#index").value });
  history.replaceState(null, "", "?" + params.toString());
  const mine = ++seq;
  status("searching…");
  let r, j;
  try { r = await fetch("/api/search?" + params.toString()); j = await r.json(); }
  catch (e) { status("the server did not answer", true); return; }
  if (mine !== seq) return;  // a newer search is under way
  const res = $("#results");
  if (!r.ok) { res.replaceChildren(); status(j.error || `error ${r.status}`, true); return; }
  res.dataset.index = j.index;
  res.dataset.query = j.query;
  res.replaceChildren(...j.results.map((x) => card(x, j.index)));
  if (!j.results.length) res.append(el("div", "empty", "no video in this index"));
  status(`top ${j.results.length} of ${j.total} videos · ${j.index} (${j.method}, ${j.search}) · ${j.took_ms.toFixed(1)} ms`);
}

$("#form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
$("#index").addEventListener("change", () => { if ($("#q").value.trim()) search(); });
$("#k").addEventListener("change", () => { if ($("#q").value.trim()) search(); });
$("#close").addEventListener("click", () => { const v = $("#video"); v.pause(); v.removeAttribute("src"); v.load(); $("#player").hidden = true; });
loadIndexes().catch(() => status("could not load the index list", true));
</script>
</body>
</html>
"""
