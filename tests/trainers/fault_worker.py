"""Run by test_faults.py in a subprocess: a short GRPO run that checkpoints every step.

    python -m tests.trainers.fault_worker OUT [--resume] [--kill-in-checkpoint STEP]

``--kill-in-checkpoint STEP`` sends SIGKILL to this process in the middle of writing
checkpoint-STEP (after the model file, before the rename).  At the end the final
parameters are saved to OUT/final.pt.
"""

import os
import signal
import sys

import torch

from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlfuse.tasks import AdditionTask
from rlfuse.trainers import GRPOConfig, GRPOTrainer, copy_reference

STEPS = 6


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def main(argv):
    torch.set_num_threads(1)
    out = argv[0]
    resume = "--resume" in argv
    kill_at = int(argv[argv.index("--kill-in-checkpoint") + 1]) if "--kill-in-checkpoint" in argv else None
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    cfg = GRPOConfig(output_dir=out, learning_rate=1e-3, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, num_generations=4, max_completion_length=4,
                     max_steps=STEPS, save_steps=1, save_total_limit=2, beta=0.05,
                     lr_scheduler_type="linear", progress=False, plot=False, seed=0)
    tr = GRPOTrainer(model, length_reward, args=cfg, train_dataset=AdditionTask(digits=1).dataset(64),
                     tokenizer=tok, ref_model=copy_reference(model))
    if kill_at is not None:
        orig = tr._save_extra

        def _save_extra(path):
            orig(path)
            if tr.state["global_step"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        tr._save_extra = _save_extra
    tr.train(resume_from_checkpoint=True if resume else None)
    torch.save([p.detach() for p in model.parameters()], os.path.join(out, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1:])
