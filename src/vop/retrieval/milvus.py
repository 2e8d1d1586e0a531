"""The Milvus store (optional extra ``vop[milvus]`` = ``pymilvus`` + ``milvus-lite``): an index's vectors in a
Milvus collection, one collection per index (prompt set), several of them in one Milvus Lite file or server.

Where: a Milvus Lite file for one machine (``milvus:///PATH/x.db[/COLLECTION]``: an embedded database that one
process at a time opens) or a Milvus server, standalone or a cluster (``milvus://HOST[:PORT][/COLLECTION]``,
port 19530 by default; a token, ``user:password`` or an API key, from the environment variable
``VOP_MILVUS_TOKEN``, never recorded). The same code talks to both (pymilvus's ``MilvusClient``).

**What the collection keeps**, one entity per video:

===========  ==================  =============================================================================
field        type                value
===========  ==================  =============================================================================
``pk``       INT64, primary key  the first 63 bits of SHA-256(video id): a key that needs no escaping in
                                 Milvus's filter expressions (collisions are checked when writing)
``video_id`` VARCHAR             the video's id (its path relative to the indexed folder, or the collection's
                                 ``video`` value), as in ``videos-G.jsonl``
``vector``   FLOAT_VECTOR (D)    the L2-normalised embedding; metric inner product (= cosine)
``path``     VARCHAR             the video file's absolute path
``size``     INT64               its size in bytes
``mtime_ns`` INT64               its modification time (ns)
``duration`` DOUBLE              seconds (-1 when unknown)
===========  ==================  =============================================================================

and, in the collection's properties, ``vop.index``: JSON with the index's UUID, generation, dimension, kind of
scores, checkpoint SHA-256, the folder it belongs to and the vector index (type and parameters). Its vector
index is ``FLAT`` (exact), ``IVF_FLAT``, ``IVF_PQ`` or ``HNSW``, as chosen by ``--ann``
(:class:`~vop.retrieval.store.AnnChoice`).

**What stays in the index folder**: ``index.json`` (format ``vop-index/2``: the model's provenance and the store
record: URI, collection, UUID, dimension, vector index), ``videos-G.jsonl`` (every video's metadata: a result's
row is its line; checksummed) and the thumbnails. Search results are therefore the same dicts as with the
faiss store, and the model files and thumbnails are checked and served from local disk as before.

**Writing** (``vop index``; rank 0 only under torchrun: the other ranks encode into ``parts/``): new and
changed videos are upserted, removed ones deleted, the collection flushed, the vector index rebuilt only when
its kind or parameters change; then the collection's marker gets the new generation, then ``index.json`` does. A run interrupted in
between leaves the collection a generation ahead: opening the index says so, and running ``vop index`` again
finishes the update (its encoded parts are kept until then). Updates are not atomic for a reader searching
the same collection on a server meanwhile (a video may briefly show its new vector with its old metadata; a
new video's rows are skipped until the reader reopens the index).

**Opening** (``vop search``, ``vop serve``, ``VideoIndex.open``): the collection must exist with the schema
above, the marker's UUID and generation must be index.json's, its row count (strongly consistent) the
index's count; with ``verify`` (the default) every key of the video list is looked up in it too (with equal counts:
the same keys).

A scoring without one vector per video (cma's query score: per-frame rows) is refused: this store holds one
vector per video; its index stays in the folder (the faiss store), searched exactly.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vop.errors import ConfigError, DataError
from vop.retrieval.store import MILVUS_PORT, ResolvedAnn, SearchParams, StoreSpec, VectorStore

__all__ = ["MilvusStore", "require_milvus", "video_pk", "milvus_index", "TOKEN_ENV", "MARKER", "MAX_TOPK", "FIELDS",
           "write_milvus"]

log = logging.getLogger("vop.retrieval")

TOKEN_ENV = "VOP_MILVUS_TOKEN"
MARKER = "vop.index"
#: Milvus answers at most this many results per query (its topk limit)
MAX_TOPK = 16384
FIELDS = ("pk", "video_id", "vector", "path", "size", "mtime_ns", "duration")
_MAX_VARCHAR = 65535
_INDEX_TYPES = {"exact": "FLAT", "ivf": "IVF_FLAT", "ivfpq": "IVF_PQ", "hnsw": "HNSW"}
_GET_ROWS = 1000
#: loggers that print tracebacks for what vop reports in one line (pymilvus logs every failed call with its
#: traceback; Milvus Lite's in-process server logs its own failures)
_NOISY = ("pymilvus.decorators", "pymilvus.client.grpc_handler", "pymilvus.milvus_client.milvus_client",
          "pymilvus.client.connection_manager", "grpc._server", "milvus_lite.server_manager")


def require_milvus(spec: StoreSpec):
    """pymilvus (and milvus-lite for a Milvus Lite file), or a one-line error naming ``pip install 'vop[milvus]'``."""
    from vop._optional import require

    pymilvus = require("pymilvus", f"the Milvus store (--store {spec.uri})", extra="milvus",
                       install="pymilvus milvus-lite" if spec.lite is not None else "pymilvus")
    if spec.lite is not None:
        require("milvus_lite", f"a Milvus Lite file (--store {spec.uri})", package="milvus-lite", extra="milvus",
                install="pymilvus milvus-lite")
    return pymilvus


def video_pk(video_id: str) -> int:
    """The collection's primary key of a video: the first 63 bits of SHA-256 of its id."""
    return int.from_bytes(hashlib.sha256(video_id.encode("utf-8")).digest()[:8], "big") & ((1 << 63) - 1)


def milvus_index(resolved: ResolvedAnn) -> dict[str, Any]:
    """The Milvus vector index for a chosen kind: ``{"type", "params"}`` (build parameters only)."""
    p = resolved.params
    if resolved.kind == "exact":
        params: dict[str, Any] = {}
    elif resolved.kind == "ivf":
        params = {"nlist": int(p["nlist"])}
    elif resolved.kind == "ivfpq":
        params = {"nlist": int(p["nlist"]), "m": int(p["m"]), "nbits": int(p["nbits"])}
    elif resolved.kind == "hnsw":
        params = {"M": int(p["M"]), "efConstruction": int(p["ef_construction"])}
    else:
        raise ConfigError(f"no Milvus index for {resolved.kind!r}")
    return {"type": _INDEX_TYPES[resolved.kind], "params": params}


class _Silence(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _silenced(*names: str):
    """Drop what these loggers say meanwhile (milvus-lite logs a traceback when it cannot open its file, pymilvus a
    warning per iterator on Milvus Lite): the error vop raises says it in one line."""
    f = _Silence()
    loggers = [logging.getLogger(n) for n in names]
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)


def _detail(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    return " ".join(str(msg).split())[:300]


def _lite_locked(path: Path) -> bool:
    """Whether another process holds the Milvus Lite file's lock."""
    lock = path / "LOCK"
    if not lock.is_file():
        return False
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


class MilvusStore(VectorStore):
    """An index's collection (see the module docstring). :meth:`connect` for a connection; :meth:`open` for the
    store of an index (checked against its index.json); the write side is :func:`write_milvus`."""

    kind = "milvus"

    def __init__(self, spec: StoreSpec, client: Any, pymilvus: Any):
        self.spec, self.client, self._pm = spec, client, pymilvus
        self.entries: list[dict[str, Any]] = []
        self.row_of: dict[int, int] = {}
        self.index: dict[str, Any] = {"kind": "exact", "params": {}}
        self.index_path: Path | None = None
        self.meta: dict[str, Any] | None = None
        self._unknown_warned = False

    # -- connecting ---------------------------------------------------------------------------------------
    @classmethod
    def connect(cls, spec: StoreSpec, *, create: bool = False) -> "MilvusStore":
        """A connection to ``spec``'s server or Milvus Lite file (``create``: the file may be new). A ConfigError
        naming the host and port (or the file) and what to check when it cannot be reached, within
        ``spec.timeout`` seconds."""
        pm = require_milvus(spec)
        token = os.environ.get(TOKEN_ENV, "")
        if spec.lite is not None:
            if not spec.lite.exists():
                if not create:
                    raise ConfigError(f"{spec.lite}: no such Milvus Lite file (the store of this index, {spec.uri}): "
                                      "restore it, or rebuild the index")
                try:
                    spec.lite.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ConfigError(f"{spec.lite}: cannot create the Milvus Lite file's folder ({e.strerror or e})") from None
            uri = str(spec.lite)
        else:
            uri = f"http://{spec.address}"
        try:
            with _silenced(*_NOISY):
                client = pm.MilvusClient(uri=uri, token=token, timeout=spec.timeout)
        except Exception as e:  # noqa: BLE001 - pymilvus raises MilvusException subclasses, grpc errors, OSError
            raise cls._unreachable(spec, e) from None
        return cls(spec, client, pm)

    @staticmethod
    def _unreachable(spec: StoreSpec, e: BaseException) -> ConfigError:
        if spec.lite is not None:
            if _lite_locked(spec.lite):
                return ConfigError(f"{spec.lite}: the Milvus Lite file is open in another process (Milvus Lite is a "
                                   "single-process database: stop that process, e.g. a running `vop serve` or `vop index` "
                                   "on it, or use a Milvus server, milvus://HOST:PORT/COLLECTION, for several processes)")
            return ConfigError(f"{spec.lite}: cannot open the Milvus Lite file ({_detail(e)}); check that it is a Milvus "
                               "Lite database and that milvus-lite can read it (pip install 'vop[milvus]')")
        return ConfigError(
            f"cannot reach the Milvus server at {spec.address} (--store {spec.uri}, within {spec.timeout:g} s): {_detail(e)}. "
            f"Check that the server is running (e.g. `docker compose ps` where it was started, or "
            f"curl http://{spec.host}:9091/healthz), that the host and port are right (Milvus listens on {MILVUS_PORT} by "
            f"default), and that this machine can reach it (firewall, VPN); a server with authentication needs the "
            f"token in {TOKEN_ENV}")

    def _call(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """A client call; a failure is a ConfigError naming the store and the operation, never a traceback."""
        try:
            with _silenced(*_NOISY):
                return fn(*args, **kwargs)
        except (ConfigError, DataError):
            raise
        except Exception as e:  # noqa: BLE001 - MilvusException, grpc.RpcError, ...
            where = self.spec.lite if self.spec.lite is not None else f"the Milvus server at {self.spec.address}"
            text = _detail(e)
            if any(s in text.lower() for s in ("unavailable", "connect", "deadline", "timed out", "timeout")):
                raise self._unreachable(self.spec, e) from None
            raise ConfigError(f"{where}: {what} failed on collection {self.spec.collection!r} ({text})") from None

    @property
    def name(self) -> str:
        return str(self.spec.collection)

    def where(self) -> str:
        return f"{self.spec.uri} (collection {self.name})"

    def close(self) -> None:
        """Close the connection; for a Milvus Lite file, also stop its in-process server, which frees the file for
        other processes (every store of this process on that file stops working)."""
        with contextlib.suppress(Exception):
            self.client.close()
        if self.spec.lite is not None:
            with contextlib.suppress(Exception):
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(str(self.spec.lite))

    # -- the collection ------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self._call("has_collection", self.client.has_collection, self.name, timeout=self.spec.timeout))

    def marker(self) -> dict[str, Any] | None:
        """The collection's ``vop.index`` record: None if there is no collection, ``{}`` if it has none (not
        made by vop)."""
        if not self.exists():
            return None
        desc = self._call("describe_collection", self.client.describe_collection, self.name, timeout=self.spec.timeout)
        raw = (desc.get("properties") or {}).get(MARKER)
        try:
            rec = json.loads(raw) if raw else {}
        except ValueError:
            rec = {}
        return rec if isinstance(rec, dict) else {}

    def _schema_problem(self, dim: int) -> str | None:
        desc = self._call("describe_collection", self.client.describe_collection, self.name, timeout=self.spec.timeout)
        fields = {f.get("name"): f for f in desc.get("fields") or ()}
        pm = self._pm
        pk, vec = fields.get("pk"), fields.get("vector")
        if not pk or not pk.get("is_primary") or pk.get("type") != pm.DataType.INT64:
            return "has no INT64 primary key 'pk'"
        if not vec or vec.get("type") != pm.DataType.FLOAT_VECTOR:
            return "has no FLOAT_VECTOR field 'vector'"
        got = int((vec.get("params") or {}).get("dim", -1))
        if got != dim:
            return f"holds vectors of dimension {got}, the index's are {dim}"
        missing = [f for f in FIELDS if f not in fields]
        if missing:
            return f"lacks the field(s) {', '.join(missing)}"
        return None

    def create(self, dim: int, index: dict[str, Any], marker: dict[str, Any]) -> None:
        pm = self._pm
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", pm.DataType.INT64, is_primary=True)
        schema.add_field("video_id", pm.DataType.VARCHAR, max_length=_MAX_VARCHAR)
        schema.add_field("vector", pm.DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field("path", pm.DataType.VARCHAR, max_length=_MAX_VARCHAR)
        schema.add_field("size", pm.DataType.INT64)
        schema.add_field("mtime_ns", pm.DataType.INT64)
        schema.add_field("duration", pm.DataType.DOUBLE)
        self._call("create_collection", self.client.create_collection, self.name, schema=schema,
                   index_params=self._index_params(index), consistency_level="Strong",
                   properties={MARKER: json.dumps(marker)})

    def drop(self) -> None:
        if self.exists():
            self._call("drop_collection", self.client.drop_collection, self.name)

    def _index_params(self, index: dict[str, Any]):
        ip = self.client.prepare_index_params()
        params = dict(index["params"])
        # pymilvus sends the build parameters as separate key-value pairs (what Milvus servers read); Milvus Lite
        # reads them from one JSON "params" pair (which servers read too, the older wire form): both are sent
        ip.add_index(field_name="vector", index_name="vector", index_type=index["type"], metric_type="IP",
                     params={**params, "params": params} if params else {})
        return ip

    def set_index(self, index: dict[str, Any]) -> None:
        """Replace the collection's vector index (release, drop, create, load)."""
        self._call("release_collection", self.client.release_collection, self.name)
        self._call("drop_index", self.client.drop_index, self.name, "vector")
        self._call("create_index", self.client.create_index, self.name, self._index_params(index))
        self.load()

    def load(self) -> None:
        self._call("load_collection", self.client.load_collection, self.name)

    def flush(self) -> None:
        """Seal what was written (durable on the server; Milvus Lite searches sealed rows much faster)."""
        if hasattr(self.client, "flush"):
            self._call("flush", self.client.flush, self.name)

    def set_marker(self, marker: dict[str, Any]) -> None:
        self._call("alter_collection_properties", self.client.alter_collection_properties, self.name,
                   properties={MARKER: json.dumps(marker)})

    def upsert(self, entries: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        """Insert or replace these videos' entities (vectors (n, D) float32)."""
        dim = vectors.shape[1] if vectors.ndim == 2 else 0
        step = max(1, min(5000, (8 << 20) // (4 * max(dim, 1) + 1024)))  # about 8 MiB per request
        for s in range(0, len(entries), step):
            rows = []
            for e, v in zip(entries[s:s + step], vectors[s:s + step]):
                for key in ("id", "path"):
                    if len(e[key].encode("utf-8")) > _MAX_VARCHAR:
                        raise DataError(f"{e['path'][:200]}: its {key} is longer than Milvus's {_MAX_VARCHAR:,} bytes: "
                                        "this video cannot be kept in a Milvus store (use the faiss store)")
                dur = e.get("duration")
                rows.append({"pk": video_pk(e["id"]), "video_id": e["id"], "vector": v, "path": e["path"],
                             "size": int(e.get("size", -1)), "mtime_ns": int(e.get("mtime_ns", -1)),
                             "duration": float(dur) if isinstance(dur, (int, float)) else -1.0})
            self._call("upsert", self.client.upsert, self.name, rows)

    def delete(self, ids: Sequence[str]) -> None:
        pks = [video_pk(i) for i in ids]
        for s in range(0, len(pks), _GET_ROWS):
            self._call("delete", self.client.delete, self.name, ids=pks[s:s + _GET_ROWS])

    def count(self) -> int:
        """The number of entities (strongly consistent)."""
        res = self._call("count", self.client.query, self.name, filter="", output_fields=["count(*)"],
                         consistency_level="Strong", timeout=self.spec.timeout)
        return int(res[0]["count(*)"])

    def pks(self, count: int | None = None) -> set[int]:
        """Every primary key in the collection: range queries over the 63-bit keys (uniform: they are hashes),
        about 4,096 per query, a range split in two when it comes back full (no iterator: Milvus Lite has none
        that works quietly)."""
        n = self.count() if count is None else count
        out: set[int] = set()
        top = 1 << 63
        buckets = max(1, -(-n // 4096))
        todo = [(top * i // buckets, top * (i + 1) // buckets - 1) for i in range(buckets)]  # inclusive: int64
        while todo:
            lo, hi = todo.pop()
            res = self._call("query", self.client.query, self.name, filter=f"pk >= {lo} and pk <= {hi}",
                             output_fields=["pk"], limit=MAX_TOPK, consistency_level="Strong", timeout=self.spec.timeout)
            if len(res) >= MAX_TOPK and hi > lo:
                mid = (lo + hi) // 2
                todo += [(lo, mid), (mid + 1, hi)]
                continue
            out.update(int(r["pk"]) for r in res)
        return out

    def lacking(self, pks: Sequence[int]) -> list[int]:
        """Which of these primary keys the collection lacks (looked up by key, 4,096 per call: fast on any Milvus)."""
        found: set[int] = set()
        for s in range(0, len(pks), 4096):
            part = [int(p) for p in pks[s:s + 4096]]
            res = self._call("get", self.client.get, self.name, ids=part, output_fields=["pk"], timeout=self.spec.timeout)
            found.update(int(r["pk"]) for r in res)
        return [int(p) for p in pks if int(p) not in found]

    def vectors_by_id(self, ids: Sequence[str]) -> np.ndarray:
        """The stored vectors of these videos, in this order; a DataError naming one that the collection lacks."""
        pks = [video_pk(i) for i in ids]
        got: dict[int, Any] = {}
        for s in range(0, len(pks), _GET_ROWS):
            res = self._call("get", self.client.get, self.name, ids=pks[s:s + _GET_ROWS], output_fields=["vector"],
                             timeout=self.spec.timeout)
            for r in res:
                got[int(r["pk"])] = r["vector"]
        missing = [i for i, p in zip(ids, pks) if p not in got]
        if missing:
            raise DataError(f"{self.where()}: lacks the vectors of {len(missing)} video(s) of the index (e.g. {missing[0]!r}): "
                            "the collection was changed outside `vop index`; rebuild the index (vop index ... --rebuild)")
        if not pks:
            return np.zeros((0, 0), np.float32)
        return np.asarray([got[p] for p in pks], dtype=np.float32)

    # -- the store of an index -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, meta: dict[str, Any], entries: list[dict[str, Any]], *, verify: bool = True,
             hint: str = "vop index ... --rebuild") -> "MilvusStore":
        """The collection of the index at ``path`` (its checked index.json ``meta`` and video list), checked:
        schema, marker (UUID, generation), row count; with ``verify`` every video's key looked up in it.
        A DataError naming the collection and what to do otherwise."""
        rec = meta["store"]
        spec = StoreSpec.of(meta)
        store = cls.connect(spec)
        store.index_path, store.meta, store.entries = path, meta, entries
        store.index = {"kind": rec["index"]["kind"], "params": dict(rec["index"]["params"])}
        store.row_of = {video_pk(e["id"]): i for i, e in enumerate(entries)}
        where = store.where()
        marker = store.marker()
        if marker is None:
            raise DataError(f"{where}: no such collection: the index's vectors are gone (dropped, or another file/server); "
                            f"rebuild it: {hint}")
        if not marker or marker.get("uuid") != rec["uuid"]:
            raise DataError(f"{where}: holds {'the rows of another vop index' if marker else 'a collection not made by vop'}"
                            f" ({marker.get('folder') if marker else 'no vop.index property'}), not {path}'s; rebuild it: {hint}")
        problem = store._schema_problem(int(meta["dim"]))
        if problem:
            raise DataError(f"{where}: {problem}; the collection is damaged: rebuild it: {hint}")
        if marker.get("generation") != meta["generation"]:
            raise DataError(f"{where}: is at generation {marker.get('generation')}, {path / 'index.json'} at "
                            f"{meta['generation']}: an update of the index was interrupted or is running; run its "
                            f"`vop index` command again to finish it ({hint.replace(' --rebuild', '')})")
        store.load()
        n = store.count()
        if n != len(entries):
            raise DataError(f"{where}: holds {n:,} vectors, the index lists {len(entries):,} videos: the collection was changed "
                            f"outside `vop index` (or an update is running); rebuild it: {hint}")
        if len(store.row_of) != len(entries):
            raise DataError(f"{path}: two video ids share a primary key in the collection; rebuild it: {hint}")
        if verify:  # every key of the video list is there and the counts are equal: the same keys
            lacking = set(store.lacking(list(store.row_of)))
            if lacking:
                first = next(e["id"] for e in entries if video_pk(e["id"]) in lacking)
                raise DataError(f"{where}: lacks {len(lacking):,} video(s) of the index (e.g. {first!r}) and holds as many "
                                f"it does not list: the collection was changed outside `vop index`; rebuild it: {hint}")
        return store

    @property
    def search_kind(self) -> str:
        return self.index["kind"]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = self.vectors_by_id([self.entries[int(r)]["id"] for r in rows])
        return out.reshape(len(rows), int(self.meta["dim"])) if self.meta else out

    def search(self, scoring: Any, q: torch.Tensor, k: int, *, exact: bool | None = None,
               params: SearchParams = SearchParams()) -> tuple[np.ndarray, np.ndarray]:
        from vop.retrieval.topk import rescore, top_k

        n, nq = len(self.entries), q.shape[0]
        kk = min(k, n)
        if kk == 0 or nq == 0:
            return np.zeros((nq, kk), np.float32), np.zeros((nq, kk), np.int64)
        if k >= n:  # every video, ranked exactly (as the other stores do)
            return top_k(scoring, torch.from_numpy(self.vectors(np.arange(n))), q, k)
        kind, ip = self.index["kind"], self.index["params"]
        if exact and kind not in ("exact", "ivf"):
            raise ConfigError(f"{self.where()}: its {kind} index cannot search exactly; search without --exact, or rebuild "
                              "the index with --ann exact (or ivf, whose search scans every list when exact)")
        rerank = params.rerank if params.rerank is not None else (ip.get("rerank", 0) if kind == "ivfpq" else 0)
        limit = min(n, k * int(rerank)) if rerank else k
        if limit > MAX_TOPK:
            raise ConfigError(f"{self.where()}: Milvus returns at most {MAX_TOPK:,} results per query, {limit:,} were asked"
                              f"{' (k x rerank)' if rerank else ''}: ask for fewer")
        if not rerank:  # a few more than k, so that equal scores at the k-th place are ordered by row, as elsewhere
            limit = min(n, MAX_TOPK, k + 16)
        sp: dict[str, Any] = {}
        if kind in ("ivf", "ivfpq"):
            sp["nprobe"] = int(ip["nlist"]) if exact else int(params.nprobe or ip.get("nprobe") or 32)
        elif kind == "hnsw":
            sp["ef"] = max(limit, int(params.ef_search or ip.get("ef_search") or 128))
        res = self._call("search", self.client.search, self.name, data=np.ascontiguousarray(q.numpy(), dtype=np.float32),
                         limit=limit, search_params={"metric_type": "IP", "params": sp}, output_fields=["pk"],
                         timeout=self.spec.timeout)
        scores = np.full((nq, limit), -np.inf, np.float32)
        cand = np.full((nq, limit), -1, np.int64)
        unknown = 0
        for i, hits in enumerate(res):
            j = 0
            for h in hits:
                r = self.row_of.get(int(h["pk"] if "pk" in h else h["id"]))
                if r is None:
                    unknown += 1
                    continue
                scores[i, j], cand[i, j] = float(h["distance"]), r
                j += 1
        if unknown and not self._unknown_warned:
            self._unknown_warned = True
            log.warning("%s: holds videos that %s does not list (updated since it was opened): reopen the index to see them",
                        self.where(), self.index_path)
        if rerank:
            return rescore(scoring, q, cand, k, n, lambda c: torch.from_numpy(self.vectors(c)))
        out_s = np.full((nq, kk), -np.inf, np.float32)
        out_r = np.full((nq, kk), -1, np.int64)
        for i in range(nq):
            ok = cand[i] >= 0
            order = np.lexsort((cand[i][ok], -scores[i][ok].astype(np.float64)))[:kk]
            out_s[i, :len(order)], out_r[i, :len(order)] = scores[i][ok][order], cand[i][ok][order]
        return out_s, out_r


def open_for_write(spec: StoreSpec, target: Path, old: dict[str, Any] | None, rebuild: bool) -> MilvusStore:
    """Connect to the store ``vop index`` writes into and check, before anything is encoded, that its collection is
    free or this index's (``old``: its index.json): a collection not made by vop is never touched; one holding
    another vop index is replaced only with ``rebuild``."""
    store = MilvusStore.connect(spec, create=True)
    marker = store.marker()
    if marker is None:
        return store
    if not marker:
        raise ConfigError(f"{store.where()}: the collection exists and was not made by `vop index`: choose another "
                          f"collection name (--store {spec.uri.rsplit('/', 1)[0]}/NAME)")
    ours = (old or {}).get("store", {}).get("uuid") if StoreSpec.of(old).same_place(spec) else None
    if marker.get("uuid") != ours and not rebuild:
        raise ConfigError(f"{store.where()}: holds the vectors of another vop index ({marker.get('folder')}): choose "
                          f"another collection (--store {spec.uri.rsplit('/', 1)[0]}/NAME) or pass --rebuild to replace them")
    return store


def write_milvus(store: MilvusStore, out: Path, target: Path, entries: list[dict[str, Any]],
                 vectors: list[np.ndarray | None], fresh: set[str], old_ids: set[str], meta: dict[str, Any],
                 old: dict[str, Any] | None, resolved: ResolvedAnn, *, rebuild: bool,
                 fetch_old: Callable[[list[str]], np.ndarray]) -> dict[str, Any]:
    """Write the next generation of an index into ``store`` (connected by :func:`open_for_write`) and its folder
    ``out`` (``target``: where the folder will be): upsert, delete, vector index, count check, marker, then
    index.json (:func:`vop.retrieval.format.write_index`). ``vectors[i]``: ``entries[i]``'s row, or None when it
    is stored in the index's current collection (or, migrating, wherever ``fetch_old`` fetches it from);
    ``fresh``: the ids encoded by this run; ``old_ids``: the ids the index listed before."""
    from vop.retrieval.format import next_generation, write_index

    spec = store.spec
    gen = next_generation(old)
    dim = int(meta["scoring"]["row_shape"][-1])
    index = milvus_index(resolved)
    old_spec = StoreSpec.of(old)
    marker = store.marker()
    old_uuid = (old or {}).get("store", {}).get("uuid")
    in_place = (old is not None and not rebuild and old_spec.same_place(spec) and marker is not None
                and bool(marker) and marker.get("uuid") == old_uuid)
    if old is not None and not rebuild and old_spec.same_place(spec) and not in_place:
        raise ConfigError(f"{store.where()}: the index's collection is gone or was replaced: its vectors cannot be "
                          "kept; pass --rebuild to encode every video again")
    ids = [e["id"] for e in entries]
    pks = {video_pk(i): i for i in ids}
    if len(pks) != len(ids):
        seen: dict[int, str] = {}
        for i in ids:
            p = video_pk(i)
            if p in seen:
                raise DataError(f"{target}: the video ids {seen[p]!r} and {i!r} share a 63-bit key (SHA-256 prefix): "
                                "rename one of them, or use the faiss store")
            seen[p] = i
    uid = old_uuid if in_place else uuid.uuid4().hex
    mark = {"format": "vop-index/2", "uuid": uid, "generation": gen, "dim": dim, "scoring": meta["scoring"]["kind"],
            "checkpoint_sha256": meta["model"].get("checkpoint_sha256"), "folder": str(target), "index": index}
    if in_place:
        todo = [i for i, e in enumerate(entries) if e["id"] in fresh]
        gone = sorted(set(old_ids) - set(ids))
    else:
        if marker is not None:
            store.drop()
        store.create(dim, index, {**mark, "generation": 0})
        todo, gone = list(range(len(entries))), []
    missing = [entries[i]["id"] for i in todo if vectors[i] is None]
    fetched = dict(zip(missing, fetch_old(missing))) if missing else {}
    rows = [vectors[i] if vectors[i] is not None else fetched[entries[i]["id"]] for i in todo]
    arr = np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, dim), np.float32)
    if arr.size and not np.isfinite(arr).all():
        raise DataError(f"{target}: embeddings hold NaN or inf values; an index never stores them")
    store.upsert([entries[i] for i in todo], arr)
    if gone:
        store.delete(gone)
    store.flush()
    if in_place and marker.get("index") != index:
        store.set_index(index)
    store.load()
    n = store.count()
    if n != len(entries):
        raise DataError(f"{store.where()}: holds {n:,} vectors after the update, the index lists {len(entries):,}: another "
                        "process is writing to this collection; rebuild the index (--rebuild) when it is done")
    store.set_marker(mark)
    record = {**spec.record(), "uuid": uid, "dim": dim, "metric": "IP", "fields": list(FIELDS),
              "index": {"kind": resolved.kind, "type": index["type"], "params": dict(resolved.params)}}
    return write_index(out, None, entries, {**meta, "store": record, "faiss": None}, old=old)
