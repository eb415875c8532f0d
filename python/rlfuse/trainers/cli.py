"""``rlfuse train grpo|ppo|dpo [--config FILE.yaml] [--model PATH] [--resume] [--field value ...]``.

Without ``--model`` the embedded default runs (tiny model, synthetic task, warm-up, RL,
accuracy table); with ``--model`` the same task runs on that model (no warm-up unless
``--sft-steps`` is given).  Any config field can be set as ``--name value`` (or
``--name=value``); values are converted to the field's type and the config is validated
before any model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub):
    p = sub.add_parser("train", help="train with GRPO, PPO or DPO (default: the embedded demo)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("algorithm", choices=["grpo", "ppo", "dpo"])
    p.add_argument("--config", help="YAML file of config fields")
    p.add_argument("--model", help="path or name of a Hugging Face causal LM")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in output_dir")
    p.add_argument("--task", choices=["addition", "chain"], help="synthetic task (default addition)")
    p.add_argument("--sft-steps", type=int, help="supervised warm-up steps")
    p.add_argument("--hidden-size", type=int, help="tiny model width")
    p.add_argument("--eval-size", type=int, help="held-out problems")
    p.set_defaults(func=main, parse_unknown=True)
    return p


def parse_fields(config_class, extra: list[str]) -> dict:
    """``--name value`` / ``--name=value`` pairs -> {field: typed value}."""
    from rlfuse.trainers.config import ConfigError

    out, i = {}, 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r} (expected --field value)")
        name = tok[2:]
        if "=" in name:
            name, text = name.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"--{name} needs a value")
            text = extra[i + 1]
            i += 2
        name = name.replace("-", "_")
        out[name] = config_class.parse_value(name, text)
    return out


def main(args, extra) -> int:
    from rlfuse.trainers.config import ConfigError

    try:
        return _main(args, extra)
    except ConfigError as exc:
        print(f"rlfuse train: error: {exc}", file=sys.stderr)
        return 2


def _main(args, extra) -> int:
    from rlfuse.trainers import default

    cls = default.CONFIGS[args.algorithm]
    overrides = {}
    if args.config:
        from rlfuse.trainers.config import load_yaml_fields

        overrides.update(load_yaml_fields(args.config, "--config"))
    overrides.update(parse_fields(cls, extra))
    demo = {}
    for key in ("task", "sft_steps", "hidden_size", "eval_size"):
        v = getattr(args, key)
        if v is not None:
            demo[key] = v
    if args.model and "sft_steps" not in demo:
        demo["sft_steps"] = 0
    default.run(args.algorithm, overrides, model_path=args.model, resume=args.resume, demo=demo)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun the work is done (checkpoints and metrics written and synced, the
        # process group destroyed), but the interpreter's teardown can still abort in
        # gloo's threads (torch 2.13, about one run in 30), which torchrun reports as a
        # failed run: leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
