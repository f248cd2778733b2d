"""vopd-analysis: bias, variance and baseline quality of on-policy distillation gradient estimators."""

import importlib

from .errors import InputError

__all__ = ["InputError", "TokenBatch", "REGISTRY", "describe", "get", "per_sequence", "surrogate_loss"]
__version__ = "0.1.0"

_LAZY = {"TokenBatch": "batch", "REGISTRY": "estimators", "describe": "estimators", "get": "estimators",
         "per_sequence": "estimators", "surrogate_loss": "estimators"}


def __getattr__(name):
    """The exports above and the submodules, imported on first use: ``vopd`` starts without importing
    torch, so that a Ctrl-C while it imports reaches ``cli.main`` (``interrupted``, exit 130)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
