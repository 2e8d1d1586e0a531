"""Search your own videos with a trained prompt checkpoint: build an index, query it, serve it.

    from vop.retrieval import build_index, Searcher, SearchService
    build_index("my_videos/", "runs/x/best.safetensors", "my_index")      # resumable, incremental
    Searcher.open("my_index").search(["a dog jumps into a pool"], k=5)    # [[{rank, id, score, path, ...}]]
    SearchService.load(["my_index", "fc=other_index"])                     # several prompt sets, one CLIP

The web app (``vop serve``) is in ``vop.retrieval.web`` (extra ``vop[serve]``); approximate search with
FAISS in ``vop.retrieval.ann`` (extra ``vop[index]``); where an index keeps its vectors (the index folder, or
a Milvus collection: ``vop.retrieval.milvus``, extra ``vop[milvus]``) in ``vop.retrieval.store``. See
docs/search.md.
"""
from vop.retrieval.build import BuildReport, build_index
from vop.retrieval.format import write_index
from vop.retrieval.index import VideoIndex
from vop.retrieval.provenance import checkpoint_info
from vop.retrieval.topk import exact_search
from vop.retrieval.search import BackbonePool, Searcher, encode_queries, shares_backbone
from vop.retrieval.service import MAX_K, MAX_QUERY_CHARS, NotFoundError, RequestError, SearchService
from vop.retrieval.sources import Source, list_sources
from vop.retrieval.store import AnnChoice, SearchParams, StoreSpec

__all__ = [
    "build_index", "BuildReport", "VideoIndex", "write_index", "checkpoint_info", "exact_search",
    "Searcher", "BackbonePool", "encode_queries", "shares_backbone",
    "SearchService", "RequestError", "NotFoundError", "MAX_QUERY_CHARS", "MAX_K",
    "Source", "list_sources", "StoreSpec", "AnnChoice", "SearchParams",
]
