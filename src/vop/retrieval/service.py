"""The search service behind ``vop serve``: several indexes (prompt sets), one backbone, checked requests.

Independent of the web framework (``vop.retrieval.web`` wraps it in FastAPI), so it can be tested and
embedded directly::

    svc = SearchService.load(["runs/a/index", "fc=runs/b/index"])
    svc.search("a red circle moves left", k=5, index="fc")

Request checks raise :class:`RequestError` (status 400) / :class:`NotFoundError` (404) with a message
for the user: empty or over-long queries, bad ``k``, unknown index, unknown video row.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from vop.errors import ConfigError, VopError
from vop.retrieval.topk import check_k
from vop.retrieval.search import BackbonePool, QueryCache, Searcher

__all__ = ["SearchService", "RequestError", "NotFoundError", "MAX_QUERY_CHARS", "MAX_K", "parse_index_spec"]

MAX_QUERY_CHARS = 1000
MAX_K = 100
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ROW = re.compile(r"[0-9]{1,12}")
_K = re.compile(r"[+-]?[0-9]{1,12}")


class RequestError(VopError):
    status = 400


class NotFoundError(RequestError):
    status = 404


def parse_index_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` or ``PATH`` (the name is then the folder's name)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        if _NAME.match(name) and not Path(spec).exists():
            return name, path
    return None, spec


def _slug(path: str) -> str:
    p = Path(path).resolve()
    base = p.name if p.name not in ("", "index") else f"{p.parent.name}-{p.name}"
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "index"
    return s[:64]


@dataclass
class Loaded:
    name: str
    searcher: Searcher

    @property
    def index(self):
        return self.searcher.index

    def describe(self) -> dict[str, Any]:
        info = self.index.model_info
        return {"name": self.name, "videos": len(self.index), "method": info["method"],
                "checkpoint": Path(info["checkpoint"]).name, "backbone": info.get("backbone"),
                "shared_backbone": self.searcher.shared, "dim": self.index.dim,
                "search": self.index.search_kind, "store": self.index.store_kind, **self.index.scoring.describe()}


class SearchService:
    def __init__(self, indexes: Sequence[Loaded], pool: BackbonePool | None = None, cache_size: int = 1024):
        if not indexes:
            raise ConfigError("no index to serve")
        self.indexes: dict[str, Loaded] = {}
        for ld in indexes:
            if ld.name in self.indexes:
                raise ConfigError(f"two indexes are named {ld.name!r}: name them with NAME=PATH")
            self.indexes[ld.name] = ld
        self.default = next(iter(self.indexes))
        self.pool = pool
        self._lock = threading.Lock()  # one model call at a time: the CPU threads go to that call
        # encoded queries, keyed by the model's fingerprint and the exact query (prompt sets of one model share them)
        self.cache = QueryCache(cache_size)
        for ld in self.indexes.values():
            ld.searcher.cache = self.cache

    @classmethod
    def load(cls, specs: Sequence[str], *, backbone: str | None = None, device: str = "cpu",
             cache_size: int = 1024, verify: bool = True, text_int8: bool = False) -> "SearchService":
        """Load indexes (``PATH`` or ``NAME=PATH``); prompt sets on the same backbone share it.
        ``verify=False``: skip the checksums (see :meth:`Searcher.open`); ``text_int8``: quantise the text tower
        (:func:`~vop.retrieval.search.quantize_text_tower`); ``cache_size``: encoded queries kept (LRU)."""
        pool = BackbonePool(device)
        loaded, names = [], set()
        for spec in specs:
            name, path = parse_index_spec(spec)
            if name is None:
                name, base, i = _slug(path), _slug(path), 2
                while name in names:
                    name, i = f"{base}-{i}", i + 1
            searcher = Searcher.open(path, backbone=backbone, pool=pool, verify=verify, text_int8=text_int8)
            names.add(name)
            loaded.append(Loaded(name, searcher))
        return cls(loaded, pool, cache_size)

    # -- requests ---------------------------------------------------------------------------------
    def get(self, name: str | None) -> Loaded:
        if name in (None, ""):
            return self.indexes[self.default]
        ld = self.indexes.get(name)
        if ld is None:
            raise NotFoundError(f"unknown index {name!r}; loaded: {', '.join(self.indexes)}")
        return ld

    @staticmethod
    def check_query(q: str | None) -> str:
        if q is None or not q.strip():
            raise RequestError("empty query: type a description of the video you are looking for")
        if len(q) > MAX_QUERY_CHARS:
            raise RequestError(f"query too long ({len(q)} characters; at most {MAX_QUERY_CHARS})")
        if any(ord(c) < 32 and c not in "\t\n\r" for c in q):
            raise RequestError("query holds control characters")
        return q.strip()

    @staticmethod
    def check_k(k: Any) -> int:
        """An integer 1..MAX_K (a request parameter: ASCII digits), as every entry point checks k (>= 1;
        more than the index holds gives every video), with the service's upper bound."""
        if isinstance(k, str):
            k = k.strip()
            if not _K.fullmatch(k):
                raise RequestError(f"k must be an integer between 1 and {MAX_K}, got {k[:24]!r}")
            k = int(k)
        try:
            k = check_k(k)
        except ConfigError:
            raise RequestError(f"k must be an integer between 1 and {MAX_K}, got {k!r}") from None
        if k > MAX_K:
            raise RequestError(f"k must be between 1 and {MAX_K}, got {k}")
        return k

    def _embed(self, ld: Loaded, q: str) -> torch.Tensor:
        with self._lock:
            return ld.searcher.encode([q])  # (the searcher's QueryCache: a repeated query skips the text tower)

    def search(self, q: str | None, k: Any = 10, index: str | None = None, exact: bool | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        ld = self.get(index)
        q = self.check_query(q)
        k = self.check_k(k)
        emb = self._embed(ld, q)
        with self._lock:
            scores, rows = ld.searcher.rank(emb, k, exact=exact)
        results = []
        for rank, (s, r) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), 1):
            if r < 0:
                continue
            e = ld.index.entries[r]
            item = {"rank": rank, "row": int(r), "id": e["id"], "score": round(float(s), 6), "duration": e.get("duration"),
                    "thumb": f"/thumb/{ld.name}/{r}", "video": f"/video/{ld.name}/{r}"}
            if e.get("captions"):
                item["captions"] = e["captions"]
            results.append(item)
        return {"query": q, "index": ld.name, "method": ld.index.model_info["method"], "k": k, "total": len(ld.index),
                "search": ld.index.search_mode(exact),
                **({"candidates": c} if (c := ld.index.candidates_for(None, exact)) is not None else {}),
                "took_ms": round(1000 * (time.perf_counter() - t0), 3), "results": results}

    def describe(self) -> dict[str, Any]:
        return {"default": self.default, "indexes": [ld.describe() for ld in self.indexes.values()],
                "max_query_chars": MAX_QUERY_CHARS, "max_k": MAX_K}

    # -- files: only those an index refers to ---------------------------------------------------
    def _entry(self, name: str, row: str) -> tuple[Loaded, dict]:
        ld = self.get(name)
        # ASCII digits only: str.isdigit() also accepts '²' or '٣', which int() refuses or reads otherwise
        if not _ROW.fullmatch(row) or int(row) >= len(ld.index):
            raise NotFoundError(f"index {name!r} has no video {row[:24]!r}")
        return ld, ld.index.entries[int(row)]

    def thumb_file(self, name: str, row: str) -> Path:
        ld, e = self._entry(name, row)
        thumbs = (ld.index.path / "thumbs").resolve()
        p = (thumbs / str(e.get("thumb", ""))).resolve()
        if p.parent != thumbs or not p.is_file():
            raise NotFoundError(f"no thumbnail for video {row} of index {name!r}")
        return p

    def video_file(self, name: str, row: str) -> Path:
        """The video file of a row, only if it is the file that was indexed: a video extension, and the size
        and modification time (to the nanosecond) the index recorded for it. An index folder is data anyone
        may hand over: without this, one whose rows name other files (``/etc/passwd``, a key file) would make
        the service send them."""
        from vop.data.files import is_video_name

        _, e = self._entry(name, row)
        p = Path(e["path"])
        if not is_video_name(p.name):
            raise NotFoundError(f"{e['id']}: the index names {p.name!r}, which is not a video file: not served")
        try:
            st = p.stat()
        except OSError:
            raise NotFoundError(f"{e['id']}: the video file is no longer at {p}") from None
        if not p.is_file():
            raise NotFoundError(f"{e['id']}: the video file is no longer at {p}")
        if (st.st_size, st.st_mtime_ns) != (e.get("size"), e.get("mtime_ns")):
            raise NotFoundError(f"{e['id']}: {p} changed since it was indexed (size or modification time): not served; "
                                f"re-run its `vop index` command to index it again")
        return p

    def models(self) -> list[Any]:
        return [ld.searcher.model for ld in self.indexes.values()]
