"""Run by test_distributed.py under ``torch.distributed.run --nproc_per_node=2``: a short
GRPO run with DDP over gloo; each rank saves its final parameters."""

import sys

import torch

from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlfuse.tasks import AdditionTask
from rlfuse.trainers import GRPOConfig, GRPOTrainer
from rlfuse.trainers.base import dist_info


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def main(out):
    rank, world, _ = dist_info()
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    cfg = GRPOConfig(output_dir=out, learning_rate=1e-3, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, num_generations=4, max_completion_length=4,
                     max_steps=2, save_steps=2, progress=False, plot=False, seed=0)
    tr = GRPOTrainer(model, length_reward, args=cfg,
                     train_dataset=AdditionTask(digits=1).dataset(32), tokenizer=tok)
    tr.train()
    torch.save({"world": world, "params": [p.detach() for p in model.parameters()],
                "rewards": [h["reward"] for h in tr._log_history]}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
