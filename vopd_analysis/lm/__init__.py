"""The language-model world: Hugging Face loading, rollouts and scoring (``hf``), the gradient-
variance probe (``variance``), the committed pairs (``tiny``, ``small``, ``pair_card``) and the
tiny task (``tasks``).
"""
