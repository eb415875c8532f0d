"""Run by test_distributed.py under ``torch.distributed.run --nproc_per_node=2``: GRPO's
advantages with ``scale_rewards="batch"`` from each rank's own rewards (rank 1's ten times
larger, one reward missing on rank 0); each rank saves its rewards and advantages.

    python -m tests.trainers.batch_std_worker OUT
"""

import os
import sys

import torch

from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlfuse.trainers import GRPOConfig, GRPOTrainer
from rlfuse.trainers.base import Rollout


def main(out):
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     num_generations=4, scale_rewards="batch", max_steps=1, progress=False,
                     plot=False, report_to="none")
    tr = GRPOTrainer(model, lambda prompts, completions, **kw: [0.0] * len(completions),
                     args=cfg, train_dataset=[{"prompt": "1+1="}] * 8, tokenizer=tok)
    rank = tr.rank
    g = torch.Generator().manual_seed(rank)
    rewards = torch.rand(8, generator=g, dtype=torch.float64) * (10.0 if rank else 1.0)
    if rank == 0:
        rewards[5] = float("nan")           # every reward function returned None
    # make_rollout on fixed completions (no sampling) and these rewards
    B, P, C = 8, 4, 3
    fixed = Rollout(torch.full((B, P), 5), torch.ones(B, P, dtype=torch.long),
                    torch.full((B, C), 6), torch.ones(B, C, dtype=torch.long),
                    ["1+1="] * B, ["2"] * B)
    tr.generate = lambda prompts, n: fixed
    tr.score = lambda r: (rewards, rewards.unsqueeze(1), int(torch.isnan(rewards).sum()))
    adv = tr.make_rollout([{"prompt": "1+1="}] * 2).extra["advantages"]
    torch.save({"world": tr.world_size, "rewards": rewards, "advantages": adv.cpu()},
               f"{out}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
