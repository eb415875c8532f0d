"""Bad text values in the dataset are rejected before any model is loaded, naming the row
and column ("/nonexistent" is never opened)."""
import pytest

from rlfuse.trainers import DPOConfig, DPOTrainer, GRPOTrainer
from tests.trainers.conftest import small_grpo_config


def _rows(n=8):
    return [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "x"} for i in range(n)]


@pytest.mark.parametrize("value, match", [
    ([{"role": "user", "content": "1+1="}], "row 3, column 'prompt': must be a string, got "
                                            "list \\(conversational"),
    (None, "row 3, column 'prompt': must be a string, got NoneType"),
    (7, "row 3, column 'prompt': must be a string, got int"),
])
def test_grpo_bad_prompt_names_the_row(tmp_path, value, match):
    rows = _rows()
    rows[3] = dict(rows[3], prompt=value)
    with pytest.raises(TypeError, match=match):
        GRPOTrainer("/nonexistent", lambda **kw: [], args=small_grpo_config(tmp_path),
                    train_dataset=rows)


def test_dpo_bad_rejected_and_missing_column(tmp_path):
    rows = _rows()
    rows[6] = dict(rows[6], rejected=None)
    cfg = DPOConfig(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(TypeError, match="row 6, column 'rejected'"):
        DPOTrainer("/nonexistent", "/nonexistent", args=cfg, train_dataset=rows)
    rows = _rows()
    del rows[2]["chosen"]
    with pytest.raises(ValueError, match="row 2 has no column 'chosen'"):
        DPOTrainer("/nonexistent", "/nonexistent", args=cfg, train_dataset=rows)


def test_datasets_dataset_is_checked_by_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _rows()
    rows[4] = dict(rows[4], prompt=None)
    ds = datasets.Dataset.from_list(rows)
    with pytest.raises(TypeError, match="row 4, column 'prompt'"):
        GRPOTrainer("/nonexistent", lambda **kw: [], args=small_grpo_config(tmp_path),
                    train_dataset=ds)
