"""The public functional API: stateless fused ops over tensors.

Each op family lives in one module holding its reference implementation, its
``torch.library`` ops (``rlfuse::<name>``) and its backend dispatch.
"""

from rlfuse.ops.logprob import token_logprobs, token_logprobs_reference
from rlfuse.ops.linear_logprob import linear_token_logprobs, linear_token_logprobs_reference
from rlfuse.ops.sequence import SequenceLogprobs, reduce_sequences, sequence_logprobs

__all__ = [
    "token_logprobs",
    "token_logprobs_reference",
    "linear_token_logprobs",
    "linear_token_logprobs_reference",
    "sequence_logprobs",
    "reduce_sequences",
    "SequenceLogprobs",
]
