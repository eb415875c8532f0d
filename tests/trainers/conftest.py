import pytest
import torch

from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlfuse.tasks import AdditionTask


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models do microseconds of work per op: one thread avoids OpenMP wake-up
    costs (large on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def tiny(tok):
    """A fresh seeded tiny model (hidden 32, 1 layer)."""
    return tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)


@pytest.fixture(scope="session")
def task():
    return AdditionTask(digits=1)


@pytest.fixture(scope="session")
def rows(task):
    return task.dataset(64, seed=3)


def small_grpo_config(tmp_path, **kw):
    from rlfuse.trainers import GRPOConfig

    base = dict(output_dir=str(tmp_path / "out"), learning_rate=1e-3,
                per_device_train_batch_size=4, gradient_accumulation_steps=2,
                num_generations=4, max_completion_length=4, max_steps=2, progress=False,
                plot=False, seed=0)
    base.update(kw)
    return GRPOConfig(**base)


def random_rollout(tok, B, P=4, C=5, seed=0):
    """A fixed batch: random prompt / completion ids, ragged completion masks."""
    from rlfuse.trainers.base import Rollout

    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    p_ids = torch.randint(4, V, (B, P), generator=g)
    p_mask = torch.ones(B, P, dtype=torch.long)
    p_mask[0, :2] = 0                       # a left-padded prompt
    p_ids[0, :2] = tok.pad_token_id
    c_ids = torch.randint(4, V, (B, C), generator=g)
    lens = torch.randint(1, C + 1, (B,), generator=g)
    c_mask = (torch.arange(C).unsqueeze(0) < lens.unsqueeze(1)).long()
    c_ids = torch.where(c_mask.bool(), c_ids, torch.full_like(c_ids, tok.pad_token_id))
    return Rollout(p_ids, p_mask, c_ids, c_mask, ["p"] * B, ["c"] * B)
