"""The tabular world: layered environments with exact ground truth.

``targets`` (exact J, grad J, g_tok), ``enumeration`` and ``dp`` (exact estimator moments),
``analysis`` (``vopd exact``), ``montecarlo`` (sampled gradients and the unbiasedness test),
``baseline_quality`` (exact variance of any state baseline, b*) and ``training`` (exact-gradient
training of a tabular student).
"""
