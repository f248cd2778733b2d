"""The language-model world: Hugging Face loading (``loading``), rollouts (``rollouts``), scoring into
a ``TokenBatch`` (``scoring``) or from hidden states (``fused_score``), what the distributions look
like (``statistics``), the gradient-variance probe (``variance``), the committed pairs (``tiny``,
``small``, ``pair_card``), random smoke-preset models (``smoke``) and the tiny task (``tasks``).
"""
