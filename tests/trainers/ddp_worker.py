"""Run by test_distributed.py under ``torch.distributed.run --nproc_per_node=2``: a short
run over gloo with DDP (``ddp``) or FSDP2 (``fsdp``: ``fsdp=True``) of GRPO (default), PPO
or DPO; each rank saves its final full parameters.

    python -m tests.trainers.ddp_worker OUT [ddp|fsdp] [grpo|ppo|dpo] [CHECKPOINT]
"""

import os
import sys

import torch

from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlfuse.tasks import AdditionTask
from rlfuse.trainers import (DPOConfig, GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer,
                             copy_reference)
from rlfuse.trainers.base import dist_info
from rlfuse.trainers.dpo import DPOTrainer
from tests.trainers.reference import addition_pairs


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def main(out, mode="ddp", algo="grpo", resume=None):
    rank, world, _ = dist_info()
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    fsdp = mode == "fsdp"
    common = dict(output_dir=out, learning_rate=1e-3, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_steps=2, save_steps=1 if fsdp else 2,
                  progress=False, plot=False, seed=0, fsdp=fsdp, report_to="none")
    rows = AdditionTask(digits=1).dataset(32)
    if algo == "grpo":
        cfg = GRPOConfig(num_generations=4, max_completion_length=4, **common)
        tr = GRPOTrainer(model, length_reward, args=cfg, train_dataset=rows, tokenizer=tok)
    elif algo == "ppo":
        # a reference model (sharded too under FSDP) and a value model
        cfg = PPOConfig(max_completion_length=4, num_ppo_epochs=2, kl_coef=0.05,
                        vf_coef=0.5, **common)
        tr = PPOTrainer(model, length_reward, args=cfg, train_dataset=rows, tokenizer=tok,
                        ref_model=copy_reference(model))
    else:
        cfg = DPOConfig(beta=0.2, **common)
        tr = DPOTrainer(model, copy_reference(model), args=cfg, train_dataset=addition_pairs(32),
                        tokenizer=tok)
    tr.train(resume_from_checkpoint=resume)
    # sharded parameters (DTensors) are gathered: a collective, every rank calls it
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
              for m in tr._trainable_modules().values() for p in m.parameters()]
    torch.save({"world": world, "fsdp": tr.fsdp, "params": [p.detach() for p in params],
                "rewards": [h.get("reward", h["loss"]) for h in tr._log_history]},
               f"{out}/rank{rank}.pt")
    # a gloo group left to the interpreter's exit can abort it (torch 2.13); even after
    # barrier + destroy, about one run in 30 still aborted in teardown ("terminate called
    # without an active exception") with every result saved: leave without the teardown
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
