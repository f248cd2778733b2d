"""On-policy distillation of a Hugging Face student from a teacher (``vopd distill``).

The command line and the choice of engine live in ``vopd_analysis.distill.command`` (``run``, ``main``), the
config in ``vopd_analysis.distill.config`` (``DistillConfig``); the built-in engine is ``loop.py``, the TRL
engine ``trl_engine.py``, and the run they share ``runner.py``.
"""


def __getattr__(name):  # lazy, so that importing the package loads no engine (and torch only when asked)
    if name == "DistillConfig":
        from .config import DistillConfig
        return DistillConfig
    if name in ("run", "main"):
        from . import command
        return getattr(command, name)
    raise AttributeError(name)
