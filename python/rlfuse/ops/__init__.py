"""The public functional API: stateless fused ops over tensors.

Each op family lives in one module holding its reference implementation, its
``torch.library`` ops (``rlfuse::<name>``) and its backend dispatch.
"""

from rlfuse.ops.logprob import token_logprobs, token_logprobs_reference
from rlfuse.ops.linear_logprob import linear_token_logprobs, linear_token_logprobs_reference
from rlfuse.ops.sequence import SequenceLogprobs, reduce_sequences, sequence_logprobs
from rlfuse.ops.advantage import (
    discounted_returns,
    discounted_returns_reference,
    gae,
    gae_reference,
    group_advantages,
    group_advantages_reference,
    masked_mean,
    masked_mean_reference,
    masked_var,
    masked_var_reference,
    masked_whiten,
    masked_whiten_reference,
    token_rewards,
    token_rewards_reference,
)
from rlfuse.ops.policy_loss import (
    kl_penalty,
    kl_penalty_reference,
    policy_loss,
    policy_loss_reference,
    value_loss,
    value_loss_reference,
)
from rlfuse.ops.preference import (
    preference_logps,
    preference_loss,
    preference_loss_from_hidden,
    preference_loss_reference,
)

__all__ = [
    "token_logprobs",
    "token_logprobs_reference",
    "linear_token_logprobs",
    "linear_token_logprobs_reference",
    "sequence_logprobs",
    "reduce_sequences",
    "SequenceLogprobs",
    "gae",
    "gae_reference",
    "discounted_returns",
    "discounted_returns_reference",
    "masked_mean",
    "masked_mean_reference",
    "masked_var",
    "masked_var_reference",
    "masked_whiten",
    "masked_whiten_reference",
    "group_advantages",
    "group_advantages_reference",
    "token_rewards",
    "token_rewards_reference",
    "kl_penalty",
    "kl_penalty_reference",
    "policy_loss",
    "policy_loss_reference",
    "value_loss",
    "value_loss_reference",
    "preference_loss",
    "preference_loss_reference",
    "preference_logps",
    "preference_loss_from_hidden",
]
