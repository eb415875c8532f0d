"""token_logprobs against TRL's selective_log_softmax / entropy_from_logits."""

import pytest
import torch

from rlfuse.ops import token_logprobs
from tests.helpers import require_peer


@pytest.mark.peer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_trl(dtype):
    utils = require_peer("trl.trainer.utils")
    logits = (torch.randn(3, 17, 1000) * 3).to(dtype)
    ids = torch.randint(0, 1000, (3, 17))
    want_lp = utils.selective_log_softmax(logits, ids).float()
    want_ent = utils.entropy_from_logits(logits).float()
    lp, ent = token_logprobs(logits, ids, return_entropy=True)
    # TRL computes bf16 log-softmax rows in bf16; rlfuse accumulates in float32.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(lp, want_lp, **tol)
    torch.testing.assert_close(ent, want_ent, **tol)


@pytest.mark.peer
def test_trl_temperature_convention():
    """TRL divides the logits by the sampling temperature before the log-softmax."""
    utils = require_peer("trl.trainer.utils")
    logits = torch.randn(2, 5, 300)
    ids = torch.randint(0, 300, (2, 5))
    want = utils.selective_log_softmax(logits / 0.7, ids)
    torch.testing.assert_close(token_logprobs(logits, ids, temperature=0.7), want)


@pytest.mark.peer
def test_peers_importable():
    """The development environment carries every peer (oracles and baselines)."""
    for mod in ("trl", "verl.trainer.ppo.core_algos", "mctx", "liger_kernel"):
        require_peer(mod)


@pytest.mark.peer
def test_matches_verl():
    F = require_peer("verl.utils.torch_functional")
    logits = torch.randn(6, 700) * 2
    ids = torch.randint(0, 700, (6,))
    lp, ent = token_logprobs(logits, ids, return_entropy=True)
    torch.testing.assert_close(lp, F.logprobs_from_logits(logits, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, F.entropy_from_logits(logits), rtol=1e-5, atol=1e-5)
