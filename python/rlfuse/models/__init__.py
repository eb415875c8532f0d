"""Model integrations (Hugging Face).  ``transformers`` is imported only inside functions,
so ``import rlfuse`` never imports it."""

from rlfuse.models.hf import (causal_lm_completion_logprobs, causal_lm_token_logprobs,
                              packed_runs_natively, scored_positions)

__all__ = ["causal_lm_completion_logprobs", "causal_lm_token_logprobs", "packed_runs_natively",
           "scored_positions"]
