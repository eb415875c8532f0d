"""Command-line and YAML config errors: a ConfigError naming the argument, exit status 2,
no traceback; list fields parse."""
import os

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
