import json
import os
import subprocess
import sys

import pytest
import torch

from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_two_process_gloo_ddp(tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tests.trainers.ddp_worker", out],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(f"{out}/rank0.pt")
    r1 = torch.load(f"{out}/rank1.pt")
    assert r0["world"] == r1["world"] == 2
    # DDP kept the replicas identical, and they trained
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    init = tiny_causal_lm(tiny_tokenizer(), hidden_size=32, num_layers=1, num_heads=2, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(r0["params"], init.parameters()))
    # ranks sampled different completions (seed + rank) from different prompts
    assert r0["rewards"] != r1["rewards"]
    state = json.load(open(f"{out}/checkpoint-2/trainer_state.json"))
    assert state["world_size"] == 2 and state["global_step"] == 2
    assert os.path.isfile(f"{out}/checkpoint-2/rng_state_1.pth")
