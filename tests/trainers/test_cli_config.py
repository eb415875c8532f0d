"""Command-line and YAML config errors: a ConfigError naming the argument, exit status 2,
no traceback; list fields parse."""
import os
import re

import pytest

from rlfuse.trainers import ConfigError, GRPOConfig, PPOConfig


@pytest.mark.parametrize("text, what", [
    ("- a\n- b\n", "must hold a mapping"),
    ("max_steps: [1\n", "not valid YAML"),
    ("1: 2\n", "not field names"),
    (None, "cannot read"),
])
def test_cli_bad_config_file(tmp_path, capsys, text, what):
    from rlfuse.cli import main

    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["train", "grpo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and what in err, err
    with pytest.raises(ConfigError, match=what):
        GRPOConfig.from_yaml(str(path))


def test_empty_config_file_gives_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert GRPOConfig.from_yaml(str(path), report_to="none") == GRPOConfig(report_to="none")


def test_list_fields_from_the_command_line():
    from rlfuse.trainers.cli import parse_fields

    assert parse_fields(GRPOConfig, ["--reward_weights", "[1.0, 2]"]) == {
        "reward_weights": [1.0, 2]}
    assert parse_fields(PPOConfig, ["--reward_weights=[0.5]"]) == {"reward_weights": [0.5]}
    assert parse_fields(GRPOConfig, ["--reward_weights", "none"]) == {"reward_weights": None}
    for bad in ("[1.0", "1.0", "{a: 1}"):
        with pytest.raises(ConfigError, match="reward_weights: expected a list"):
            parse_fields(GRPOConfig, ["--reward_weights", bad])


def test_cli_list_field_reaches_the_config(capsys):
    """The list passes the config's validation of reward_weights (a string would not), so
    the next check (num_generations) is the one reported."""
    from rlfuse.cli import main

    assert main(["train", "grpo", "--reward_weights", "[1.0, 2.0]",
                 "--num_generations", "3"]) == 2
    err = capsys.readouterr().err
    assert "num_generations" in err and "reward_weights" not in err, err


def test_cli_refuses_a_dir_with_checkpoints_before_the_warm_up(tmp_path, capsys):
    from rlfuse.cli import main

    out = tmp_path / "demo"
    os.makedirs(out / "checkpoint-3")
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    assert main(["train", "grpo", "--output_dir", str(out), "--sft-steps", "100000"]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "overwrite_output_dir" in err and "--resume" in err


@pytest.mark.parametrize("args, what", [
    (["--hidden-size", "30"], "hidden_size (--hidden-size) must be a positive multiple of 8"),
    (["--hidden-size", "0"], "hidden_size (--hidden-size) must be an int >= 1"),
    (["--eval-size", "-1"], "eval_size (--eval-size) must be an int >= 1"),
    (["--eval-size", "0"], "eval_size (--eval-size) must be an int >= 1"),
    (["--sft-steps", "-5"], "sft_steps (--sft-steps) must be an int >= 0"),
])
def test_cli_demo_settings_are_checked_before_anything_is_created(tmp_path, capsys, args,
                                                                  what):
    from rlfuse.cli import main

    out = tmp_path / "demo"
    assert main(["train", "grpo", "--output_dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlfuse train: error: ") and what in err and "Traceback" not in err
    assert not out.exists()


def test_demo_settings_checks():
    from rlfuse.trainers.default import DEMO, check_demo

    check_demo(dict(DEMO))
    for bad, what in ((dict(nope=1), "unknown settings"), (dict(task="chess"), "task"),
                      (dict(digits=0), "digits"), (dict(sft_batch_size=0), "sft_batch_size"),
                      (dict(sft_learning_rate=float("nan")), "sft_learning_rate"),
                      (dict(train_size=True), "train_size"), (dict(threads=-1), "threads")):
        with pytest.raises(ConfigError, match=what):
            check_demo(dict(DEMO, **bad))
    from rlfuse.trainers.default import demo_data

    # too few distinct problems for an eval set outside the training set
    with pytest.raises(ConfigError, match="eval_size.*too few distinct"):
        demo_data(dict(DEMO, digits=1, train_size=4000), 0)


def test_demo_completion_length_keeps_a_value_the_user_set():
    from rlfuse.trainers.default import completion_length

    assert completion_length(6, False, 18) == (18, None)      # the demo's own default: raised
    assert completion_length(30, False, 18) == (30, None)
    assert completion_length(30, True, 18) == (30, None)
    n, warning = completion_length(8, True, 18)
    assert n == 8 and "max_completion_length=8" in warning and "kept" in warning


def test_cli_demo_warns_when_max_completion_length_is_short(tmp_path, capsys, monkeypatch):
    """A --max_completion_length below the chain task's solutions is kept with a warning
    (stopped at the output_dir check, before the warm-up)."""
    from rlfuse.cli import main
    from rlfuse.trainers import base

    def stop(*a, **k):
        raise ConfigError("stopped before the warm-up")

    monkeypatch.setattr(base, "check_output_dir", stop)
    argv = ["train", "grpo", "--task", "chain", "--output_dir", str(tmp_path / "d")]
    assert main(argv + ["--max_completion_length", "8"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"warning: max_completion_length=8 is below the \d\d tokens", err), err
    assert "stopped before the warm-up" in err
    assert main(argv) == 2
    assert "warning" not in capsys.readouterr().err
