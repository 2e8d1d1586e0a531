"""Public home of the retrieval metrics; the implementation lives in ``vop.engine.metrics``."""

from vop.engine.metrics import (  # noqa: F401
    TIE_RTOL,
    __all__,
    dual_softmax,
    qb_norm,
    rank_metrics,
    retrieval_metrics,
    similarity_chunked,
    tie_tolerance,
    t2v_ranks,
    v2t_ranks,
)
