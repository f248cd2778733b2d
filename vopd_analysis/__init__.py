"""vopd-analysis: bias, variance and baseline quality of on-policy distillation gradient estimators."""

from .batch import TokenBatch
from .errors import InputError
from .estimators import REGISTRY, describe, get, per_sequence, surrogate_loss

__all__ = ["InputError", "TokenBatch", "REGISTRY", "describe", "get", "per_sequence", "surrogate_loss"]
__version__ = "0.1.0"
