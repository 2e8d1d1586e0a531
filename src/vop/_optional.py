"""Packages that only some features need, imported where those features are used.

``import vop``, building any method and training it need only torch, numpy and safetensors (plus
pyyaml and tqdm for the engine). The tokenizer (ftfy, instant-clip-tokenizer) and video decoding
and writing (av) import their packages when first used, through :func:`require`, so a machine
without them (a GPU image, say) runs everything else; using the feature there raises
:class:`vop.errors.MissingDependencyError` naming the package and how to install it. The web app
(fastapi, uvicorn) and approximate search (faiss) do the same in ``vop.retrieval.web`` and
``vop.retrieval.ann``, with a ConfigError naming their extra (``vop[serve]``, ``vop[index]``).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from vop.errors import MissingDependencyError


def require(module: str, purpose: str, package: str | None = None, install: str | None = None,
            extra: str | None = None) -> ModuleType:
    """``import module`` (cheap once imported), or a one-line :class:`MissingDependencyError` saying
    that ``purpose`` needs ``package`` (default: the top-level module name) and to run
    ``pip install install`` (default: ``package``; name there what the same feature needs too, so
    that one command is enough). ``extra``: the package is no dependency of vop but an optional one, installed
    by ``pip install 'vop[extra]'`` (said instead of "part of vop's dependencies"); "" for an optional package
    that no extra installs."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = package or module.split(".")[0]
        install = install or package
        if extra is None:
            how = (f"pip install {install} (part of vop's dependencies: `pip install vop`, or `pip install -e .` "
                   "in a checkout, installs them)")
        elif extra:
            how = (f"pip install 'vop[{extra}]' (or pip install {install}; in a checkout: "
                   f"pip install -e '.[{extra}]')")
        else:
            how = f"pip install {install} (an optional dependency of vop, needed for this only)"
        top = module.split(".")[0]
        if isinstance(e, ModuleNotFoundError) and e.name in (top, module):
            raise MissingDependencyError(f"{purpose} needs the Python package '{package}', which is not "
                                         f"installed: {how}", name=top) from None
        # installed but broken (a missing shared library, a version clash): keep the cause
        detail = " ".join(str(e).split())[:300]
        raise MissingDependencyError(f"{purpose} needs the Python package '{package}', which could not be "
                                     f"imported ({detail}): {how}", name=top) from e
