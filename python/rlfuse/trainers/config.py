"""Config dataclasses for the trainers, with the field names TRL users know.

Every config validates itself when it is built (``__post_init__``), so a bad value is
rejected before any model is loaded; the trainers add the checks that need the world size
or the arguments they were given.  A config comes from keyword arguments, a YAML file
(:meth:`from_yaml`) or command-line ``--field value`` pairs (:meth:`from_cli`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = ["TrainConfig", "GRPOConfig", "PPOConfig", "DPOConfig", "SFTConfig", "ConfigError",
           "FORMER_DEFAULTS"]


class ConfigError(ValueError):
    """A config value is invalid (the message names the field)."""


def _check(cond: bool, name: str, msg: str):
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pos_int(obj, name):
    v = getattr(obj, name)
    _check(_is_int(v) and v >= 1, name, f"must be a positive int, got {v!r}")


def _nonneg_int(obj, name):
    v = getattr(obj, name)
    _check(_is_int(v) and v >= 0, name, f"must be a non-negative int, got {v!r}")


def _real(obj, name, lo=None, hi=None, lo_open=False, optional=False, hi_open=False):
    v = getattr(obj, name)
    if v is None and optional:
        return
    _check(_is_real(v), name, f"must be a finite number, got {v!r}")
    if lo is not None:
        ok = v > lo if lo_open else v >= lo
        _check(ok, name, f"must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None:
        ok = v < hi if hi_open else v <= hi
        _check(ok, name, f"must be {'<' if hi_open else '<='} {hi}, got {v!r}")


def _choice(obj, name, choices):
    v = getattr(obj, name)
    _check(v in choices, name, f"must be one of {list(choices)}, got {v!r}")


_INTEGRATIONS = ("tensorboard",)

# Defaults that changed when the configs took TRL 1.16's / transformers' (a checkpoint's
# trainer_state.json records the config it ran with; resuming one that ran with a former
# default under the new one warns: BaseTrainer._warn_former_defaults).
FORMER_DEFAULTS = {
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "constant",
    "max_prompt_length": 512,
    "max_completion_length": 256,
    "use_bias_correction_kl": False,
}


def field_default(cls, name):
    """The default of field ``name`` of the dataclass ``cls``."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` and the ``tensorboard`` package import."""
    try:
        import tensorboard  # noqa: F401
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _default_report_to():
    return "tensorboard" if tensorboard_available() else "none"


def report_integrations(report_to) -> list:
    """The integrations ``report_to`` asks for (``transformers`` semantics: a name, a list
    of names, ``"all"`` for every installed one, ``"none"`` or None for none); raises
    :class:`ConfigError` naming ``report_to`` for an unknown name or one not installed."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else report_to
    _check(isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names),
           "report_to", f"must be a name, a list of names or None, got {report_to!r}")
    known = ("none", "all") + _INTEGRATIONS
    out = []
    for n in names:
        _check(n in known, "report_to", f"unknown integration {n!r} (supported: {list(known)})")
        if n == "all":
            out += [i for i in _INTEGRATIONS if tensorboard_available()]
        elif n == "tensorboard":
            _check(tensorboard_available(), "report_to",
                   "'tensorboard' needs the tensorboard package (pip install tensorboard), "
                   "which is not installed; use report_to='none' to turn TensorBoard off")
            out.append(n)
    _check("none" not in names or len(names) == 1, "report_to",
           f"'none' cannot be combined with other integrations, got {report_to!r}")
    return sorted(set(out))


def load_yaml_fields(path, name: str = "path") -> dict:
    """The mapping of field: value in the YAML file ``path`` (an empty file gives {});
    :class:`ConfigError` naming ``name`` (the argument that gave the path, e.g.
    ``--config``) when it cannot be read, is not valid YAML, or holds something other than
    a mapping with string keys."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path!r}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: {path!r} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: {path!r} is not a text file: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: {path!r} must hold a mapping of field: value, got a "
                          f"{type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{name}: {path!r} has keys that are not field names: {bad!r}")
    return data


@dataclass
class TrainConfig:
    """Fields shared by every trainer (the ``transformers.TrainingArguments`` names and,
    where ``transformers`` has them, its defaults: ``num_train_epochs=3.0``,
    ``lr_scheduler_type="linear"``)."""

    output_dir: str = "rlfuse_output"
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 3.0
    max_grad_norm: Optional[float] = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: Optional[int] = 2
    seed: int = 42
    device: str = "auto"
    # rlfuse: stop after this many steps whose loss or gradients were not finite (each
    # such step is skipped and counted).
    max_nonfinite_steps: int = 3
    progress: bool = True
    plot: bool = True
    # "tensorboard", "all" (every installed integration: TensorBoard when installed),
    # "none"/None, or a list of names.  Default: "tensorboard" when it is installed.
    report_to: Union[str, list, None] = field(default_factory=_default_report_to)
    logging_dir: Optional[str] = None      # TensorBoard event files; None: <output_dir>/runs
    # Shard the trained (and reference / value) models with FSDP2 (``fully_shard`` per
    # decoder layer, then the whole model) instead of DDP when several processes run.
    fsdp: bool = False
    # A fresh (not resumed) run in an output_dir that holds checkpoints of an earlier run
    # raises unless this is True (then those checkpoints are deleted first).
    overwrite_output_dir: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self):
        _check(isinstance(self.output_dir, str) and self.output_dir != "", "output_dir",
               f"must be a non-empty path, got {self.output_dir!r}")
        _real(self, "learning_rate", lo=0.0, lo_open=True)
        _pos_int(self, "per_device_train_batch_size")
        _pos_int(self, "gradient_accumulation_steps")
        _check(_is_int(self.max_steps) and (self.max_steps >= 1 or self.max_steps == -1),
               "max_steps", f"must be a positive int or -1 (use num_train_epochs), got {self.max_steps!r}")
        _real(self, "num_train_epochs", lo=0.0, lo_open=True)
        _real(self, "max_grad_norm", lo=0.0, lo_open=True, optional=True)
        _real(self, "weight_decay", lo=0.0)
        _real(self, "adam_beta1", lo=0.0, hi=1.0, hi_open=True)
        _real(self, "adam_beta2", lo=0.0, hi=1.0, hi_open=True)
        _real(self, "adam_epsilon", lo=0.0, lo_open=True)
        _choice(self, "lr_scheduler_type", ("constant", "linear", "cosine"))
        _nonneg_int(self, "warmup_steps")
        _pos_int(self, "logging_steps")
        _nonneg_int(self, "save_steps")
        _check(self.save_total_limit is None or (_is_int(self.save_total_limit)
                                                  and self.save_total_limit >= 1),
               "save_total_limit", f"must be None or a positive int, got {self.save_total_limit!r}")
        _check(_is_int(self.seed), "seed", f"must be an int, got {self.seed!r}")
        _check(isinstance(self.device, str) and (self.device in ("auto", "cpu")
                                                 or self.device.startswith("cuda")),
               "device", f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _pos_int(self, "max_nonfinite_steps")
        report_integrations(self.report_to)
        _check(self.logging_dir is None or (isinstance(self.logging_dir, str)
                                            and self.logging_dir != ""), "logging_dir",
               f"must be None or a non-empty path, got {self.logging_dir!r}")
        _check(isinstance(self.fsdp, bool), "fsdp", f"must be a bool, got {self.fsdp!r}")
        _check(isinstance(self.overwrite_output_dir, bool), "overwrite_output_dir",
               f"must be a bool, got {self.overwrite_output_dir!r}")

    # -- construction -------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict):
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str, **overrides):
        data = load_yaml_fields(path, "path")
        data.update(overrides)
        return cls.from_dict(data)

    @classmethod
    def parse_value(cls, name: str, text: str):
        """Convert a command-line string to the type of field ``name``."""
        hints = typing.get_type_hints(cls)
        if name not in hints:
            raise ConfigError(f"{cls.__name__}: unknown field {name!r}")
        tp = hints[name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if typing.get_origin(tp) is typing.Union and args else tp
        if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
            return None
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}: expected a boolean, got {text!r}")
        if base is int:
            try:
                return int(text)
            except ValueError:
                raise ConfigError(f"{name}: expected an int, got {text!r}") from None
        if base is float:
            try:
                return float(text)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {text!r}") from None
        is_list = [a is list or typing.get_origin(a) is list for a in (args or [tp])]
        # a list field, or a field that takes a name or a list (loss_type, report_to)
        # given in YAML flow syntax: "[sigmoid, sft]"
        if (base is list or typing.get_origin(base) is list) or (
                any(is_list) and text.lstrip().startswith("[")):
            import yaml

            try:
                v = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{name}: expected a list such as [1.0, 2.0], got {text!r} "
                                  f"({exc})") from None
            if not isinstance(v, list):
                raise ConfigError(f"{name}: expected a list such as [1.0, 2.0], got {text!r}")
            return v
        return text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _RolloutConfig(TrainConfig):
    """Generation settings shared by GRPO and PPO."""

    # None: prompts are not truncated (TRL 1.16 has no prompt truncation); an int keeps
    # each prompt's last max_prompt_length tokens (rlfuse).
    max_prompt_length: Optional[int] = None
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    reward_weights: Optional[list] = None
    mask_truncated_completions: bool = False
    # rlfuse: "rlfuse" samples with rlfuse.models.generate.sample (the prompt is encoded
    # once per group, one uniform draw per token); "hf" calls model.generate.  Models whose
    # forward takes no KV cache, and FSDP2, always use "hf".
    generation_backend: str = "rlfuse"
    # rlfuse: encode each distinct prompt once in the log-prob forwards (policy, reference,
    # old policy) and run its completions on the shared KV cache.
    share_prompt_prefix: bool = True
    # Turn off the dropout of the policy (and reference / value model): with dropout on,
    # the old log-probs and the update's log-probs see different masks, so the first
    # update's ratio is not 1.  TRL's defaults: False for GRPO, True for PPO and DPO.
    disable_dropout: bool = False

    def validate(self):
        super().validate()
        _check(isinstance(self.disable_dropout, bool), "disable_dropout",
               f"must be a bool, got {self.disable_dropout!r}")
        _choice(self, "generation_backend", ("rlfuse", "hf"))
        _check(isinstance(self.share_prompt_prefix, bool), "share_prompt_prefix",
               f"must be a bool, got {self.share_prompt_prefix!r}")
        _check(self.max_prompt_length is None or (_is_int(self.max_prompt_length)
                                                  and self.max_prompt_length >= 1),
               "max_prompt_length", f"must be None or a positive int, got {self.max_prompt_length!r}")
        _pos_int(self, "max_completion_length")
        _real(self, "temperature", lo=0.0, lo_open=True)
        _real(self, "top_p", lo=0.0, hi=1.0, lo_open=True)
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 0), "top_k",
               f"must be None or a non-negative int, got {self.top_k!r}")
        _check(self.reward_weights is None or (
            isinstance(self.reward_weights, (list, tuple))
            and all(_is_real(w) for w in self.reward_weights)), "reward_weights",
            f"must be None or a list of finite numbers, got {self.reward_weights!r}")
        _check(isinstance(self.mask_truncated_completions, bool), "mask_truncated_completions",
               "must be a bool")


@dataclass
class GRPOConfig(_RolloutConfig):
    """GRPO (TRL's ``GRPOConfig`` names and defaults, where TRL has them, but for the
    rlfuse choices listed in docs/trainers.md, "Defaults": logging and checkpoint settings).

    ``per_device_train_batch_size`` counts completions; each optimizer step uses
    ``per_device_train_batch_size * gradient_accumulation_steps`` completions per process,
    which must be a multiple of ``num_generations`` (groups stay on one process).
    """

    learning_rate: float = 1e-6
    num_generations: int = 8
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    importance_sampling_level: str = "token"
    num_iterations: int = 1
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = True
    entropy_coef: float = 0.0

    def validate(self):
        super().validate()
        _check(_is_int(self.num_generations) and self.num_generations >= 2, "num_generations",
               f"must be an int >= 2 (a group needs two completions), got {self.num_generations!r}")
        per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        _check(per_step % self.num_generations == 0, "per_device_train_batch_size",
               f"per_device_train_batch_size * gradient_accumulation_steps ({per_step}) must be "
               f"divisible by num_generations ({self.num_generations})")
        _real(self, "beta", lo=0.0)
        _real(self, "epsilon", lo=0.0)
        _real(self, "epsilon_high", lo=0.0, optional=True)
        _real(self, "delta", lo=1.0, lo_open=True, optional=True)
        _choice(self, "loss_type", ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"))
        _choice(self, "scale_rewards", ("group", "batch", "none"))
        _choice(self, "importance_sampling_level", ("token", "sequence"))
        _pos_int(self, "num_iterations")
        _choice(self, "kl_estimator", ("k1", "k2", "k3"))
        _check(isinstance(self.use_bias_correction_kl, bool), "use_bias_correction_kl", "must be a bool")
        _real(self, "entropy_coef", lo=0.0)


@dataclass
class PPOConfig(_RolloutConfig):
    """PPO with a value model and GAE (TRL's ``PPOConfig`` names: ``num_ppo_epochs``,
    ``kl_coef``, ``kl_estimator``, ``cliprange``, ``cliprange_value``, ``vf_coef``,
    ``gamma``, ``lam``, ``whiten_rewards``)."""

    learning_rate: float = 3e-6
    num_ppo_epochs: int = 4
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    cliprange: float = 0.2
    cliprange_value: Optional[float] = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    value_model: str = "separate"
    disable_dropout: bool = True

    def validate(self):
        super().validate()
        _pos_int(self, "num_ppo_epochs")
        _real(self, "kl_coef", lo=0.0)
        _choice(self, "kl_estimator", ("k1", "k2", "k3"))
        _real(self, "cliprange", lo=0.0)
        _real(self, "cliprange_value", lo=0.0, lo_open=True, optional=True)
        _real(self, "vf_coef", lo=0.0)
        _real(self, "gamma", lo=0.0, hi=1.0)
        _real(self, "lam", lo=0.0, hi=1.0)
        _check(isinstance(self.whiten_rewards, bool), "whiten_rewards", "must be a bool")
        _choice(self, "value_model", ("separate",))


@dataclass
class DPOConfig(TrainConfig):
    """DPO (TRL's ``DPOConfig`` names and defaults: ``beta``, ``loss_type``,
    ``loss_weights``, ``label_smoothing``, ``max_length``; rlfuse adds
    ``max_prompt_length``, None by default: no prompt truncation, as TRL 1.16).

    ``loss_type``: one type of :func:`rlfuse.ops.preference_loss` (``LOSS_TYPES`` or the
    batch-sorted ``aot``, ``aot_unpaired``), or a list of them combined as TRL does,
    ``sum_k loss_weights[k] * loss_k`` (``loss_weights`` default: 1 each)."""

    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: Union[str, list] = "sigmoid"
    loss_weights: Optional[list] = None
    label_smoothing: float = 0.0
    max_length: Optional[int] = 1024
    max_prompt_length: Optional[int] = None
    disable_dropout: bool = True       # TRL's DPOConfig default

    def loss_types(self) -> tuple:
        """``loss_type`` as a tuple of type names."""
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    def validate(self):
        super().validate()
        _check(isinstance(self.disable_dropout, bool), "disable_dropout",
               f"must be a bool, got {self.disable_dropout!r}")
        _real(self, "beta", lo=0.0, lo_open=True)
        from rlfuse.ops.preference import LOSS_TYPES, SORTED_TYPES

        known = LOSS_TYPES + SORTED_TYPES
        lt = self.loss_type
        if isinstance(lt, str):
            _choice(self, "loss_type", known)
        else:
            _check(isinstance(lt, (list, tuple)) and len(lt) > 0
                   and all(isinstance(t, str) for t in lt), "loss_type",
                   f"must be a loss type or a non-empty list of them, got {lt!r}")
            bad = [t for t in lt if t not in known]
            _check(not bad, "loss_type", f"unknown type(s) {bad} (choose from {list(known)})")
        types = self.loss_types()
        lw = self.loss_weights
        if lw is not None:
            _check(isinstance(lw, (list, tuple)) and all(_is_real(w) for w in lw),
                   "loss_weights", f"must be None or a list of finite numbers, got {lw!r}")
            _check(len(lw) == len(types), "loss_weights",
                   f"has {len(lw)} weights for {len(types)} loss types ({list(types)})")
        _real(self, "label_smoothing", lo=0.0, hi=1.0)
        _check(self.label_smoothing < 0.5 or "robust" not in types, "label_smoothing",
               "must be < 0.5 with loss_type='robust'")
        _check(0.0 < self.label_smoothing < 1.0 or "exo_pair" not in types,
               "label_smoothing", f"must lie in (0, 1) with loss_type='exo_pair' (the loss "
               f"takes log(label_smoothing); e.g. 1e-3), got {self.label_smoothing!r}")
        for name in ("max_length", "max_prompt_length"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and v >= 1), name,
                   f"must be None or a positive int, got {v!r}")
        if self.max_length is not None and self.max_prompt_length is not None:
            _check(self.max_prompt_length < self.max_length, "max_prompt_length",
                   f"must be < max_length ({self.max_length}), got {self.max_prompt_length} "
                   "(a prompt of max_prompt_length tokens would leave no room for the "
                   "completion, and DPO would train on nothing)")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning (the warm-up of the embedded default)."""

    learning_rate: float = 2e-5
    max_length: Optional[int] = 1024
