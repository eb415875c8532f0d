"""The tiny local tokenizer/model and the synthetic tasks."""

import random

import pytest
import torch

from rlfuse import tasks
from rlfuse.models.tiny import CHARACTERS, tiny_causal_lm, tiny_tokenizer


def test_tokenizer_round_trip_and_specials():
    tok = tiny_tokenizer()
    text = "17+5=22\n22-8=14\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(set(CHARACTERS)) == len(CHARACTERS)
    assert len(tok) == 4 + len(CHARACTERS)
    assert tok(["ab", "abcd"], padding=True)["attention_mask"][0] == [0, 0, 1, 1, 1]
    assert tok("é")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]
    with pytest.raises(ValueError, match="padding_side"):
        tiny_tokenizer(padding_side="middle")


def test_model_is_seeded_and_saves(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = tiny_tokenizer()
    state = torch.random.get_rng_state()
    a, b = tiny_causal_lm(tok, seed=3), tiny_causal_lm(tok, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = tiny_causal_lm(tok, seed=4)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    a.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    a2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok2(["12+3="], return_tensors="pt")
    torch.testing.assert_close(a2(**ids).logits, a(**ids).logits)
    out = a2.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids["input_ids"].shape[1] + 4) or out[0, -1] == tok.eos_token_id
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_causal_lm(tok, hidden_size=30, num_heads=4)


def test_tasks_are_right_and_reproducible():
    add = tasks.AdditionTask(digits=3)
    data = add.dataset(50, seed=1)
    assert data == add.dataset(50, seed=1) and data != add.dataset(50, seed=2)
    for ex in data:
        a, b = ex["prompt"][:-1].split("+")
        assert int(ex["answer"]) == int(a) + int(b) == int(ex["solution"])
    chain = tasks.ChainTask(terms=4, max_operand=30)
    for ex in chain.dataset(50, seed=0):
        # the prompt evaluated left to right gives the answer, and every line is a true step
        assert eval(ex["prompt"][:-1]) == int(ex["answer"])  # noqa: S307 (our own digits and +-)
        steps = chain.steps(ex["solution"])
        assert len(steps) == 3 and "".join(steps) == ex["solution"]
        for s in steps:
            lhs, rhs = s.strip().split("=")
            assert eval(lhs) == int(rhs)  # noqa: S307
        assert chain.is_correct(ex["solution"], ex["answer"])
    assert tasks.extract_answer("3+4=7\n7-9=-2\n") == -2
    assert tasks.extract_answer("85 ") == 85 and tasks.extract_answer("85<eos>") is None
    assert tasks.extract_answer("abc") is None
    assert add.reward(["1+1="] * 3, ["2", "3", ""], ["2", "2", "2"]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="answer"):
        add.reward(["1+1="], ["2", "2"], ["2"])
    with pytest.raises(ValueError, match="terms"):
        tasks.ChainTask(terms=1)
    with pytest.raises(ValueError, match="task must be"):
        tasks.make_task("chess")
    assert isinstance(tasks.make_task("chain", terms=3), tasks.ChainTask)
    rng = random.Random(0)
    assert add.example(rng) != add.example(rng)
