"""The shared trainer base: model loading, data order, rollout, reward scoring, the
optimizer step with non-finite skipping, logging (JSONL and TensorBoard), atomic
checkpoints and exact resume, and ``torch.distributed`` setup (DDP, or FSDP2 with
``fsdp=True``).

One training *step* is one optimizer update.  Subclasses implement :meth:`_train_round`
(one rollout and the updates made from it) and say which modules they train.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from rlfuse.models.generate import sample as lean_sample, supports as supports_lean_sampling
from rlfuse.trainers.config import (FORMER_DEFAULTS, ConfigError, TrainConfig, field_default,
                                    report_integrations)

__all__ = ["BaseTrainer", "NonFiniteError", "RewardFunctionError", "load_model_and_tokenizer",
           "latest_checkpoint", "check_output_dir", "check_reference_is_separate"]

_CKPT = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteError(RuntimeError):
    """Too many steps had a non-finite loss or gradient norm."""


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned an invalid value (the message names the sample)."""


# --------------------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------------------
def dist_info():
    """(rank, world_size, initialised by us) after initialising the process group when
    launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size(), True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    return 0, 1, False


def _all_reduce_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _barrier(world: int):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
def load_model_and_tokenizer(model, tokenizer=None):
    """``model`` as given (a ``PreTrainedModel``) or loaded from a path / hub name with
    ``AutoModelForCausalLM``; ``tokenizer`` as given or ``AutoTokenizer`` from the model's
    path."""
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = model
        model = AutoModelForCausalLM.from_pretrained(path)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path)
    elif not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a path or a PreTrainedModel, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("tokenizer is required when model is a PreTrainedModel")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def disable_dropout_in_model(model) -> int:
    """Turn off every dropout of ``model`` in place (what TRL's ``disable_dropout_in_model``
    does, plus the float rates that ``transformers`` attention and layer code passes to
    functional dropout, e.g. Llama's ``attention_dropout``, OPT's ``dropout``): every
    ``torch.nn`` dropout module gets ``p = 0`` and every float attribute of a module whose
    name contains ``dropout``, ``pdrop`` or ``layerdrop`` is set to 0.0 (the model is
    changed in place).  Returns how many were changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.dropout._DropoutNd,)):
            if m.p != 0.0:
                m.p = 0.0
                n += 1
            continue
        for name, v in list(vars(m).items()):
            low = name.lower()
            if (("dropout" in low or "pdrop" in low or "layerdrop" in low)
                    and isinstance(v, float) and v != 0.0):
                setattr(m, name, 0.0)
                n += 1
    return n


class _LogprobModule(torch.nn.Module):
    """Wraps a causal LM so that the fused log-prob forward runs through ``forward``
    (what DDP needs to synchronise gradients, and what FSDP2 needs to gather the
    parameters of the root: embeddings, final norm, lm_head).  With ``generate_kwargs``
    it runs ``model.generate`` instead (under FSDP2 generation must run inside the root's
    forward too)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, completion_mask=None, position_ids=None,
                temperature=1.0, return_entropy=False, generate_kwargs=None,
                prompt_length=None, share_prompts=True, sample_kwargs=None):
        from rlfuse.models.hf import causal_lm_completion_logprobs, causal_lm_token_logprobs

        if generate_kwargs is not None:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                       **generate_kwargs)
        if sample_kwargs is not None:
            return lean_sample(self.model, input_ids, attention_mask, **sample_kwargs)

        if prompt_length is not None:
            # prompt / completion split: [B, C] results, each distinct prompt encoded once
            P = prompt_length
            out = causal_lm_completion_logprobs(
                self.model, input_ids[:, :P], attention_mask[:, :P], input_ids[:, P:],
                completion_mask[:, P:], temperature=temperature, return_entropy=return_entropy,
                share_prompts=share_prompts)
        else:
            out = causal_lm_token_logprobs(
                self.model, input_ids, attention_mask=attention_mask,
                completion_mask=completion_mask, position_ids=position_ids,
                temperature=temperature, return_entropy=return_entropy)
        # FSDP2 hooks the outputs for backward and warns about views; [B, T] copies are cheap
        if isinstance(out, tuple):
            return tuple(t.clone() if t._base is not None else t for t in out)
        return out.clone() if out._base is not None else out


# --------------------------------------------------------------------------------------
# rollout
# --------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """A batch of prompts and sampled completions, left-padded prompts + right-padded
    completions (``P`` and ``C`` tokens)."""

    prompt_ids: torch.Tensor        # [B, P]
    prompt_mask: torch.Tensor       # [B, P]
    completion_ids: torch.Tensor    # [B, C]
    completion_mask: torch.Tensor   # [B, C] (up to and including the first eos)
    prompts: list
    completions: list
    columns: dict = field(default_factory=dict)   # other dataset columns, one per sample
    extra: dict = field(default_factory=dict)     # tensors computed by the algorithm

    @property
    def input_ids(self):
        return torch.cat([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self):
        return torch.cat([self.prompt_mask, self.completion_mask], 1)

    def select(self, idx: slice) -> "Rollout":
        cols = {k: v[idx] for k, v in self.columns.items()}
        extra = {k: v[idx] for k, v in self.extra.items()}
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                       self.completion_mask[idx], self.prompts[idx], self.completions[idx],
                       cols, extra)


def encode_prompts(tokenizer, prompts, max_prompt_length, device):
    """Left-padded prompt ids and mask.  ``max_prompt_length`` None keeps every prompt whole
    (as TRL 1.16, which does not truncate prompts); an int keeps each prompt's last
    ``max_prompt_length`` tokens (left truncation, an rlfuse option)."""
    rows = []
    for p in prompts:
        ids = tokenizer(p)["input_ids"]
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        rows.append(ids)
    P = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), P), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, P - len(r):] = torch.tensor(r)
            mask[i, P - len(r):] = 1
    return ids.to(device), mask.to(device)


def completion_mask_from_ids(completion_ids, eos_token_id, pad_token_id):
    """1 up to and including the first eos, 0 after; and whether each row was truncated
    (no eos)."""
    is_eos = completion_ids == eos_token_id
    C = completion_ids.size(1)
    idx = torch.arange(C, device=completion_ids.device).expand_as(completion_ids)
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1),
                        torch.full_like(is_eos[:, 0], C, dtype=torch.long))
    mask = (idx <= first.unsqueeze(1)).long()
    return mask, ~is_eos.any(1)


def position_ids_from_mask(attention_mask):
    """Positions counted over real tokens (what ``generate`` uses for left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def score_completions(reward_funcs, weights, prompts, completions, columns, *, step=None):
    """Call every reward function (TRL signature ``f(prompts, completions, **columns)``)
    and return ``(rewards [B] float64 with NaN where every function returned None,
    per-function rewards [B, F], number of None values)``.

    A function that raises is re-run sample by sample to name the first sample that fails;
    a NaN/inf or non-number value, or a list of the wrong length, raises
    :class:`RewardFunctionError` naming the function, the sample, its prompt and completion.
    """
    B = len(completions)
    out = torch.full((B, len(reward_funcs)), float("nan"), dtype=torch.float64)
    n_none = 0
    for j, fn in enumerate(reward_funcs):
        name = getattr(fn, "__name__", None) or type(fn).__name__
        try:
            vals = fn(prompts=prompts, completions=completions, **columns)
        except Exception as exc:
            bad = None
            for i in range(B):
                try:
                    fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                       **{k: v[i:i + 1] for k, v in columns.items()})
                except Exception:
                    bad = i
                    break
            where = (f" on sample {bad} (prompt={prompts[bad]!r}, completion={completions[bad]!r})"
                     if bad is not None else " on the batch")
            raise RewardFunctionError(
                f"reward function {name!r} raised {type(exc).__name__}: {exc}{where}"
                + (f" at step {step}" if step is not None else "")) from exc
        got = type(vals).__name__
        if vals is not None and not isinstance(vals, (str, bytes, dict)):
            try:
                vals = list(vals)
            except TypeError:          # a scalar, or another object that is not iterable
                vals = None
        else:
            vals = None
        if vals is None or len(vals) != B:
            raise RewardFunctionError(
                f"reward function {name!r} must return a list of {B} values (one per "
                f"completion), got "
                + (f"{len(vals)} values" if vals is not None else f"a {got}")
                + (f" at step {step}" if step is not None else ""))
        for i, v in enumerate(vals):
            if v is None:
                n_none += 1
                continue
            try:
                fv = float(v)
            except (TypeError, ValueError):
                fv = None
            if fv is None or not math.isfinite(fv):
                raise RewardFunctionError(
                    f"reward function {name!r} returned {v!r} for sample {i} (prompt="
                    f"{prompts[i]!r}, completion={completions[i]!r})"
                    + (f" at step {step}" if step is not None else "")
                    + "; return None to leave a sample out of the group statistics")
            out[i, j] = fv
    w = torch.tensor(weights, dtype=torch.float64)
    valid = ~torch.isnan(out)
    total = torch.where(valid, out * w, torch.zeros_like(out)).sum(1)
    total = torch.where(valid.any(1), total, torch.full_like(total, float("nan")))
    return total, out, n_none


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def latest_checkpoint(output_dir: str):
    """Path of the complete checkpoint with the highest step in ``output_dir``, or None.
    Checkpoints are written to a temporary directory and renamed, so a directory named
    ``checkpoint-N`` is always complete."""
    if not os.path.isdir(output_dir):
        return None
    best = None
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state.json")):
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), path)
    return best[1] if best else None


def stale_checkpoints(output_dir: str) -> list:
    """Names of the ``checkpoint-N`` directories in ``output_dir`` (sorted by step)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := _CKPT.match(n))]
    return [n for _step, n in sorted(found)]


def check_output_dir(output_dir: str, overwrite: bool, resuming: str | None = None):
    """Raise :class:`ConfigError` naming ``output_dir`` when a fresh (not resumed) run, or
    a run resumed from a checkpoint of another directory (``resuming``), would start in a
    directory holding an earlier run's checkpoints and ``overwrite`` is False
    (``transformers``' ``overwrite_output_dir`` rule: the two runs' checkpoints would mix,
    rotation would delete the new run's ones, and a later resume would pick the old run's
    newest).  Returns the names of those checkpoints."""
    stale = stale_checkpoints(output_dir)
    if stale and not overwrite:
        shown = ", ".join(stale[-3:]) + (", ..." if len(stale) > 3 else "")
        if resuming is None:
            raise ConfigError(
                f"output_dir: {output_dir!r} already holds checkpoints of an earlier run "
                f"({shown}); pass resume_from_checkpoint=True (--resume) to continue that "
                "run, set overwrite_output_dir=True (--overwrite_output_dir true) to delete "
                "them and start afresh, or use another output_dir")
        raise ConfigError(
            f"output_dir: {output_dir!r} already holds checkpoints of an earlier run "
            f"({shown}), and resume_from_checkpoint={resuming!r} is not one of them: this "
            "run's checkpoints would mix with them; set overwrite_output_dir=True to delete "
            "them, or use another output_dir (resume_from_checkpoint=True continues the run "
            "that output_dir holds)")
    return stale


def check_reference_is_separate(model, ref_model) -> None:
    """Raise :class:`ConfigError` naming ``ref_model`` when it is ``model`` itself or shares
    a parameter (the same tensor, or the same storage) with it: the trainers freeze the
    reference in place (``requires_grad=False``, eval mode), which would freeze the policy
    too, and its log-probs would follow the policy.  Nothing is modified before the check."""
    if not isinstance(model, torch.nn.Module) or not isinstance(ref_model, torch.nn.Module):
        return
    if ref_model is model:
        shared = True
    else:
        def keys(m):
            ids, ptrs = set(), set()
            for t in m.parameters():
                ids.add(id(t))
                with contextlib.suppress(Exception):
                    if t.device.type != "meta" and t.numel() > 0:
                        ptrs.add((t.device, t.untyped_storage().data_ptr()))
            return ids, ptrs

        ids_m, ptrs_m = keys(model)
        ids_r, ptrs_r = keys(ref_model)
        shared = bool(ids_m & ids_r) or bool(ptrs_m & ptrs_r)
    if shared:
        raise ConfigError(
            "ref_model must not be the model itself or share its parameters (the reference "
            "is frozen in place and would freeze the policy with it); pass a copy, e.g. "
            "rlfuse.trainers.copy_reference(model)")


def _remove_dir(out, name):
    """Remove ``out/name``, renamed away first so a kill while deleting never leaves a
    partial ``checkpoint-N``."""
    doomed = os.path.join(out, f".del-{name}")
    shutil.rmtree(doomed, ignore_errors=True)     # left by a kill while deleting
    os.rename(os.path.join(out, name), doomed)
    shutil.rmtree(doomed, ignore_errors=True)


_TMP = re.compile(r"^\.tmp-checkpoint-(\d+)$")
_DEL = re.compile(r"^\.del-checkpoint-(\d+)$")


def _complete_tmp(path) -> bool:
    """Whether a ``.tmp-checkpoint-N`` holds a whole checkpoint: its trainer_state.json,
    the file rank 0 writes last, is present and parses."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False


def clean_partial_checkpoints(output_dir: str) -> list:
    """Tidy what a kill left in ``output_dir`` (rank 0, before a run reads it): returns
    the names of the directories removed or promoted.

    * ``.tmp-checkpoint-N`` next to ``.del-checkpoint-N`` and no ``checkpoint-N``: a kill
      between the two renames of :meth:`BaseTrainer.save_checkpoint` replacing an
      existing ``checkpoint-N`` (the old one renamed away, the new one fsynced but not yet
      renamed in): the ``.tmp`` is the only copy of the newest state, so when it is whole it
      becomes ``checkpoint-N``.
    * every other ``.tmp-checkpoint-N``: a checkpoint whose writing was cut short (never
      renamed into place, so the previous checkpoints are the run's state): removed.
    * ``.del-checkpoint-N``: a checkpoint being deleted (rotation, overwrite, replacement)
      when the kill came: removed."""
    if not os.path.isdir(output_dir):
        return []
    names = os.listdir(output_dir)
    done = []
    for n in names:
        m = _TMP.match(n)
        if not m:
            continue
        step = m.group(1)
        tmp = os.path.join(output_dir, n)
        final = os.path.join(output_dir, f"checkpoint-{step}")
        if (f".del-checkpoint-{step}" in names and not os.path.exists(final)
                and _complete_tmp(tmp)):
            os.rename(tmp, final)
            _fsync_dir(output_dir)
            done.append(f"{n} -> checkpoint-{step}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            done.append(n)
    for n in names:
        if _DEL.match(n):
            shutil.rmtree(os.path.join(output_dir, n), ignore_errors=True)
            done.append(n)
    return done


def _alias_groups(module) -> list:
    """Names that refer to one tensor (tied weights), one sorted list per tensor."""
    groups: dict = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(t), []).append(name)
    return [sorted(g) for g in groups.values()]


def _drop_aliases(module, sd: dict) -> dict:
    """``sd`` with one name kept per tied tensor (the first sorted name present, as
    ``safetensors.torch.save_model`` keeps), contiguous, for ``save_file``."""
    drop = set()
    for g in _alias_groups(module):
        present = [n for n in g if n in sd]
        drop.update(present[1:])
    return {k: v.contiguous() for k, v in sd.items() if k not in drop}


def _fill_aliases(module, sd: dict) -> dict:
    """``sd`` with every tied name present (a file keeps one name per tied tensor)."""
    sd = dict(sd)
    for g in _alias_groups(module):
        present = [n for n in g if n in sd]
        if present:
            for n in g:
                sd.setdefault(n, sd[present[0]])
    return sd


def _fsync_dir(path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path):
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(root)


# --------------------------------------------------------------------------------------
# the base trainer
# --------------------------------------------------------------------------------------
class BaseTrainer:
    config_class = TrainConfig
    required_columns: tuple = ("prompt",)
    algorithm = "base"

    def __init__(self, model, args, train_dataset, tokenizer=None):
        # 1. everything that can be checked without a model
        if args is None:
            args = self.config_class()
        if not isinstance(args, self.config_class):
            raise ConfigError(f"args must be a {self.config_class.__name__}, got "
                              f"{type(args).__name__}")
        args.validate()
        self.args = args
        self._check_dataset(train_dataset)
        self.train_dataset = train_dataset
        self._check_more()
        self.rank, self.world_size, self._owns_pg = dist_info()
        # 2. models
        self.device = self._pick_device()
        self.model, self.tokenizer = load_model_and_tokenizer(model, tokenizer)
        self.model.to(self.device)
        self.state = {"global_step": 0, "epoch": 0, "position": 0, "nonfinite_steps": 0,
                      "rounds": 0}
        self._perm = None
        self._log_history: list[dict] = []
        self.timers: dict[str, float] = {}
        self._tb_writer = None
        self._mesh = None
        self._fsdp_roots: dict = {}    # id(module) -> the FSDP2 root whose forward runs it
        if getattr(args, "disable_dropout", False):
            # before the subclass builds its copies (PPO's value model copies the body)
            disable_dropout_in_model(self.model)
        self._setup_models()
        if getattr(args, "disable_dropout", False):
            for name in ("ref_model", "value_model"):
                m = getattr(self, name, None)
                if isinstance(m, torch.nn.Module):
                    disable_dropout_in_model(m)

    # -- hooks for subclasses -------------------------------------------------------
    def _check_more(self):
        """Checks of the arguments given to the subclass constructor (before any model)."""

    def _setup_models(self):
        raise NotImplementedError

    def _trainable_modules(self) -> dict:
        """name -> module whose parameters are trained and checkpointed."""
        return {"model": self.model}

    def _items_per_round(self) -> int:
        """Dataset rows one round consumes on each process."""
        raise NotImplementedError

    def _steps_per_round(self) -> int:
        return 1

    # -- setup ----------------------------------------------------------------------
    def _pick_device(self):
        d = self.args.device
        if d == "auto":
            if torch.cuda.is_available():
                local = int(os.environ.get("LOCAL_RANK", "0"))
                return torch.device("cuda", local)
            return torch.device("cpu")
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ConfigError(f"device: {d!r} is not a torch device ({exc})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: {d!r} asks for CUDA, which this torch build or "
                              "machine does not have (use device='auto' or 'cpu')")
        if dev.type == "cuda" and dev.index is not None and \
                dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {d!r}, but only {torch.cuda.device_count()} CUDA "
                              "device(s) are visible")
        return dev

    def _check_dataset(self, ds):
        if ds is None:
            raise ValueError("train_dataset is required")
        try:
            n = len(ds)
        except TypeError:
            raise TypeError("train_dataset must support len() and indexing (a list of dicts "
                            "or a datasets.Dataset)") from None
        if n == 0:
            raise ValueError("train_dataset is empty")
        if isinstance(ds, Mapping):
            raise TypeError(
                "train_dataset must be a sequence of rows (a list of dicts or a "
                f"datasets.Dataset), got a {type(ds).__name__} (of columns?); e.g. "
                "datasets.Dataset.from_dict(columns), or [dict(zip(columns, values)) for "
                "values in zip(*columns.values())]")
        first = ds[0]
        if not isinstance(first, dict):
            raise TypeError(f"train_dataset rows must be dicts, got {type(first).__name__}")
        missing = [c for c in self.required_columns if c not in first]
        if missing:
            raise ValueError(f"train_dataset is missing the column(s) {missing} "
                             f"(needs {list(self.required_columns)})")
        # every row's text columns, before any model is loaded (a bad value would
        # otherwise fail deep inside the tokenizer, mid-training)
        if hasattr(ds, "column_names") and not isinstance(ds, (list, tuple)):
            columns = {c: ds[c] for c in self.required_columns}      # datasets.Dataset
            for c, values in columns.items():
                for i, v in enumerate(values):
                    self._check_text(i, c, v)
        else:
            for i in range(n):
                row = ds[i]
                if not isinstance(row, dict):
                    raise TypeError(f"train_dataset row {i}: rows must be dicts, got "
                                    f"{type(row).__name__}")
                for c in self.required_columns:
                    if c not in row:
                        raise ValueError(f"train_dataset row {i} has no column {c!r}")
                    self._check_text(i, c, row[c])

    @staticmethod
    def _check_text(i, column, v):
        if isinstance(v, str):
            return
        hint = ""
        if isinstance(v, (list, tuple)) and v and isinstance(v[0], dict):
            hint = (" (conversational rows, lists of messages, are not supported: apply the "
                    "chat template first, e.g. tokenizer.apply_chat_template(messages, "
                    "tokenize=False, add_generation_prompt=True))")
        raise TypeError(f"train_dataset row {i}, column {column!r}: must be a string, got "
                        f"{type(v).__name__}{hint}")

    def _make_optimizer(self, params):
        a = self.args
        opt = torch.optim.AdamW(params, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                eps=a.adam_epsilon, weight_decay=a.weight_decay)
        total = self.total_steps()
        warm = a.warmup_steps

        def lr_lambda(step):
            # transformers' schedules: the warm-up rises linearly from 0 (the first step's
            # learning rate is 0) to 1 at step ``warm``
            if warm and step < warm:
                return step / warm
            if a.lr_scheduler_type == "constant":
                return 1.0
            frac = min(1.0, (step - warm) / max(1, total - warm))
            if a.lr_scheduler_type == "linear":
                return 1.0 - frac
            return 0.5 * (1.0 + math.cos(math.pi * frac))

        self.optimizer = opt
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    @property
    def fsdp(self) -> bool:
        """Whether the models are sharded with FSDP2 (``fsdp=True`` and several processes)."""
        return self.args.fsdp and self.world_size > 1

    def _wrap_distributed(self, module, runs=None):
        """``module`` wrapped for several processes: in DDP, or with ``fsdp`` sharded with
        FSDP2 (:meth:`_fully_shard`).  ``runs``: the module whose forward ``module``'s
        forward runs (``module`` itself when None), what :meth:`_root` maps to ``module``."""
        if self.world_size == 1:
            return module
        if self.args.fsdp:
            return self._fully_shard(module, runs)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    def _fully_shard(self, module, runs=None):
        """Shard ``module`` with FSDP2 in place: ``fully_shard`` on each decoder layer (the
        classes named by the models' ``_no_split_modules``), then on ``module`` (the root:
        embeddings, final norm, lm_head, heads).  Parameters become DTensors; every forward
        of the model must go through ``module``'s forward (see :meth:`_root`)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if self._mesh is None:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)      # the mesh's device is the current one
            self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        layer_names = set()
        for m in module.modules():
            layer_names.update(getattr(m, "_no_split_modules", None) or ())
        for m in list(module.modules()):
            if m is not module and type(m).__name__ in layer_names:
                fully_shard(m, mesh=self._mesh)
        fully_shard(module, mesh=self._mesh)
        self._fsdp_roots[id(module if runs is None else runs)] = module
        return module

    def _root(self, module):
        """The module to call for ``module``'s forward: under FSDP2 its sharded root (a
        causal LM's :class:`_LogprobModule`), else ``module`` itself."""
        return self._fsdp_roots.get(id(module), module)

    def full_model(self):
        """The trained policy as a plain module: ``self.model``, or under FSDP2 a new
        instance of its class holding the gathered full parameters (a collective: every
        process calls it)."""
        if not self.fsdp:
            return self.model
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        plain = type(self.model)(self.model.config)
        dtype = next(iter(sd.values())).dtype
        plain.load_state_dict(_fill_aliases(plain, sd))
        return plain.to(device=self.device, dtype=dtype).train(self.model.training)

    def _reshard(self, module):
        """Free the root's gathered parameters after a forward without backward (FSDP2
        keeps the root's parameters gathered after forward, expecting a backward)."""
        if not self.fsdp:
            return
        from torch.distributed.fsdp import FSDPModule

        if isinstance(module, FSDPModule) and not torch.is_grad_enabled():
            module.reshard()

    def total_steps(self) -> int:
        """``max_steps``, or with ``max_steps=-1`` the steps of ``num_train_epochs`` epochs.
        An epoch is one seeded permutation of the dataset taken a round at a time
        (``_items_per_round() * world_size`` rows); the rows that do not fill a last round
        are dropped (``drop_last``), so an epoch is ``len(train_dataset) // round size``
        rounds, every row seen at most once.  Fractional epochs round up to whole rounds."""
        a = self.args
        if a.max_steps > 0:
            return a.max_steps
        per_epoch = len(self.train_dataset) // (self._items_per_round() * self.world_size)
        rounds = math.ceil(a.num_train_epochs * per_epoch - 1e-9)
        return max(1, rounds) * self._steps_per_round()

    # -- data -----------------------------------------------------------------------
    def _next_rows(self) -> list[dict]:
        """This process's rows for the next round (a seeded permutation per epoch; every
        process draws from the same permutation, rank by rank)."""
        n = self._items_per_round()
        need = n * self.world_size
        N = len(self.train_dataset)
        if need > N:
            raise ValueError(f"train_dataset has {N} rows; one round needs {need}")
        if self.state["position"] + need > N:
            self.state["epoch"] += 1
            self.state["position"] = 0
            self._perm = None
        if self._perm is None or self._perm[0] != self.state["epoch"]:
            g = torch.Generator().manual_seed(self.args.seed + self.state["epoch"])
            self._perm = (self.state["epoch"], torch.randperm(N, generator=g).tolist())
        start = self.state["position"] + self.rank * n
        idx = self._perm[1][start:start + n]
        self.state["position"] += need
        return [self.train_dataset[i] for i in idx]

    # -- the optimizer step ---------------------------------------------------------
    def _params(self):
        """The trained parameters, each once (by identity, in module order): a value model
        built on the policy's own body shares those parameters, and listing them twice
        would step them twice per update and count their gradients twice in the norm."""
        seen, out = set(), []
        for m in self._trainable_modules().values():
            for p in m.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def _optimizer_step(self, loss_value: float, metrics: dict) -> bool:
        """Clip, check for non-finite loss / gradients (all processes agree), then step or
        skip.  Returns whether the step was taken."""
        params = self._params()
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else float("inf")
        if self.fsdp:
            # sharded gradients: the norm is a DTensor reduced over the shards
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        bad_loss = not math.isfinite(loss_value)
        bad_grad = not bool(torch.isfinite(grad_norm))
        # on the trainer's device: an NCCL group reduces device tensors only
        flags = torch.tensor([float(bad_loss), float(bad_grad)], device=self.device)
        flags = _all_reduce_sum(flags, self.world_size)
        metrics["grad_norm"] = float(grad_norm)
        if flags.sum() > 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.state["nonfinite_steps"] += 1
            metrics["skipped"] = 1
            metric = "loss" if flags[0] > 0 else "grad_norm"
            value = loss_value if flags[0] > 0 else float(grad_norm)
            n = self.state["nonfinite_steps"]
            self._print(f"step {self.state['global_step'] + 1}: non-finite {metric} ({value}); "
                        f"step skipped ({n}/{self.args.max_nonfinite_steps})")
            if n >= self.args.max_nonfinite_steps:
                last = latest_checkpoint(self.args.output_dir)
                raise NonFiniteError(
                    f"stopping at step {self.state['global_step'] + 1}: {metric} is {value} "
                    f"({n} steps with a non-finite loss or gradient norm, "
                    f"max_nonfinite_steps={self.args.max_nonfinite_steps}); last good "
                    f"checkpoint: {last or 'none'}")
            self.scheduler.step()
            return False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["skipped"] = 0
        return True

    # -- micro-batches and rounds --------------------------------------------------
    def _ddp_modules(self) -> list:
        """Modules whose gradient all-reduce (DDP) or reduce-scatter (FSDP2) waits for the
        last micro-batch."""
        return [m for m in (getattr(self, "policy", None), getattr(self, "value", None))
                if m is not None and (hasattr(m, "no_sync")
                                      or hasattr(m, "set_requires_gradient_sync"))]

    def _sync_gradients(self, stack, sync: bool):
        """Synchronise gradients in this micro-batch's backward only when ``sync``."""
        for m in self._ddp_modules():
            if hasattr(m, "no_sync"):
                if not sync:
                    stack.enter_context(m.no_sync())
            else:
                m.set_requires_gradient_sync(sync)

    def _global_tokens(self, mask) -> float:
        """Completion tokens of this round over every process (global normalisation)."""
        n = mask.sum().to(torch.float64).reshape(1)
        return float(_all_reduce_sum(n, self.world_size))

    def micro_batch_loss(self, mb, global_tokens: float):
        raise NotImplementedError

    def accumulate_gradients(self, r) -> tuple[float, dict]:
        """Forward/backward over the micro-batches of ``r`` (``per_device_train_batch_size``
        rows each; DDP synchronises on the last); returns (summed loss, stats averaged over
        micro-batches).  Gradients are left in ``.grad``."""
        mb = self.args.per_device_train_batch_size
        n = len(r.prompts)
        global_tokens = self._global_tokens(r.completion_mask)
        total, acc = 0.0, {}
        starts = list(range(0, n, mb))
        for k, i in enumerate(starts):
            with contextlib.ExitStack() as stack:
                self._sync_gradients(stack, k == len(starts) - 1)
                loss, stats = self.micro_batch_loss(r.select(slice(i, i + mb)), global_tokens)
                t0 = time.perf_counter()
                loss.backward()
                self._time("backward", t0)
            total += float(loss.detach())
            for key, v in stats.items():
                acc[key] = acc.get(key, 0.0) + float(v) / len(starts)
        return total, acc

    def make_rollout(self, rows) -> "Rollout":
        raise NotImplementedError

    def _round_metrics(self, r, loss, stats, metrics, t_round) -> dict:
        raise NotImplementedError

    def _train_round(self):
        """Generate and score one rollout, then make ``_steps_per_round()`` optimizer steps
        over it."""
        t_round = time.perf_counter()
        r = self.make_rollout(self._next_rows())
        out = []
        for _ in range(self._steps_per_round()):
            if self.state["global_step"] >= self._total:
                break
            loss, stats = self.accumulate_gradients(r)
            metrics = {"step": self.state["global_step"] + 1}
            t0 = time.perf_counter()
            self._optimizer_step(loss, metrics)
            self._time("optimizer", t0)
            self.state["global_step"] += 1
            out.append(self._round_metrics(r, loss, stats, metrics, t_round))
        return out

    # -- generation -----------------------------------------------------------------
    def _all_done(self, local_done: bool) -> bool:
        flag = torch.tensor([0.0 if local_done else 1.0], device=self.device)
        return float(_all_reduce_sum(flag, self.world_size)) == 0.0

    def _unwrap(self, m):
        return m.module if hasattr(m, "module") and not hasattr(m, "generate") else m

    @torch.no_grad()
    def generate(self, prompts: list, num_per_prompt: int = 1) -> Rollout:
        """Sample completions (``generate`` with the KV cache and the config's sampling
        parameters) for each prompt, ``num_per_prompt`` times, in prompt order."""
        a = self.args
        tok = self.tokenizer
        t0 = time.perf_counter()
        p_ids, p_mask = encode_prompts(tok, prompts, a.max_prompt_length, self.device)
        model = self.model
        was = model.training
        model.eval()
        root = self._root(model)
        if getattr(a, "generation_backend", "hf") == "rlfuse" and supports_lean_sampling(model):
            # each prompt is encoded once; the sampler repeats its KV cache for the samples
            kw = dict(num_samples=num_per_prompt, max_new_tokens=a.max_completion_length,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      temperature=a.temperature, top_p=a.top_p, top_k=a.top_k or 0)
            if root is model:
                out = lean_sample(model, p_ids, p_mask, **kw)
            else:
                # FSDP2: every process runs a forward per token until all are done (the
                # layers' all-gathers are collectives), inside the root's forward
                out = root(p_ids, p_mask, sample_kwargs=dict(kw, all_done=self._all_done))
                self._reshard(root)
            p_ids = p_ids.repeat_interleave(num_per_prompt, 0)
            p_mask = p_mask.repeat_interleave(num_per_prompt, 0)
        else:
            p_ids = p_ids.repeat_interleave(num_per_prompt, 0)
            p_mask = p_mask.repeat_interleave(num_per_prompt, 0)
            kw = dict(do_sample=True, temperature=a.temperature, top_p=a.top_p,
                      top_k=a.top_k or 0, max_new_tokens=a.max_completion_length,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            if root is model:
                out = model.generate(input_ids=p_ids, attention_mask=p_mask, **kw)
            else:
                out = root(p_ids, p_mask, generate_kwargs=dict(kw, synced_gpus=True))
                self._reshard(root)
        model.train(was)
        c_ids = out[:, p_ids.size(1):]
        c_mask, truncated = completion_mask_from_ids(c_ids, tok.eos_token_id, tok.pad_token_id)
        c_ids = torch.where(c_mask.bool(), c_ids, torch.full_like(c_ids, tok.pad_token_id))
        if a.mask_truncated_completions:
            c_mask = c_mask * (~truncated).long().unsqueeze(1)
        texts = tok.batch_decode(c_ids, skip_special_tokens=True)
        rep = [p for p in prompts for _ in range(num_per_prompt)]
        r = Rollout(p_ids, p_mask, c_ids, c_mask, rep, texts)
        r.extra["truncated"] = truncated
        self._time("generate", t0)
        return r

    def completion_logprobs(self, module, r: Rollout, *, return_entropy=False):
        """Per-token log-probs ``[B, C]`` (and entropies) of the completion tokens under
        ``module`` (a causal LM or its DDP-wrapped :class:`_LogprobModule`)."""
        ids = r.input_ids
        attn = r.attention_mask
        P = r.prompt_ids.size(1)
        comp = torch.cat([torch.zeros_like(r.prompt_mask), r.completion_mask], 1)
        module = self._root(module)
        if not isinstance(module, torch.nn.Module) or not isinstance(
                getattr(module, "module", module), _LogprobModule):
            module = _LogprobModule(module)
        share = getattr(self.args, "share_prompt_prefix", False)
        # split at P inside the module (positions are counted there over real tokens)
        res = module(ids, attn, comp, None, self.args.temperature, return_entropy,
                     prompt_length=P, share_prompts=share)
        self._reshard(module)
        return res

    def batched_logprobs(self, model, r):
        """Completion log-probs of every row of ``r`` under ``model`` (micro-batched)."""
        mb = self.args.per_device_train_batch_size
        outs = [self.completion_logprobs(model, r.select(slice(i, i + mb)))
                for i in range(0, len(r.prompts), mb)]
        C = r.completion_ids.size(1)
        return torch.cat([o[:, :C] for o in outs], 0)

    # -- scoring --------------------------------------------------------------------
    def score(self, r: Rollout):
        t0 = time.perf_counter()
        weights = self.args.reward_weights or [1.0] * len(self.reward_funcs)
        total, per_func, n_none = score_completions(
            self.reward_funcs, weights, r.prompts, r.completions, r.columns,
            step=self.state["global_step"] + 1)
        self._time("reward", t0)
        return total, per_func, n_none

    # -- timing / logging -----------------------------------------------------------
    def _time(self, key, t0):
        self.timers[key] = self.timers.get(key, 0.0) + time.perf_counter() - t0

    def _print(self, msg):
        if self.rank == 0:
            print(msg, flush=True)

    def _metrics_path(self):
        return os.path.join(self.args.output_dir, "metrics.jsonl")

    def _logging_dir(self):
        return self.args.logging_dir or os.path.join(self.args.output_dir, "runs")

    def _open_writers(self):
        """Rank 0: a TensorBoard ``SummaryWriter`` in ``logging_dir`` when ``report_to``
        asks for it.  On resume, events after the checkpoint's step are purged (they belong
        to the interrupted run, as the dropped JSONL lines do)."""
        if self.rank != 0 or "tensorboard" not in report_integrations(self.args.report_to):
            return
        from torch.utils.tensorboard import SummaryWriter

        step = self.state["global_step"]
        self._tb_writer = SummaryWriter(log_dir=self._logging_dir(),
                                        purge_step=step + 1 if step > 0 else None)

    def _close_writers(self):
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None

    def _log(self, metrics: dict):
        self._log_history.append(metrics)
        if self.rank != 0:
            return
        with open(self._metrics_path(), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self._tb_writer is not None:
            for key, v in metrics.items():
                if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb_writer.add_scalar(key, v, global_step=metrics["step"])
            self._tb_writer.flush()
        if self.args.progress and metrics["step"] % self.args.logging_steps == 0:
            total = self._total
            parts = [f"step {metrics['step']}/{total}"]
            for key, fmt in (("reward", "{:.3f}"), ("kl", "{:.4f}"), ("entropy", "{:.3f}"),
                             ("loss", "{:.4f}"), ("tokens_per_s", "{:.0f}")):
                if key in metrics:
                    parts.append(f"{key} " + fmt.format(metrics[key]))
            bar_w = 20
            done = int(bar_w * metrics["step"] / max(total, 1))
            print(f"[{'#' * done}{'.' * (bar_w - done)}] " + " | ".join(parts), flush=True)

    def plot(self, path=None):
        """PNG of the logged curves (reward, KL, entropy, loss, ...) in output_dir."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = self._read_metrics()
        keys = [k for k in ("reward", "kl", "entropy", "loss", "value_loss", "accuracy",
                            "completion_length", "grad_norm")
                if any(k in h for h in hist)]
        if not hist or not keys:
            return None
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
        axes = [axes] if len(keys) == 1 else list(axes)
        for ax, k in zip(axes, keys):
            pts = [(h["step"], h[k]) for h in hist if k in h]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_title(k)
            ax.set_xlabel("step")
        fig.suptitle(f"rlfuse {self.algorithm}")
        fig.tight_layout()
        path = path or os.path.join(self.args.output_dir, "training_curves.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path

    def _read_metrics(self):
        """The lines of metrics.jsonl.  A final line that does not parse (torn by a kill or
        a full disk during the append) is skipped with a warning; an unparsable line
        before the last raises ``ValueError`` naming the file and line."""
        p = self._metrics_path()
        if not os.path.exists(p):
            return []
        with open(p) as f:
            lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
        out = []
        for k, (i, line) in enumerate(lines):
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                if k == len(lines) - 1:
                    import warnings

                    warnings.warn(f"{p}: skipping its last line ({i}), which is not complete "
                                  f"JSON (a write cut short): {line.strip()[:80]!r}",
                                  RuntimeWarning, stacklevel=2)
                    break
                raise ValueError(f"{p}: line {i} is not valid JSON ({exc})") from None
        return out

    def _write_metrics(self, hist):
        """Replace metrics.jsonl with ``hist`` atomically (a temporary file, fsynced, then
        ``os.replace``): a kill leaves either the old file or the new one."""
        p = self._metrics_path()
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            for h in hist:
                f.write(json.dumps(h) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        _fsync_dir(os.path.dirname(p) or ".")

    # -- checkpoints ----------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write ``output_dir/checkpoint-<step>`` atomically: every file goes to a temporary
        directory, which is fsynced and renamed into place (a kill at any point leaves the
        previous checkpoints untouched and no partial ``checkpoint-*``)."""
        from safetensors.torch import save_model

        step = self.state["global_step"]
        out = self.args.output_dir
        final = os.path.join(out, f"checkpoint-{step}")
        tmp = os.path.join(out, f".tmp-checkpoint-{step}")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier(self.world_size)
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        try:
            import numpy as np

            rng["numpy"] = np.random.get_state()
        except ImportError:
            pass
        torch.save(rng, os.path.join(tmp, f"rng_state_{self.rank}.pth"))
        if self.fsdp:
            full = self._gather_full_state()          # a collective: every rank calls it
        if self.rank == 0:
            if self.fsdp:
                from safetensors.torch import save_file

                modules, opt_state = full
                for name, (module, sd) in modules.items():
                    save_file(_drop_aliases(module, sd), os.path.join(tmp, f"{name}.safetensors"))
                torch.save(opt_state, os.path.join(tmp, "optimizer.pt"))
            else:
                for name, module in self._trainable_modules().items():
                    save_model(self._unwrap(module), os.path.join(tmp, f"{name}.safetensors"))
                torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            torch.save(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            self._save_extra(tmp)
            state = dict(self.state, world_size=self.world_size, fsdp=self.fsdp,
                         algorithm=self.algorithm, dataset_size=len(self.train_dataset),
                         config=self.args.to_dict())
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f, indent=1)
        _barrier(self.world_size)
        if self.rank == 0:
            _fsync_tree(tmp)
            old = os.path.join(out, f".del-checkpoint-{step}")
            replacing = os.path.exists(final)
            if replacing:
                # renamed away, not deleted in place: a kill never leaves a partial
                # checkpoint-N (between the renames, clean_partial_checkpoints promotes tmp)
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(out)
            if replacing:
                shutil.rmtree(old, ignore_errors=True)
            self._rotate_checkpoints()
        _barrier(self.world_size)
        return final

    def _gather_full_state(self):
        """FSDP2: the full (unsharded) state dicts of the trained modules and of the
        optimizer (keys: parameter names, prefixed by the module's name), on rank 0's CPU
        (empty on the other ranks)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        modules = self._trainable_modules()
        sds = {name: (m, get_model_state_dict(m, options=opts)) for name, m in modules.items()}
        opt_state = get_optimizer_state_dict(torch.nn.ModuleDict(modules), self.optimizer,
                                             options=opts)
        return sds, opt_state

    def _load_full_state(self, path):
        """FSDP2: load the full state dicts written by :meth:`_gather_full_state` (every
        rank reads the files and keeps its shards)."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        modules = self._trainable_modules()
        for name, m in modules.items():
            sd = _fill_aliases(m, load_file(os.path.join(path, f"{name}.safetensors")))
            set_model_state_dict(m, sd, options=opts)
        opt_state = torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)
        set_optimizer_state_dict(torch.nn.ModuleDict(modules), self.optimizer, opt_state,
                                 options=opts)

    def _save_extra(self, path):
        """Subclass hook: extra files in a checkpoint."""

    def _load_extra(self, path):
        """Subclass hook."""

    def _rotate_checkpoints(self):
        limit = self.args.save_total_limit
        if limit is None:
            return
        out = self.args.output_dir
        names = os.listdir(out)
        ckpts = sorted((int(m.group(1)), n) for n in names if (m := _CKPT.match(n)))
        for _step, name in ckpts[:-limit]:
            _remove_dir(out, name)
        for n in names:         # left by a kill during an earlier deletion
            if _DEL.match(n) and n[len(".del-"):] not in names:
                shutil.rmtree(os.path.join(out, n), ignore_errors=True)

    def _resume_fields(self) -> tuple:
        """Config fields that fix the data order and the step <-> round mapping: a
        checkpoint resumes only with the same values."""
        return ("seed", "per_device_train_batch_size", "gradient_accumulation_steps") + \
            (("disable_dropout",) if hasattr(self.args, "disable_dropout") else ())

    # Resume-checked fields that trainer_state.json records only from some version on, with
    # the value the code before then ran as: a checkpoint whose config lacks the field was
    # trained with it (before ``disable_dropout`` existed, dropout stayed on).
    _UNRECORDED_RESUME_FIELDS = {"disable_dropout": False}

    def _check_resume_compatible(self, path, state):
        algo = state.get("algorithm")
        if algo is not None and algo != self.algorithm:
            raise ConfigError(
                f"resume_from_checkpoint: {path} was written by a {algo} trainer; this is a "
                f"{self.algorithm} trainer (use another output_dir for a different algorithm)")
        cfg = state.get("config") or {}
        diffs, settings = [], []
        for k in self._resume_fields():
            now = getattr(self.args, k)
            if k in cfg:
                was, note = cfg[k], ""
            elif cfg and k in self._UNRECORDED_RESUME_FIELDS:
                was = self._UNRECORDED_RESUME_FIELDS[k]
                note = "; not recorded: the checkpoint predates the field"
            else:
                continue
            if was != now:
                diffs.append(f"{k}={was!r} (this run: {now!r}{note})")
                flag = str(was).lower() if isinstance(was, bool) else str(was)
                settings.append(f"{k}={was!r} (--{k} {flag})")
        n = state.get("dataset_size")
        if n is not None and n != len(self.train_dataset):
            diffs.append(f"train_dataset of {n} rows (this run: {len(self.train_dataset)})")
            settings.append(f"the same train_dataset ({n} rows)")
        if diffs:
            raise ConfigError(
                f"resume_from_checkpoint: {path} was written with " + ", ".join(diffs)
                + "; these fix the data order and how the steps run, so the run could not "
                "continue as the interrupted one would: to resume it pass "
                + ", ".join(settings) + ", or start a fresh run")

    def _former_default_changes(self, state) -> list:
        """``(field, checkpoint value, this run's value)`` for each field whose default
        changed to TRL's / transformers' (:data:`FORMER_DEFAULTS`) where the checkpoint ran
        with the former default and this run has the new one (what resuming a checkpoint
        written before the change with the defaults gives), and the field matters to this
        run (``num_train_epochs`` with ``max_steps=-1``, ``use_bias_correction_kl`` with
        ``beta > 0``)."""
        cfg = state.get("config") or {}
        a = self.args
        out = []
        for k, former in FORMER_DEFAULTS.items():
            if not hasattr(a, k) or k not in cfg:
                continue
            was, now = cfg[k], getattr(a, k)
            if was != former or now == was or now != field_default(type(a), k):
                continue
            if k == "num_train_epochs" and a.max_steps > 0:
                continue
            if k == "use_bias_correction_kl" and not getattr(a, "beta", 0) > 0:
                continue
            out.append((k, was, now))
        return out

    def _warn_former_defaults(self, path, state):
        """Resuming ``path`` continues with this run's config; a checkpoint written before
        the defaults changed ran with the former ones: say which differ now and how to keep
        them (a ``RuntimeWarning`` on rank 0; the resume goes on)."""
        changes = self._former_default_changes(state)
        if not changes or self.rank != 0:
            return
        import warnings

        def flag(v):
            return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

        was = ", ".join(f"{k}={w!r}" for k, w, _ in changes)
        now = ", ".join(f"{k}={n!r}" for k, _, n in changes)
        keep = ", ".join(f"{k}={w!r} (--{k} {flag(w)})" for k, w, _ in changes)
        warnings.warn(
            f"resume_from_checkpoint: {path} ran with {was}, rlfuse's former defaults; this "
            f"run has {now}, the defaults now (TRL's / transformers'), so the run goes on "
            f"with other settings than the interrupted one: to continue it as it ran pass "
            f"{keep}", RuntimeWarning, stacklevel=3)

    def _checkpoint_state(self, path) -> dict:
        """``path``'s trainer_state.json, once it is known to resume into this trainer."""
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if state.get("world_size", 1) != self.world_size:
            raise ValueError(f"checkpoint {path} was written with world_size "
                             f"{state.get('world_size')}, this run has {self.world_size}")
        self._check_resume_compatible(path, state)
        if bool(state.get("fsdp", False)) != self.fsdp:
            raise ValueError(f"checkpoint {path} was written with fsdp="
                             f"{bool(state.get('fsdp', False))}, this run has fsdp={self.fsdp} "
                             "(the optimizer states differ in layout)")
        return state

    def load_checkpoint(self, path: str):
        """Restore models, optimizer, scheduler, RNG, step and data position."""
        from safetensors.torch import load_model

        state = self._checkpoint_state(path)
        self._warn_former_defaults(path, state)
        if self.fsdp:
            self._load_full_state(path)
        else:
            for name, module in self._trainable_modules().items():
                load_model(self._unwrap(module), os.path.join(path, f"{name}.safetensors"),
                           device=str(self.device))
            self.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"),
                                                      weights_only=False))
        self.scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"),
                                                  weights_only=False))
        self._apply_optimizer_args(path)
        self._load_extra(path)
        rng = torch.load(os.path.join(path, f"rng_state_{self.rank}.pth"), weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "numpy" in rng:
            import numpy as np

            np.random.set_state(rng["numpy"])
        for k in self.state:
            if k in state:
                self.state[k] = state[k]
        self._perm = None
        if self.rank == 0:
            self._abandon_newer_checkpoints(path)
        # metrics after the checkpoint belong to the interrupted run: drop them
        if self.rank == 0 and os.path.exists(self._metrics_path()):
            keep = [h for h in self._read_metrics() if h.get("step", 0) <= self.state["global_step"]]
            self._write_metrics(keep)

    def _abandon_newer_checkpoints(self, path):
        """Resuming ``output_dir/checkpoint-K`` while ``output_dir`` holds newer
        ``checkpoint-M`` (M > K) starts a new branch of the run from step K: the newer
        checkpoints belong to the abandoned branch.  Left in place, rotation by step number
        would delete the new branch's checkpoints before them and a later
        ``resume_from_checkpoint=True`` would pick the abandoned branch's newest.  They are
        moved (renamed, nothing is deleted) into ``output_dir/abandoned-from-step-K[-n]/``
        with the abandoned branch's lines of metrics.jsonl (steps > K) as its
        ``metrics.jsonl``; the caller then drops those lines from ``output_dir``'s
        metrics.jsonl.  Kill-safe: the metrics are copied first (atomically), then the
        checkpoints are moved newest first, each rename atomic, so after a kill every
        ``checkpoint-*`` left is whole, and running the same resume again moves the rest.
        A warning names the directory."""
        out = self.args.output_dir
        if os.path.realpath(os.path.dirname(os.path.abspath(path))) != os.path.realpath(out):
            return
        m = _CKPT.match(os.path.basename(os.path.normpath(path)))
        if m is None:
            return
        k = int(m.group(1))
        newer = sorted(((int(mm.group(1)), n) for n in os.listdir(out)
                        if (mm := _CKPT.match(n)) and int(mm.group(1)) > k), reverse=True)
        if not newer:
            return
        base = os.path.join(out, f"abandoned-from-step-{k}")
        dest, i = base, 1
        while os.path.exists(dest):
            i += 1
            dest = f"{base}-{i}"
        os.makedirs(dest)
        dropped = [h for h in self._read_metrics() if h.get("step", 0) > k]
        if dropped:
            tmp = os.path.join(dest, "metrics.jsonl.tmp")
            with open(tmp, "w") as f:
                for h in dropped:
                    f.write(json.dumps(h) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(dest, "metrics.jsonl"))
            _fsync_dir(dest)
        for _step, name in newer:
            os.rename(os.path.join(out, name), os.path.join(dest, name))
        _fsync_dir(out)
        import warnings

        warnings.warn(
            f"resume_from_checkpoint: {path} is not the newest checkpoint of {out!r}; the "
            f"run goes on from step {k} and the newer checkpoints "
            f"({', '.join(n for _s, n in reversed(newer))}) and their metrics.jsonl lines "
            f"were moved to {dest} (delete it when it is not needed)",
            RuntimeWarning, stacklevel=3)

    def _apply_optimizer_args(self, path):
        """After loading ``path``'s optimizer and scheduler (which restore the values the
        checkpoint ran with), set this run's ``learning_rate``, ``weight_decay``,
        ``adam_beta1/2`` and ``adam_epsilon`` in every parameter group and the schedule's
        base learning rate, so the schedule continues from the restored step with this
        run's values (and the next checkpoint's optimizer.pt agrees with its
        trainer_state.json).  A ``RuntimeWarning`` (rank 0) names what changed."""
        a = self.args
        want = {"lr": float(a.learning_rate), "weight_decay": float(a.weight_decay),
                "betas": (float(a.adam_beta1), float(a.adam_beta2)), "eps": float(a.adam_epsilon)}
        names = {"lr": "learning_rate", "weight_decay": "weight_decay",
                 "betas": "(adam_beta1, adam_beta2)", "eps": "adam_epsilon"}
        sched = self.scheduler
        changed = {}
        base_lrs = list(sched.base_lrs)
        for i, g in enumerate(self.optimizer.param_groups):
            was_base = base_lrs[i] if i < len(base_lrs) else g.get("initial_lr", g["lr"])
            if was_base != want["lr"]:
                changed.setdefault("lr", (was_base, want["lr"]))
            for k in ("weight_decay", "betas", "eps"):
                was = tuple(g[k]) if k == "betas" else g[k]
                if was != want[k]:
                    changed.setdefault(k, (was, want[k]))
        if not changed:
            return
        for i, g in enumerate(self.optimizer.param_groups):
            g["weight_decay"] = want["weight_decay"]
            g["betas"] = want["betas"]
            g["eps"] = want["eps"]
            if "lr" in changed:
                g["initial_lr"] = want["lr"]
                if i < len(base_lrs):
                    base_lrs[i] = want["lr"]
                # what LambdaLR computes at the restored step, with the new base
                g["lr"] = want["lr"] * sched.lr_lambdas[i](sched.last_epoch)
        if "lr" in changed:
            sched.base_lrs = base_lrs
            sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.rank == 0:
            import warnings

            what = ", ".join(f"{names[k]} {w!r} -> {n!r}" for k, (w, n) in changed.items())
            warnings.warn(
                f"resume_from_checkpoint: {path} ran with other optimizer settings than this "
                f"run ({what}); the optimizer continues with this run's values (the "
                f"learning-rate schedule goes on from step {sched.last_epoch} with the new "
                "base learning rate)", RuntimeWarning, stacklevel=3)

    # -- the loop -------------------------------------------------------------------
    def _seed_everything(self):
        seed = self.args.seed + self.rank
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % 2**32)
        except ImportError:
            pass

    def _start_fresh(self, resuming: str | None = None):
        """A fresh run, or one resumed from a checkpoint of another directory
        (``resuming``): refuse an output_dir holding an earlier run's checkpoints unless
        ``overwrite_output_dir`` (then delete them), and drop the old metrics.jsonl.
        Rank 0 decides (every process raises the same error)."""
        a = self.args
        err = None
        if self.rank == 0:
            try:
                stale = check_output_dir(a.output_dir, a.overwrite_output_dir, resuming)
                self._refuse_deleting_sources(stale, resuming)
            except Exception as exc:      # noqa: BLE001 (every rank must learn of it)
                err, stale = exc, []
        flag = torch.tensor([1.0 if err is not None else 0.0], device=self.device)
        if float(_all_reduce_sum(flag, self.world_size)) > 0:
            raise err if err is not None else ConfigError(
                f"output_dir: {a.output_dir!r} already holds checkpoints of an earlier run "
                "(see rank 0's error)")
        if self.rank == 0:
            for name in stale:
                _remove_dir(a.output_dir, name)
            if os.path.exists(self._metrics_path()):
                os.remove(self._metrics_path())
        _barrier(self.world_size)

    def _refuse_deleting_sources(self, stale: list, resuming: str | None = None) -> None:
        """overwrite_output_dir deletes the earlier run's checkpoints: not one that holds
        the model, reference, value model or tokenizer this run was loaded from, or the
        checkpoint it resumes from (``resuming``)."""
        if not stale:
            return
        doomed = [os.path.realpath(os.path.join(self.args.output_dir, n)) for n in stale]
        sources = []
        for name in ("model", "ref_model", "value_model", "tokenizer"):
            obj = getattr(self, name, None)
            src = getattr(obj, "name_or_path", None) or \
                getattr(getattr(obj, "config", None), "_name_or_path", None)
            sources.append((f"{name} this run was loaded from", src))
        sources.append(("checkpoint this run resumes from", resuming))
        for what, src in sources:
            if not isinstance(src, str) or not src or not os.path.exists(src):
                continue
            real = os.path.realpath(src)
            for d in doomed:
                if real == d or real.startswith(d + os.sep):
                    raise ConfigError(
                        f"output_dir: overwrite_output_dir would delete {d}, which holds the "
                        f"{what} ({src!r}); copy it elsewhere or use another output_dir")

    def train(self, resume_from_checkpoint=None) -> dict:
        """Run to ``max_steps`` (or ``num_train_epochs``).  ``resume_from_checkpoint``:
        a checkpoint path, or True for the latest complete one in ``output_dir`` (a fresh
        start when there is none)."""
        a = self.args
        if self.rank == 0:
            os.makedirs(a.output_dir, exist_ok=True)
            for what in clean_partial_checkpoints(a.output_dir):
                self._print(f"{a.output_dir}: cleaned up {what} (left by an interrupted run)")
        _barrier(self.world_size)
        self._seed_everything()
        self._total = self.total_steps()
        ckpt = None
        if resume_from_checkpoint is True:
            ckpt = latest_checkpoint(a.output_dir)
        elif resume_from_checkpoint:
            ckpt = str(resume_from_checkpoint)
        if ckpt is not None:
            if os.path.realpath(os.path.dirname(os.path.abspath(ckpt))) != \
                    os.path.realpath(a.output_dir):
                # another directory's checkpoint: output_dir gets the fresh-run rule, once
                # the checkpoint is known to fit (nothing is deleted for one that does not)
                self._checkpoint_state(ckpt)
                self._start_fresh(resuming=ckpt)
            self.load_checkpoint(ckpt)
            self._print(f"resumed from {ckpt} at step {self.state['global_step']}")
        else:
            self._start_fresh()
        t_start = time.perf_counter()
        self._open_writers()
        try:
            while self.state["global_step"] < self._total:
                before = self.state["global_step"]
                for m in self._train_round():
                    self._log(m)
                self.state["rounds"] += 1
                after = self.state["global_step"]
                if a.save_steps and (after // a.save_steps > before // a.save_steps):
                    self.save_checkpoint()
            if a.save_steps and latest_checkpoint(a.output_dir) != os.path.join(
                    a.output_dir, f"checkpoint-{self.state['global_step']}"):
                self.save_checkpoint()
        finally:
            self._close_writers()
        if self.rank == 0 and a.plot:
            self.plot()
        return {"global_step": self.state["global_step"],
                "train_runtime": time.perf_counter() - t_start,
                "nonfinite_steps": self.state["nonfinite_steps"], "timers": dict(self.timers)}
