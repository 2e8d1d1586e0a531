"""Training and evaluation engine: metrics, typed config (training loop, distributed: to come)."""

from vop.engine.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    config_to_dict,
    load_config,
    save_config,
)
from vop.engine.metrics import dual_softmax, qb_norm, retrieval_metrics, similarity_chunked
