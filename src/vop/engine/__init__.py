"""Training and evaluation engine.

- :mod:`.config`: the typed run configuration (YAML + ``a.b=value`` overrides), :class:`RunConfig`.
- :mod:`.trainer`: the training loop, ``train(cfg)`` / ``train(resume=run_dir)``, on one CPU or
  under torchrun, with resumable state and val-based model selection.
- :mod:`.distributed`: torchrun + DDP set-up (``DistEnv``) and cross-process reductions.
- :mod:`.loss`, :mod:`.optim`: symmetric InfoNCE with exact gradient accumulation; AdamW groups
  and the warmup + cosine schedule.
- :mod:`.evaluate`, :mod:`.metrics`: retrieval evaluation of a model on a split (R@K, MdR, MnR,
  optional DSL / QB-Norm re-scoring).
- :mod:`.skips`: the bound on samples lost to unreadable or missing videos.
- :mod:`.pretrain`: contrastive pretraining of the tiny CLIP on synthetic stills.

Only the config and the metrics are imported here; import the other modules where needed.
"""

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
