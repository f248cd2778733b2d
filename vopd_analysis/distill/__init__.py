"""On-policy distillation of a Hugging Face student from a teacher (``vopd distill``).

The loop lives in ``vopd_analysis.distill.loop`` (``DistillConfig``, ``run``, ``main``).
"""


def __getattr__(name):  # lazy, so ``python -m vopd_analysis.distill.loop`` imports the loop once
    if name in ("DistillConfig", "run", "main"):
        from . import loop
        return getattr(loop, name)
    raise AttributeError(name)
