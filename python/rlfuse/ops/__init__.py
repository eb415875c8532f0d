"""The public functional API: stateless fused ops over tensors.

Each op family lives in one module holding its reference implementation, its
``torch.library`` op (``rlfuse::<name>``) and its backend dispatch.
"""

from rlfuse.ops.logprob import token_logprobs, token_logprobs_reference

__all__ = ["token_logprobs", "token_logprobs_reference"]
