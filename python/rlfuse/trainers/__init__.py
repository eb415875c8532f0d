"""GRPO, PPO and DPO trainers over Hugging Face causal LMs, built on the fused ops.

    from rlfuse.trainers import GRPOTrainer, GRPOConfig
    trainer = GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=rows,
                          tokenizer=tok)
    trainer.train()

See docs/trainers.md.  ``transformers`` is imported only when a trainer is built.
"""

from rlfuse.trainers.base import NonFiniteError, RewardFunctionError, latest_checkpoint
from rlfuse.trainers.config import (ConfigError, DPOConfig, GRPOConfig, PPOConfig, SFTConfig,
                                    TrainConfig)
from rlfuse.trainers.grpo import GRPOTrainer, copy_reference
from rlfuse.trainers.ppo import PPOTrainer, ValueModel
from rlfuse.trainers.dpo import DPOTrainer
from rlfuse.trainers.sft import supervised_warmup

__all__ = ["DPOTrainer", "GRPOTrainer", "PPOTrainer", "ValueModel", "GRPOConfig", "PPOConfig", "DPOConfig", "SFTConfig", "TrainConfig",
           "ConfigError", "NonFiniteError", "RewardFunctionError", "supervised_warmup",
           "copy_reference", "latest_checkpoint"]
