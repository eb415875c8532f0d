"""Step-level search over a real (tiny) Hugging Face model: the batched step generation
with KV reuse against full-sequence log-probs, stopping, merging, token counters, and the
search end to end on ChainTask with exports loaded the way TRL's data paths load them."""

from __future__ import annotations

import copy
import math

import datasets
import pytest
import torch

from rlfuse.models.hf import causal_lm_token_logprobs
from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlfuse.search.llm import StepSearch, beam_search, best_of_n
from rlfuse.search.llm_gen import HFStepModel, KVSlice
from rlfuse.tasks import ChainTask


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are launch-bound: one thread is faster than two, and much faster
    on a loaded 2-core runner where two OpenMP threads contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_causal_lm(tok, hidden_size=32, num_layers=2, seed=3).eval(), tok


def _full_logprob(model, ids, n):
    lp = causal_lm_token_logprobs(model, torch.tensor([ids]))
    return float(lp[0, len(ids) - n:].detach().double().sum())


def _check_candidates(model, cand_lists):
    for cands in cand_lists:
        for c in cands:
            ref = _full_logprob(model, c.state.ids, c.num_tokens)
            assert c.logprob == pytest.approx(ref, abs=2e-4), c.text


def test_steps_match_full_sequence_logprobs_through_reused_caches(tiny):
    """Candidates' log-probs equal a fresh forward over prompt + steps, for root prompts of
    different lengths (left-padded batch) and for children expanded from their parents'
    cache slices (two levels, so the slices are re-packed with other rows)."""
    model, tok = tiny
    gen = HFStepModel(model, tok, max_new_tokens=6, temperature=1.5, seed=0)
    roots = gen.root_states([0, 1, 2], ["12+3=", "1+1-4+5=", "7="])
    level1 = gen.sample_steps(roots, 3)
    _check_candidates(model, level1)
    # force some children to be delimiter-ended so they carry caches
    kids = [c.state for cs in level1 for c in cs]
    for st in kids:
        if st.kv is None:           # terminal candidates: give them a prefill path instead
            continue
        assert isinstance(st.kv, KVSlice) and st.kv.stop - st.kv.start == len(st.ids) - 1
    level2 = gen.sample_steps(kids, 2)
    _check_candidates(model, level2)
    # and the rollout path (the candidate is the first step of a full continuation); its
    # steps are capped at max_new_tokens too, so allow longer ones for this random model
    gen.max_new_tokens = 40
    rolled = gen.sample_rollouts(kids[:4], 2, max_steps=2)
    _check_candidates(model, [[c for c, _ in row] for row in rolled])
    for row, st in zip(rolled, kids[:4]):
        for c, comp in row:
            assert comp.startswith(st.completion + c.text)
            if c.tail is not None:       # sample_rollouts makes first steps as _split does
                d, r, end, n, lpc, o = c.tail
                ref = gen._split(st, (d, r, 0, n, lpc, o))
                assert (c.text, c.num_tokens, c.logprob, c.ended, c.tail) == \
                    (ref.text, ref.num_tokens, ref.logprob, ref.ended, ref.tail)
                assert (c.state.steps, c.state.ids, c.state.kv) == \
                    (ref.state.steps, ref.state.ids, ref.state.kv)
    # continuing a stored rollout: the next step, its log-prob and cache, with no sampling
    before = gen.counters.generated
    nxt = [gen.continue_tail(c.state, c.tail) for row in rolled for c, _ in row
           if c.tail is not None]
    nxt = [c for c in nxt if c is not None]
    assert gen.counters.generated == before and nxt
    _check_candidates(model, [nxt])
    _check_candidates(model, gen.sample_steps([c.state for c in nxt if c.state.kv], 2))


def test_packed_cache_mixes_sources_repeats_and_uncached_prefixes(tiny):
    """One generation batch over prefixes whose caches come from two earlier batches, a
    prefix with no cache at all (a BOS-only prompt) and per-state sample counts (0 to 3):
    the packed cache holds each slice right-aligned and repeated, finite padding, zeros
    for the uncached row, and the candidates' log-probs equal fresh forwards."""
    from rlfuse.search.llm_gen import _pack

    model, tok = tiny
    gen = HFStepModel(model, tok, max_new_tokens=5, temperature=2.0, seed=4)
    cached = []
    for p, prompt in enumerate(["12+3=", "1+1-4+5=6"]):     # two generation batches
        (root,) = gen.root_states([p], [prompt])
        d = gen._decode([root], 3, 4, gen._eos_tab)
        # children after the first 1, 2, 3 sampled tokens, holding slices of d's cache
        cached += [gen._child(root, d, r, 1 + r, True) for r in range(3)]
    assert len({id(st.kv.layers) for st in cached}) == 2
    (bos,) = gen.root_states([2], [""])
    assert bos.ids == [tok.bos_token_id] and bos.kv is None
    states = [cached[0], bos, *cached[1:]]
    reps = [2, 1] + [(i % 4) for i in range(len(cached) - 1)]
    lens = [len(st.ids) - 1 for st in states]
    C = max(lens)
    # the C++ kernel (zeros in front) and the index_select path (the first token repeated)
    for kernel in (True, False):
        packed = _pack(states, lens, C, reps, kernel=kernel)
        r = 0
        for st, n, k in zip(states, lens, reps):
            for _ in range(k):
                for li, (keys, values) in enumerate(packed):
                    for which, t in enumerate((keys, values)):
                        assert torch.isfinite(t[r]).all()
                        if n == 0:
                            assert not t[r].any()
                            continue
                        src = st.kv.layers[li][which][st.kv.row, :, st.kv.start:st.kv.stop]
                        assert torch.equal(t[r, :, C - n:], src)
                        pad = t[r, :, :C - n]
                        if kernel:
                            assert not pad.any()
                        else:
                            assert torch.equal(pad, src[:, :1].expand_as(pad))
                r += 1
        assert packed[0][0].shape[0] == r == sum(reps)
    # a slice that reaches past its cache tensor is refused, not read
    kv = cached[0].kv
    bad = copy.copy(cached[0])
    for slc in ((kv.row, kv.start + 100, kv.stop + 100), (kv.row + 100, kv.start, kv.stop),
                (kv.row, -1, kv.stop - 1)):
        bad.kv = KVSlice(kv.layers, *slc)
        with pytest.raises(RuntimeError, match="outside its cache"):
            _pack([cached[1], bad], [len(cached[1].ids) - 1, lens[0]], C, [1, 2])
    rolled = gen.sample_rollouts(states, reps, max_steps=2)
    assert [len(row) for row in rolled] == reps
    _check_candidates(model, [[c for c, _ in row] for row in rolled])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_first_cache_update_packs_as_the_packed_cache(tiny, arch, monkeypatch):
    """On the CPU a batch's prefixes are packed by the first forward's cache update,
    straight into its output (llm_gen._packed_layer_class): the decoded tokens, log-probs
    and every cache tensor equal those of packing first and letting DynamicLayer
    concatenate (the same seed), over prefixes from two earlier batches, an uncached
    prefix and per-state sample counts; a bad slice is refused from inside the forward."""
    import rlfuse.search.llm_gen as G

    if arch == "llama":
        model, tok = tiny
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = tiny_tokenizer()
        torch.manual_seed(1)
        model = Qwen2ForCausalLM(Qwen2Config(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=len(tok))).eval()
    runs = []
    real = G._deferred_cache
    for deferred in (True, False):
        gen = HFStepModel(model, tok, max_new_tokens=5, temperature=1.5, seed=9)
        used = []
        # not deferred: the same kernel packs a cache first (zeros in front, as the update)
        monkeypatch.setattr(G, "_deferred_cache",
                            lambda *a: used.append(1) or real(*a) if deferred else None)
        cached = []
        for p, prompt in enumerate(["12+3=", "1+1-4+5=6"]):
            (root,) = gen.root_states([p], [prompt])
            d = gen._decode([root], 3, 4, gen._eos_tab)
            cached += [gen._child(root, d, r, 1 + r, True) for r in range(3)]
        (bos,) = gen.root_states([2], [""])
        states = [cached[0], bos, *cached[1:]]
        reps = [2, 1, 0, 3, 1, 2, 1]
        d = gen._decode(states, reps, 6, gen._stop_tab)
        assert bool(used) == deferred
        runs.append((d.rows, d.length.tolist(), d.lp, d.layers))
    (rows1, len1, lp1, kv1), (rows2, len2, lp2, kv2) = runs
    assert rows1 == rows2 and len1 == len2 and torch.equal(lp1, lp2)
    for (k1, v1), (k2, v2) in zip(kv1, kv2):
        assert type(k1) is torch.Tensor and k1.stride(-1) == 1
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    # a slice past its cache tensor: refused when the first update packs, not read
    monkeypatch.undo()
    gen = HFStepModel(model, tok, max_new_tokens=5, temperature=1.5, seed=9)
    (root,) = gen.root_states([0], ["12+3="])
    d = gen._decode([root], 2, 4, gen._eos_tab)
    child = gen._child(root, d, 1, 2, True)
    child.kv = KVSlice(child.kv.layers, child.kv.row, child.kv.start + 50, child.kv.stop + 50)
    with pytest.raises(RuntimeError, match="outside its cache"):
        gen.sample_steps([child], 2)


def test_cached_kernel_views_are_not_trusted_for_copies(tiny):
    """A batch cache's kernel view (raw pointers, made once: llm_gen._kv_desc) is used only
    for the very tensors it was made from: a deep copy, an unpickled copy or an edited
    layer list is described afresh, so packing from it reads its own tensors."""
    import pickle

    import rlfuse.search.llm_gen as G

    model, tok = tiny
    gen = HFStepModel(model, tok, max_new_tokens=4, temperature=1.5, seed=3)
    (root,) = gen.root_states([0], ["12+3="])
    d = gen._decode([root], 2, 4, gen._eos_tab)
    layers = d.layers
    assert isinstance(layers, G._KVLayers)
    G._kv_desc(layers)
    assert layers.desc is not None
    child = gen._child(root, d, 1, 2, True)
    for copied in (copy.deepcopy(layers), pickle.loads(pickle.dumps(layers))):
        for pair in copied:                          # the copy's own values differ now
            for t in pair:
                t.mul_(2.0)
        st = copy.copy(child)
        st.kv = KVSlice(copied, *child.kv[1:])
        n = child.kv.stop - child.kv.start
        packed = G._pack_cpu([st], [n], n, [1])
        for (k, v), (k2, v2) in zip(packed, copied):
            assert torch.equal(k[0], k2[1, :, child.kv.start:child.kv.stop])
            assert torch.equal(v[0], v2[1, :, child.kv.start:child.kv.stop])
    edited = G._KVLayers(layers)
    edited.desc = layers.desc
    edited[0] = (layers[0][0] * 3, layers[0][1])
    st = copy.copy(child)
    st.kv = KVSlice(edited, *child.kv[1:])
    n = child.kv.stop - child.kv.start
    k = G._pack_cpu([st], [n], n, [1])[0][0]
    assert torch.equal(k[0], edited[0][0][1, :, child.kv.start:child.kv.stop])


def test_stop_table_narrower_than_the_logits_is_widened(tiny):
    """Stop checks index a bool table by token id; logits wider than the table (a model
    whose output layer is larger than its config says) must not index past it."""
    model, tok = tiny
    gen = HFStepModel(model, tok, max_new_tokens=6, temperature=3.0, seed=5)
    roots = gen.root_states([0, 1], ["1+2=", "3="])
    eos = tok.eos_token_id
    narrow = gen._eos_tab[:eos + 1]
    assert narrow.shape[0] < len(tok)
    d = gen._decode(roots, 8, 6, narrow)
    assert int(d.toks.max()) >= narrow.shape[0]            # ids past the narrow table
    for row, n, stopped in zip(d.rows, d.length.tolist(), d.stopped.tolist()):
        assert (eos in row[:n]) == stopped and (not stopped or row[n - 1] == eos)


@pytest.mark.parametrize("kernel", [True, False])
def test_decoded_rows_stop_at_their_length(tiny, kernel):
    """``_Decoded.rows``: each row's tokens up to its length as Python ints (the padding
    after a stop is not converted), on both decoding loops."""
    model, tok = tiny
    gen = HFStepModel(model, tok, max_new_tokens=6, temperature=1.0, seed=2)
    gen.step_kernel = kernel
    roots = gen.root_states([0, 1], ["1+2=", "3="])
    d = gen._decode(roots, [16, 16], 40, gen._stop_tab)
    lens = d.length.tolist()
    assert d.rows == [row[:n] for row, n in zip(d.toks.tolist(), lens)]
    assert all(type(t) is int for row in d.rows for t in row)
    assert any(n < d.toks.shape[1] for n in lens)          # some padding was left out


def test_kv_slice_equals_a_fresh_prefill(tiny):
    model, tok = tiny
    gen = HFStepModel(model, tok, max_new_tokens=8, temperature=2.0, seed=1)
    (root,) = gen.root_states([0], ["3+4="])
    cands = gen.sample_steps([root], 4)[0]
    fresh = HFStepModel(model, tok, kv_reuse=False)
    for c in cands:
        if c.state.kv is None:
            continue
        st = fresh.root_states([0], ["x"])[0]
        st.ids = list(c.state.ids)
        fresh._prefill([st])
        for (k1, v1), (k2, v2) in zip(c.state.kv.layers, st.kv.layers):
            a = c.state.kv
            torch.testing.assert_close(k1[a.row, :, a.start:a.stop],
                                       k2[st.kv.row, :, st.kv.start:st.kv.stop],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v1[a.row, :, a.start:a.stop],
                                       v2[st.kv.row, :, st.kv.start:st.kv.stop],
                                       rtol=1e-5, atol=1e-5)


def test_steps_stop_at_the_delimiter_and_greedy_duplicates_merge(tiny):
    model, tok = tiny
    gen = HFStepModel(model, tok, max_new_tokens=12, temperature=3.0, seed=2)
    roots = gen.root_states(list(range(4)), ["1+2=", "3-4+5=", "9=", "10+10="])
    for cands in gen.sample_steps(roots, 4):
        for c in cands:
            if c.ended == "delimiter":
                assert c.text.endswith("\n") and c.text.count("\n") == 1
                assert tok.convert_tokens_to_ids("\n") == c.state.ids[-1]
            elif c.ended == "length":
                assert c.num_tokens == 12 and "\n" not in c.text
            else:
                assert c.state.ids[-1] == tok.eos_token_id
    s = StepSearch(model, tok, reward_fn=lambda p, c: 0.0, value_fn="zero", num_candidates=3,
                   num_simulations=2, parallel=1, max_depth=2,
                   sampling=dict(temperature=0.0, max_new_tokens_per_step=4), backend="torch")
    (r,) = s.run(["5+5="])
    assert r.root_visit_counts[1:] == [0, 0]      # greedy: three identical candidates -> one
    assert len(r.children(0)) == 1


def test_prefix_reuse_halves_reencoded_tokens(tiny):
    model, tok = tiny
    task = ChainTask()
    probs = task.dataset(3, seed=5)
    s = StepSearch(model, tok, reward_fn=lambda p, c: float(task.is_correct(c, p["answer"])),
                   num_candidates=3, num_simulations=6, parallel=2, max_depth=3,
                   sampling=dict(max_new_tokens_per_step=6), backend="torch")
    res = s.run(probs)
    st = s.stats
    assert st["generated"] == sum(r.tokens_generated for r in res) > 0
    assert 2 * st["encoded"] <= st["encoded_naive"]
    assert st["model_seconds"] <= st["decode_seconds"] <= st["wall_seconds"]
    off = StepSearch(model, tok, reward_fn=lambda p, c: 0.0, num_candidates=3,
                     num_simulations=6, parallel=2, max_depth=3, kv_reuse=False,
                     sampling=dict(max_new_tokens_per_step=6), backend="torch")
    off.run(probs)
    assert off.stats["encoded"] > st["encoded"]       # every expansion re-encodes its prefix


@pytest.mark.slow
def test_end_to_end_on_chain_task_and_exports_train_the_bundled_trainers(tmp_path):
    """Warm a tiny model up on one-step sums, search, compare with the baselines, export,
    and feed the JSONL files to the bundled SFT warm-up and DPO trainer (and TRL's
    preference-data helper)."""
    import json

    from trl.data_utils import unpair_preference_dataset

    from rlfuse.search.llm_demo import compare, warmup
    from rlfuse.search.llm_export import export_jsonl
    from rlfuse.trainers.config import DPOConfig
    from rlfuse.trainers.dpo import DPOTrainer
    from rlfuse.trainers.grpo import copy_reference
    from rlfuse.trainers.sft import supervised_warmup

    torch.manual_seed(0)
    task = ChainTask(terms=2, max_operand=6)
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=64, num_layers=2, seed=0)
    losses = warmup(model, tok, task, steps=150, batch_size=32, lr=5e-3)
    assert losses[-1] < losses[0] / 4
    problems = task.dataset(8, seed=11)
    rep = compare(model, tok, task, problems, num_simulations=8, num_candidates=4, parallel=2,
                  temperature=1.5, backend="torch")
    for name in ("mcts", "best_of_n", "majority_vote", "beam"):
        assert 0.0 <= rep[name]["accuracy"] <= 1.0 and rep[name]["tokens"] > 0
    assert rep["mcts"]["accuracy"] > 0                      # the search finds right answers
    # best-of-N used at least the MCTS budget of every problem it could
    assert rep["best_of_n"]["tokens"] >= rep["mcts"]["tokens"]
    assert rep["search"]["reencode_reduction"] >= 2
    written = export_jsonl(rep["results"], str(tmp_path))
    assert written["sft"][1] > 0 and written["dpo"][1] > 0 and written["prm"][1] > 0
    load = lambda name: [json.loads(x) for x in open(written[name][0])]  # noqa: E731
    sft, dpo, prm = load("sft"), load("dpo"), load("prm")
    answer = {p["prompt"]: p["answer"] for p in problems}
    assert all(task.is_correct(r["completion"], answer[r["prompt"]]) for r in sft)
    # SFT data path: the bundled warm-up trains on the exported traces
    sft_losses = supervised_warmup(model, tok, sft, steps=2, batch_size=4, learning_rate=1e-3)
    assert len(sft_losses) == 2 and all(math.isfinite(x) for x in sft_losses)
    # DPO data path: the bundled trainer takes the pairs as they are
    tr = DPOTrainer(model, copy_reference(model),
                    args=DPOConfig(output_dir=str(tmp_path / "dpo"), learning_rate=1e-3,
                                   per_device_train_batch_size=2, max_steps=1, progress=False,
                                   plot=False, seed=0),
                    train_dataset=dpo, tokenizer=tok)
    tr.train()
    assert len(tr.ref_logps) == len(dpo)
    unpaired = unpair_preference_dataset(
        datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                    for r in dpo]))
    assert len(unpaired) == 2 * len(dpo)
    assert all(len(r["completions"]) == len(r["labels"]) == len(r["values"]) for r in prm)
    # the baselines run on their own as well
    (b,) = best_of_n(model, tok, problems[:1], reward_fn=lambda p, c: 0.0, n=2,
                     sampling=dict(max_new_tokens_per_step=8))
    assert len(b.samples) == 2
    (bm,) = beam_search(model, tok, problems[:1], reward_fn=lambda p, c: 0.0,
                        value_fn="zero", beam_width=1, num_candidates=2, max_depth=2,
                        sampling=dict(max_new_tokens_per_step=8))
    assert bm.tokens_generated > 0


def test_sampler_matches_the_tempered_nucleus_distribution():
    from rlfuse.search.llm_gen import _sample

    g = torch.Generator().manual_seed(0)
    z = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(100000, 1)
    freq = torch.bincount(_sample(z, 1.0, 1.0, g), minlength=4).double() / len(z)
    torch.testing.assert_close(freq, torch.softmax(z[0].double(), -1), atol=6e-3, rtol=0)
    # T = 2, top_p = 0.7: sorted probs .455 .276 .167 .101 -> the nucleus is the first two
    freq = torch.bincount(_sample(z, 2.0, 0.7, g), minlength=4).double() / len(z)
    p = torch.softmax(z[0].double() / 2, -1)
    want = torch.tensor([0.0, p[1], p[2], 0.0], dtype=torch.float64) / (p[1] + p[2])
    torch.testing.assert_close(freq, want, atol=6e-3, rtol=0)
    assert torch.equal(_sample(z[:3], 0.0, 1.0, g), torch.tensor([2, 2, 2]))


def test_cli_search_runs_and_writes_the_exports(tmp_path, capsys):
    import json
    import os

    from rlfuse.cli import main

    out = tmp_path / "search"
    assert main(["search", "--problems", "3", "--simulations", "4", "--candidates", "2",
                 "--parallel", "2", "--warmup-steps", "20", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("mcts", "best_of_n", "majority_vote", "beam", "re-encoded"):
        assert name in text
    assert sorted(os.listdir(out)) == ["dpo.jsonl", "prm.jsonl", "sft.jsonl", "summary.json"]
    summary = json.load(open(out / "summary.json"))
    assert summary["problems"] == 3 and summary["mcts"]["tokens"] > 0


def test_cli_search_on_the_addition_task(tmp_path, capsys):
    """`--task addition` (one-step solutions: the depth is the EOS step alone) runs to the
    end."""
    from rlfuse.cli import main

    assert main(["search", "--task", "addition", "--problems", "2", "--simulations", "2",
                 "--candidates", "2", "--parallel", "1", "--warmup-steps", "5"]) == 0
    text = capsys.readouterr().out
    assert "addition: 2 problems" in text and "mcts" in text and "beam" in text


def _arch_model(arch, vocab):
    """A tiny random model of one of several Hugging Face architectures."""
    import transformers as T

    attn = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=vocab)
    gqa = dict(attn, intermediate_size=64, num_key_value_heads=2)
    configs = {
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(n_layer=2, n_embd=32, n_head=2,
                                                 vocab_size=vocab)),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**gqa)),
        "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config(head_dim=8, **gqa)),
        "gemma": (T.GemmaForCausalLM, T.GemmaConfig(head_dim=8, **gqa)),
        # soft-capped logits and attention, a sliding window on every other layer
        "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(head_dim=8, sliding_window=4, **gqa)),
        "phi3": (T.Phi3ForCausalLM, T.Phi3Config(pad_token_id=0, **gqa)),
        "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(intermediate_size=64, **attn)),
        "opt": (T.OPTForCausalLM, T.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **attn)),
        "falcon": (T.FalconForCausalLM, T.FalconConfig(**attn)),
        "olmo2": (T.Olmo2ForCausalLM, T.Olmo2Config(**gqa)),
    }
    cls, cfg = configs[arch]
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "qwen3", "gemma", "gemma2", "phi3",
                                  "gpt_neox", "opt", "falcon", "olmo2"])
def test_other_architectures_reuse_caches_exactly(arch):
    """Other architectures through the same packed caches (learned absolute positions,
    grouped-query attention, q/k norms, parallel attention and MLP blocks, OPT's
    position offset, Gemma 2's soft-capping and sliding layers): every candidate's
    log-prob, first steps and the steps cut from rollouts of their children, equals the
    log-softmax of a fresh forward over its whole sequence."""
    tok = tiny_tokenizer()
    model = _arch_model(arch, len(tok))
    gen = HFStepModel(model, tok, max_new_tokens=40, temperature=3.0, seed=0)
    level1 = gen.sample_steps(gen.root_states([0, 1, 2], ["12+3=", "1+1-4+5=6+7=", "9="]), 8)
    kids = [c.state for cs in level1 for c in cs if c.state.kv is not None]
    assert len(kids) >= 4
    rolled = gen.sample_rollouts(kids, 2, max_steps=2)
    for cands in level1 + [[c for c, _ in row] for row in rolled]:
        for c in cands:
            ids = torch.tensor([c.state.ids])
            with torch.no_grad():
                lp = model(input_ids=ids).logits.double().log_softmax(-1)[0, :-1]
            ref = float(lp.gather(1, ids[0, 1:, None])[-c.num_tokens:].sum())
            assert c.logprob == pytest.approx(ref, abs=1e-4), (arch, c.text)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma3"])
def test_sliding_window_models_reuse_full_caches(arch):
    """A sliding window shorter than the prompts (Mistral: every layer; Qwen2: the layers
    from max_window_layers on; Gemma 3: its sliding / full layer pattern): the search's
    caches keep every column, so their slices exist, and the window still applies
    through the model's mask: candidates' log-probs equal the model's own full forward,
    which differs from the same weights without a window (or with one longer than the
    sequences)."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    tok = tiny_tokenizer()
    common = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, vocab_size=len(tok))
    torch.manual_seed(0)
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=4, **common))
        unwindowed = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=4,
                                             max_window_layers=1, **common))
        unwindowed = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        g3 = dict(common, head_dim=8, final_logit_softcapping=None)
        model = Gemma3ForCausalLM(Gemma3TextConfig(sliding_window=4, **g3))
        unwindowed = Gemma3ForCausalLM(Gemma3TextConfig(sliding_window=4096, **g3))
    model.eval()
    unwindowed.load_state_dict(model.state_dict())
    unwindowed.eval()
    gen = HFStepModel(model, tok, max_new_tokens=6, temperature=1.5, seed=0)
    level1 = gen.sample_steps(gen.root_states([0, 1], ["12+3=", "1+1-4+5="]), 3)
    kids = [c.state for cs in level1 for c in cs if c.state.kv is not None]
    rolled = gen.sample_rollouts(kids, 2, max_steps=2)
    cands = level1 + [[c for c, _ in row] for row in rolled]
    _check_candidates(model, cands)
    longest = max((c for cs in cands for c in cs), key=lambda c: len(c.state.ids))
    assert len(longest.state.ids) > 8
    assert abs(_full_logprob(model, longest.state.ids, longest.num_tokens)
               - _full_logprob(unwindowed, longest.state.ids, longest.num_tokens)) > 1e-3


def test_step_texts_decode_as_the_tokenizer_does():
    """Step texts come from the tokenizer's Rust backend directly only where it agrees
    with ``tokenizer.decode``; a tokenizer that cleans up spaces, or whose decode differs
    anywhere on the vocabulary, keeps its own decode."""
    from rlfuse.search.llm_gen import _fast_decode

    tok = tiny_tokenizer()
    fast = _fast_decode(tok, len(tok))
    g = torch.Generator().manual_seed(0)
    for n in range(40):
        ids = torch.randint(0, len(tok), (n,), generator=g).tolist()
        assert fast(ids) == tok.decode(ids, skip_special_tokens=True)
    plain = type(tok).decode

    class Marked(type(tok)):      # a decode that differs from its backend
        def decode(self, ids, **kw):
            return plain(self, ids, **kw) + "!"

    marked = tiny_tokenizer()
    marked.__class__ = Marked
    assert _fast_decode(marked, len(marked))([5, 6]) == tok.decode([5, 6]) + "!"
    tok.clean_up_tokenization_spaces = True
    calls = []
    tok.decode = lambda ids, **kw: calls.append(ids) or plain(tok, ids, **kw)
    _fast_decode(tok, len(tok))([7])
    assert calls == [[7]]


def _decode_step(probs, u, logits, stop, done, t=0, pad_id=0, argmax=None, threads=1,
                 split=None, temperature=None):
    """Step ``t`` of a raw ``rlfuse._C.DecodeLoop`` over fresh buffers of R rows (width
    t + 1); with a ``split`` table, also the rows' first positions in it (``first``).  With
    a ``temperature``, the fused ``step_logits`` (sampling from the logits at ``u``)."""
    from rlfuse import _backend

    R, V = logits.shape
    T = t + 1
    toks, lp = torch.full((R, T), -7, dtype=torch.long), torch.full((R, T), float("nan"))
    cur, pos = torch.full((R,), -7, dtype=torch.long), torch.arange(R)
    length, first = torch.zeros(R, dtype=torch.long), torch.zeros(R, dtype=torch.long)
    first[::4] = 1                                   # rows that met the table before: kept
    loop = _backend.cpu_module().DecodeLoop(
        R, T, pad_id,
        [stop.data_ptr(), stop.shape[0], split.data_ptr() if split is not None else 0,
         split.shape[0] if split is not None else 0],
        [done.data_ptr(), cur.data_ptr(), toks.data_ptr(), lp.data_ptr(), length.data_ptr(),
         first.data_ptr() if split is not None else 0, pos.data_ptr()])
    if temperature is not None:
        live = loop.step_logits(u.data_ptr() if u is not None else 0, logits.data_ptr(),
                                logits.stride(0), V, t, temperature, threads)
    else:
        live = loop.step(probs.data_ptr() if probs is not None else 0,
                         u.data_ptr() if u is not None else 0,
                         argmax.data_ptr() if argmax is not None else 0, logits.data_ptr(),
                         logits.stride(0), V, t, threads)
    if split is not None:
        return live, cur, toks[:, t], lp[:, t], length, pos, first
    return live, cur, toks[:, t], lp[:, t], length, pos


@pytest.mark.parametrize("V", [1, 3, 64, 5000, 50257])
def test_decode_step_samples_as_torch_cumsum_and_searchsorted(V):
    """The step kernel picks the same token as ``_sample`` (softmax, cumsum, one uniform,
    searchsorted) for the same draws, on fresh random logits with exact zeros in the
    probabilities, ties, and draws of 0 and just below 1; stop checks, padding, lengths,
    positions and log-probs (rlfuse.ops.token_logprobs's bits) come with it."""
    from rlfuse.ops import token_logprobs
    from rlfuse.search.llm_gen import _probs, _sample

    g = torch.Generator().manual_seed(V)
    R = 41
    logits = torch.randn(R, V, generator=g) * 4
    logits[::5, : V // 2] = -float("inf")            # zero probabilities
    logits[1::7] = 0.5                               # uniform rows: ties everywhere
    for temp, top_p in ((1.0, 1.0), (0.7, 1.0), (1.5, 0.6)):
        state = g.get_state()
        sampled = _sample(logits, temp, top_p, g)
        g.set_state(state)
        probs = _probs(logits, temp, top_p)
        u = torch.rand(R, 1, generator=g)
        cdf = probs.cumsum(-1)
        inverted = lambda u: torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0] \
            .clamp(max=V - 1)  # noqa: E731
        assert torch.equal(inverted(u), sampled)          # _sample: these draws, inverted
        u[0], u[2] = 0.0, 1.0 - 2 ** -24
        want = inverted(u)
        stop = torch.zeros(V + 3, dtype=torch.bool)
        stop[torch.randint(0, V, (max(1, V // 3),), generator=g)] = True
        done = torch.zeros(R, dtype=torch.bool)
        done[3] = True                               # a row that stopped before: padding
        split = torch.rand(V, generator=g) < 0.3
        live, cur, toks, lp, length, pos, first = _decode_step(
            probs.clone(), u, logits, stop, done, t=2, pad_id=V - 1, split=split)
        want[3] = V - 1
        assert torch.equal(cur, want) and torch.equal(toks, want)
        hit = stop[want] & ~torch.arange(R).eq(3)
        assert torch.equal(done, hit | torch.arange(R).eq(3))
        assert live == int((~done).sum())
        assert torch.equal(length, torch.where(hit, 3, 0))
        assert torch.equal(pos, torch.arange(R) + 1)
        before = torch.arange(R) % 4 == 0
        live_rows = ~torch.arange(R).eq(3)
        assert torch.equal(first, torch.where(before, 1, torch.where(split[want] & live_rows,
                                                                        3, 0)))
        want_lp = token_logprobs(logits, want, backend="cpu")
        want_lp[3] = 0.0                             # padding: log-prob 0
        assert torch.equal(lp, want_lp)
    # greedy: the given argmax, same bookkeeping
    done = torch.zeros(R, dtype=torch.bool)
    am = logits.argmax(-1)
    _, cur, *_ = _decode_step(None, None, logits, torch.zeros(1, dtype=torch.bool), done,
                              argmax=am)
    assert torch.equal(cur, am)


def _fused_inputs(V, R, g):
    """float32 logits [R, V] in a wider buffer (row stride V + 5), with -inf logits (zero
    probabilities), constant rows (ties everywhere) and one row with a single finite logit;
    uniforms [R] with exact 0 and just below 1 among them."""
    buf = torch.full((R, V + 5), float("nan"))
    logits = buf[:, :V]
    logits.copy_(torch.randn(R, V, generator=g) * 4)
    logits[::5, : V // 2] = -float("inf")            # zero probabilities
    logits[1::7] = 0.5                               # uniform rows: ties everywhere
    logits[4] = -float("inf")
    logits[4, V // 3] = 2.0                          # one token of probability 1
    u = torch.rand(R, generator=g)
    u[0], u[2], u[5] = 0.0, 1.0 - 2 ** -24, 0.0
    return logits, u


def _check_fused_step(V, temp, g, R=41, threads=1, tol=2e-6):
    """The fused step against the float64 CDF inversion of softmax(logits / temp): the
    token's CDF interval contains u S (up to tol S at its ends), and it is the float64
    token unless u S lies within tol S of an interval boundary (counted: rare); never a
    zero-probability token; log-probs of the raw logits to float32 accuracy; padding,
    stops, lengths, first splits and positions.  Returns the rows near a boundary."""
    logits, u = _fused_inputs(V, R, g)
    x = logits.double()
    p = torch.softmax(x / temp, -1)
    cdf = p.cumsum(-1)
    S = cdf[:, -1]
    target = u.double() * S
    want = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    nonzero = p > 0
    last = V - 1 - nonzero.flip(-1).int().argmax(-1)
    want = torch.where(want >= V, last, want)        # past the end: the last p > 0
    stop = torch.zeros(V + 3, dtype=torch.bool)
    stop[torch.randint(0, V, (max(1, V // 3),), generator=g)] = True
    done = torch.zeros(R, dtype=torch.bool)
    done[3] = True                                   # a row that stopped before: padding
    split = torch.rand(V, generator=g) < 0.3
    pad = V - 1
    logits[3] = float("nan")                         # the stopped row's logits: not read
    live, cur, toks, lp, length, pos, first = _decode_step(
        None, u, logits, stop, done, t=2, pad_id=pad, split=split, temperature=temp,
        threads=threads)
    run = torch.arange(R) != 3
    assert toks[3] == pad and cur[3] == pad
    assert torch.equal(cur, toks)
    assert bool(((toks >= 0) & (toks < V)).all())
    got = toks.clamp(0, V - 1)
    assert bool(nonzero.gather(1, got[:, None])[run, 0].all()), "a zero-probability token"
    # the token's interval [lo, hi) of the CDF holds the target (up to tol S at its ends)
    before = torch.cat([torch.zeros(R, 1, dtype=cdf.dtype), cdf[:, :-1]], 1)   # cdf[i - 1]
    hi = cdf.gather(1, got[:, None])[:, 0]
    lo = before.gather(1, got[:, None])[:, 0]
    slack = tol * S
    assert bool(((lo <= target + slack) & (target < hi + slack))[run].all())
    # the float64 token itself, except near a boundary of the float64 token's interval
    whi = cdf.gather(1, want[:, None])[:, 0]
    wlo = before.gather(1, want[:, None])[:, 0]
    near = ((target - wlo < slack) & (wlo > 0)) | (whi - target < slack)
    assert bool((toks == want)[run & ~near].all())
    first_nz = nonzero.int().argmax(-1)                 # draws of 0: the first p > 0, exactly
    assert toks[0] == want[0] == first_nz[0] and toks[5] == want[5] == first_nz[5]
    assert toks[4] == V // 3
    # log-probs of the raw logits (0 for the stopped row, whose logits are not read)
    ref = torch.log_softmax(x, -1).gather(1, toks[:, None].clamp(0, V - 1))[:, 0]
    ref[3] = 0.0
    torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=1e-6)
    hit = stop[toks] & run
    assert torch.equal(done, hit | ~run)
    assert live == int((~done).sum())
    assert torch.equal(length, torch.where(hit, 3, 0))
    assert torch.equal(pos, torch.arange(R) + 1)
    met = torch.arange(R) % 4 == 0
    assert torch.equal(first, torch.where(met, 1, torch.where(split[toks] & run, 3, 0)))
    # (row 2 draws 1 - 2^-24: always near; rows 0 and 5 draw 0: exact above)
    return int((near & run).sum()) - int(near[2]) - int(near[0]) - int(near[5])


@pytest.mark.parametrize("V", [1, 3, 64, 101, 5000, 50257])
def test_fused_step_samples_softmax_as_the_float64_cdf(V):
    """``DecodeLoop.step_logits`` samples the float64 CDF inversion of
    softmax(logits / T) at the given uniforms (T = 1, 0.7, 1.5), never a token of
    probability 0 (-inf logits, draws of exactly 0), with the raw logits' log-probs."""
    g = torch.Generator().manual_seed(V)
    near = 0
    for temp in (1.0, 0.7, 1.5):
        near += _check_fused_step(V, temp, g)
    # (the constant rows of V = 50257 have intervals 2e-5 wide: some draws land near an end)
    assert near <= 12, f"{near} of 120 draws within 2e-6 of a CDF boundary"


@pytest.mark.parametrize("isa", ["x86-64-v2", "x86-64-v3", "x86-64-v4"])
def test_fused_step_at_every_isa_level(isa):
    from rlfuse import _backend

    c = _backend.cpu_module()
    old = c.active_isa()
    if not c.set_isa(isa):
        pytest.skip(f"this CPU lacks {isa}")
    try:
        g = torch.Generator().manual_seed(11)
        for V in (3, 17, 64, 101, 5000):              # 64: no tail chunk
            for temp in (1.0, 0.7):
                assert _check_fused_step(V, temp, g, threads=2) <= 2
    finally:
        c.set_isa(old)


def test_fused_step_frequencies_follow_the_tempered_softmax():
    """Many rows of the same logits, one uniform each: the fused sampler's token
    frequencies match softmax(logits / T) within 5 standard errors per token (a -inf
    logit: never)."""
    from rlfuse import _backend

    g = torch.Generator().manual_seed(5)
    n = 200_000
    z5 = torch.tensor([0.0, 1.0, 2.0, -1.0, -float("inf")])
    z101 = torch.randn(101, generator=g) * 2
    for z, temp in ((z5, 1.0), (z5, 0.7), (z101, 1.5), (z101, 1.0)):
        V = z.shape[0]
        logits = z.repeat(n, 1)
        u = torch.rand(n, generator=g)
        live, cur, *_ = _decode_step(None, u, logits, torch.zeros(1, dtype=torch.bool),
                                     torch.zeros(n, dtype=torch.bool), temperature=temp,
                                     threads=_backend.threads_for(n * V))
        freq = torch.bincount(cur, minlength=V).double() / n
        p = torch.softmax(z.double() / temp, -1)
        sigma = (p * (1 - p) / n).sqrt()
        assert bool(((freq - p).abs() <= 5 * sigma + 1.0 / n).all()), (freq - p).abs().max()
        if not bool(torch.isfinite(z).all()):
            assert freq[-1] == 0


def test_fused_step_refuses_bad_temperatures_pointers_and_strides(tiny):
    t = torch.zeros(2, 3)
    u = torch.zeros(2)
    stop = torch.zeros(3, dtype=torch.bool)
    # outside [1e-30, 1e30] the kernel's scale log2(e) / T would not be a normal float
    for temp in (0.0, -1.0, float("nan"), float("inf"), 1e-31, 1e-39, 1e31):
        with pytest.raises(ValueError, match="temperature must be finite and in"):
            _decode_step(None, u, t, stop, torch.zeros(2, dtype=torch.bool), temperature=temp)
    for temp in (1e-30, 1e30):                       # the ends: a token of probability > 0
        live, cur, *_ = _decode_step(None, torch.full((2,), 0.5), torch.tensor(
            [[0.0, 5.0, -float("inf")], [1.0, 0.0, -float("inf")]]), stop,
            torch.zeros(2, dtype=torch.bool), temperature=temp)
        assert live == 2 and bool((cur < 2).all())
    model, tok = tiny
    for temp in (1e-31, 1e31, -0.5):
        with pytest.raises(ValueError, match="temperature must be 0"):
            HFStepModel(model, tok, temperature=temp)
    with pytest.raises(ValueError, match="u is a null pointer"):
        _decode_step(None, None, t, stop, torch.zeros(2, dtype=torch.bool), temperature=1.0)
    with pytest.raises(ValueError, match="logits_stride must be >= V"):
        _decode_step(None, torch.zeros(3), t.t(), stop, torch.zeros(3, dtype=torch.bool),
                     temperature=1.0)                # 3 rows of 2 logits, 1 apart
    with pytest.raises(ValueError, match="pad token id 3 is outside"):
        _decode_step(None, u, t, stop, torch.ones(2, dtype=torch.bool), pad_id=3,
                     temperature=1.0)
    from rlfuse import _backend

    p = t.data_ptr()
    loop = _backend.cpu_module().DecodeLoop(2, 1, 0, [p, 3, 0, 0], [p] * 7)
    with pytest.raises(ValueError, match="logits is a null pointer"):
        loop.step_logits(p, 0, 3, 3, 0, 1.0, 1)
    with pytest.raises(ValueError, match="0 <= t < width"):
        loop.step_logits(p, p, 3, 3, 1, 1.0, 1)
    with pytest.raises(ValueError, match="V >= 1"):
        loop.step_logits(p, p, 3, 0, 0, 1.0, 1)


def test_decode_loop_refuses_bad_buffers_and_missing_draws():
    from rlfuse import _backend

    DecodeLoop = _backend.cpu_module().DecodeLoop
    t = torch.zeros(2, 3)
    stop = torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="argmax or probs and u"):
        _decode_step(t, None, t, stop, torch.zeros(2, dtype=torch.bool))
    p = t.data_ptr()
    with pytest.raises(ValueError, match="first_split with a split table"):
        DecodeLoop(2, 1, 0, [p, 3, p, 3], [p, p, p, p, p, 0, p])
    with pytest.raises(ValueError, match="a null buffer"):
        DecodeLoop(2, 1, 0, [p, 3, 0, 0], [p, 0, p, p, p, 0, p])
    with pytest.raises(ValueError, match="R, width >= 1"):
        DecodeLoop(0, 1, 0, [p, 3, 0, 0], [p] * 7)
    with pytest.raises(ValueError, match="0 <= t < width"):
        DecodeLoop(2, 1, 0, [p, 3, 0, 0], [p] * 7).step(p, p, 0, p, 3, 3, 1, 1)


@pytest.mark.parametrize("sampling", [(1.0, 1.0), (0.7, 1.0), (1.8, 0.6), (0.0, 1.0)])
def test_decode_kernel_and_torch_loop_give_the_same_candidates(tiny, sampling):
    """The decoding loop through ``rlfuse._C.DecodeLoop`` (the fused ``step_logits`` when
    top_p = 1, else ``step`` over torch's nucleus probabilities) and the torch-ops loop
    (used off the CPU) share their uniform draws and give the same tokens, lengths,
    candidates and rollouts, with packed caches from earlier batches, per-state sample
    counts and a narrow stop table; the log-probs agree to float32 accuracy (the fused
    arithmetic is not torch's bit for bit)."""
    model, tok = tiny
    temp, top_p = sampling
    out, lps = [], []
    # (fused_step = False: DecodeLoop.step over torch's softmax even at top_p = 1)
    for kernel, fused in ((True, True), (False, True), (True, False)):
        gen = HFStepModel(model, tok, max_new_tokens=6, temperature=temp, top_p=top_p, seed=7)
        gen.step_kernel, gen.fused_step = kernel, fused
        assert (gen._step_kernel(gen.device) is not None) == kernel
        roots = gen.root_states([0, 1, 2], ["12+3=", "1+1-4+5=", "7="])
        level1 = gen.sample_steps(roots, 3)
        kids = [c.state for cs in level1 for c in cs if c.state.kv is not None]
        rolled = gen.sample_rollouts(kids, [i % 3 for i in range(len(kids))], max_steps=2)
        d = gen._decode(roots, 4, 9, gen._eos_tab[:tok.eos_token_id + 1],
                        split=gen._stop_tab[:tok.eos_token_id + 1])
        out.append((
            [[(c.text, c.num_tokens, c.logprob, c.ended, c.state.ids) for c in cs]
             for cs in level1],
            [[(c.text, c.num_tokens, c.logprob, c.ended, comp) for c, comp in row]
             for row in rolled],
            d.rows, d.length.tolist(), d.stopped.tolist(), d.first_split,
            gen.counters.snapshot()["generated"]))
        lps.append(([c.logprob for cs in level1 for c in cs],
                    [c.logprob for row in rolled for c, _ in row], d.lp))
    strip = lambda o: (  # noqa: E731  (everything but the log-probs, compared below)
        [[v[:2] + v[3:] for v in cs] for cs in o[0]], [[v[:2] + v[3:] for v in r] for r in o[1]],
        *o[2:])
    assert strip(out[0]) == strip(out[1]) == strip(out[2])
    for a, b, c in zip(*lps):
        for x in (a, c):
            torch.testing.assert_close(torch.as_tensor(x, dtype=torch.float64),
                                       torch.as_tensor(b, dtype=torch.float64), atol=1e-4,
                                       rtol=0)
    assert lps[0][2].numel() > 0 and bool(torch.isfinite(lps[0][2]).all())


# -- rollout limits, kv_reuse=False, an unembeddable pad id (a review's findings) -----------

def _newline_biased(model, tok, bias=4.0):
    """The model with its "\\n" logit raised (a forward hook on the head), so that a random
    tiny model writes steps."""
    nl = tok.convert_tokens_to_ids("\n")

    def hook(mod, args, out):
        out = out.clone()
        out[..., nl] += bias
        return out

    m = copy.deepcopy(model)
    m.lm_head.register_forward_hook(hook)
    return m


def test_rollouts_end_at_their_states_remaining_steps(tiny):
    model, tok = tiny
    biased = _newline_biased(model, tok)
    gen = HFStepModel(biased, tok, max_new_tokens=8, seed=0)
    roots = gen.root_states([0, 1], ["12+3=", "7="])
    for limit in (1, 2, [1, 3]):
        rolled = gen.sample_rollouts(roots, 4, limit)
        lim = limit if isinstance(limit, list) else [limit] * 2
        for row, m, st in zip(rolled, lim, roots):
            for c, comp in row:
                assert comp[len(st.completion):].count("\n") <= m
        done = gen.rollout(roots, limit, repeats=3)
        for (comp, _), m in zip(done, [x for x in lim for _ in range(3)]):
            assert comp.count("\n") <= m
    # the cut rollouts' steps still match the model's own forward (with the hook)
    for row in gen.sample_rollouts(roots, 3, 2):
        for c, _ in row:
            ids = c.state.ids
            with torch.no_grad():
                lg = biased(input_ids=torch.tensor([ids])).logits[0].double()
            lp = torch.log_softmax(lg[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])
            assert c.logprob == pytest.approx(float(lp[len(ids) - 1 - c.num_tokens:].sum()),
                                              abs=2e-4)


def test_rollout_first_steps_are_capped_at_max_new_tokens(tiny):
    """A rollout's first step (and a continued tail's step) longer than max_new_tokens is a
    "length" step: terminal, no tail, as in step expansion."""
    model, tok = tiny
    gen = HFStepModel(model, tok, max_new_tokens=3, temperature=1.5, seed=1)
    roots = gen.root_states([0, 1], ["12+3=", "7="])
    rolled = gen.sample_rollouts(roots, 6, 4)
    cands = [c for row in rolled for c, _ in row if c is not None]
    assert cands and all(c.num_tokens <= 3 for c in cands)
    assert any(c.ended == "length" for c in cands)
    assert all(c.tail is None for c in cands if c.ended != "delimiter")


def test_kv_reuse_false_tails_do_not_hold_the_batch_cache(tiny):
    model, tok = tiny
    biased = _newline_biased(model, tok)
    gen = HFStepModel(biased, tok, max_new_tokens=8, seed=0, kv_reuse=False)
    rolled = gen.sample_rollouts(gen.root_states([0], ["12+3="]), 4, 3)
    tails = [c.tail for row in rolled for c, _ in row if c is not None and c.tail is not None]
    assert tails and all(t[0].layers is None for t in tails)
    nxt = [gen.continue_tail(c.state, c.tail) for row in rolled for c, _ in row
           if c is not None and c.tail is not None]
    assert all(c is None or c.state.kv is None for c in nxt)


def test_a_pad_id_the_model_cannot_embed_is_replaced(tiny):
    """A pad token added to the tokenizer without resizing the model: padding uses EOS
    (any id is masked), and prompts of different lengths search as usual."""
    model, tok = tiny
    tok = copy.deepcopy(tok)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    assert tok.pad_token_id >= model.get_input_embeddings().num_embeddings
    search = StepSearch(model, tok, reward_fn=lambda p, c: 0.0, num_candidates=2,
                        num_simulations=4, max_depth=2)
    assert search.gen.pad_id == tok.eos_token_id
    assert len(search.run(["a", "abcdef"])) == 2


@pytest.mark.parametrize("temp", [1.0, 0.0])
def test_decode_loop_step_budgets_stop_rows_alike_in_both_loops(tiny, temp):
    """A row stops at the split-table token that spends its budget (its remaining steps),
    in the DecodeLoop kernel and in the torch loop alike, and not before."""
    model, tok = tiny
    biased = _newline_biased(model, tok, bias=3.0)
    runs = []
    for kernel in (True, False):
        gen = HFStepModel(biased, tok, max_new_tokens=8, temperature=temp, seed=5)
        gen.step_kernel = kernel
        roots = gen.root_states([0, 1], ["12+3=", "7="])
        budget = [1, 2, 3, 1, 2, 3]
        d = gen._decode(roots, 3, 24, gen._eos_tab, split=gen._stop_tab, budget=budget)
        nl = set(gen._stop_set) - gen._eos
        for row, n, b in zip(d.rows, d.length.tolist(), budget):
            steps = sum(t in nl for t in row[:n])
            assert steps <= b
            ends_eos = n and row[n - 1] in gen._eos
            assert ends_eos or steps == b or n == 24
        runs.append((d.rows, d.length.tolist(), d.stopped.tolist(), d.first_split))
    assert runs[0] == runs[1]
    assert any(n < 24 for n in runs[0][1])


def test_decode_loop_budget_needs_a_split_table():
    from rlfuse import _backend

    DecodeLoop = _backend.cpu_module().DecodeLoop
    p = torch.zeros(8).data_ptr()
    with pytest.raises(ValueError, match="split_budget needs a split table"):
        DecodeLoop(2, 1, 0, [p, 3, 0, 0], [p] * 7, p)


# -- step texts against their tokens: SentencePiece-style decoders, multi-token delimiters ---

def _word_tokenizer(vocab_words, decoder, pre, delimiter_tokens=("\n",)):
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in list(delimiter_tokens) + list(vocab_words):
        vocab.setdefault(w, len(vocab))
    bt = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    bt.pre_tokenizer, bt.decoder = pre, decoder
    bt.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                      special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bt, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def _biased(model, bias: dict):
    def hook(mod, args, out):
        out = out.clone()
        for i, v in bias.items():
            out[..., i] += v
        return out

    model.lm_head.register_forward_hook(hook)
    return model


def test_step_texts_keep_the_spaces_a_sentencepiece_decoder_strips():
    """A Llama-2-style decoder strips a sequence's leading space, so a step decoded on its
    own loses the space it has inside the completion: steps are decoded after their
    context token, and a rollout's steps joined give the rollout's text."""
    from tokenizers import decoders, pre_tokenizers

    words = ["\u2581the", "\u2581a", "\u2581is", "\u2581=", "\u25811", "\u25812", "the", "a",
             "is", "=", "1", "2"]
    tok = _word_tokenizer(words, decoders.Sequence([decoders.Replace("\u2581", " "),
                                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)]),
                          pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"))
    nl = tok.convert_tokens_to_ids("\n")
    model = _biased(tiny_causal_lm(tok, hidden_size=32, num_layers=1, seed=2).eval(),
                    {nl: 1.5, tok.eos_token_id: 0.5})
    gen = HFStepModel(model, tok, max_new_tokens=40, seed=1)
    assert gen._ctx_decode
    roots = gen.root_states([0, 1], ["the a", "is"])
    checked = 0
    for row in gen.sample_rollouts(roots, 8, 4):
        for c, comp in row:
            cur = c
            while cur is not None and cur.tail is not None:
                cur = gen.continue_tail(cur.state, cur.tail)
            if cur is None or cur.ended == "length":
                continue
            assert "".join(cur.state.steps) == comp
            # the completion is what the whole sequence decodes to after its prompt
            prompt_ids = roots[cur.state.problem].ids
            whole = tok.decode(cur.state.ids, skip_special_tokens=True)
            assert whole == tok.decode(prompt_ids, skip_special_tokens=True) + comp
            checked += 1
    assert checked >= 4
    # and in a search: every terminal node's reward is reward_fn of its own completion
    seen = {}
    R = lambda p, c: seen.setdefault(c, float(len(seen) % 7) / 7)  # noqa: E731
    res = StepSearch(model, tok, reward_fn=R, num_candidates=3, num_simulations=24, max_depth=4,
                     sampling=dict(max_new_tokens_per_step=40)).run(["the a", "is"])
    for r in res:
        for n in r.nodes:
            if n["terminal"]:
                comp = "".join(p["step"] for p in r.path(n["id"]))
                assert n["reward"] == seen[comp]


def test_a_delimiter_several_tokens_spell_ends_the_step_where_its_text_does():
    """With step_delimiter "\\n\\n" and tokens "\\n" and "\\n\\n", two "\\n" tokens spell the
    delimiter without a stop token: the step ends there (its tokens, log-prob and cache
    too), and no candidate's text differs from its own tokens."""
    from tokenizers import Regex, decoders, pre_tokenizers

    tok = _word_tokenizer(list("abcdefghij =0123456789"), decoders.Fuse(),
                          pre_tokenizers.Split(Regex(r"\n\n|[\s\S]"), behavior="isolated"),
                          delimiter_tokens=("\n\n", "\n"))
    nl = tok.convert_tokens_to_ids("\n")
    model = _biased(tiny_causal_lm(tok, hidden_size=32, num_layers=1, seed=1).eval(),
                    {nl: 2.5, tok.convert_tokens_to_ids("\n\n"): 1.0, tok.eos_token_id: -3.0})
    gen = HFStepModel(model, tok, step_delimiter="\n\n", max_new_tokens=12, seed=0)
    root = gen.root_states([0], ["ab"])[0]
    cands = gen.sample_steps([root], 16)[0]
    cands += [c for c, _ in gen.sample_rollouts([root], 8, 3)[0] if c is not None]
    short = 0
    for c in cands:
        own = c.state.ids[len(root.ids):]
        assert len(own) == c.num_tokens
        assert c.text == tok.decode(own, skip_special_tokens=True)
        if c.ended == "delimiter":
            assert c.text.endswith("\n\n") and "\n\n" not in tok.decode(own[:-1])
            short += own[-1] == nl
        with torch.no_grad():        # the model's own head (with its hook)
            lg = model(input_ids=torch.tensor([c.state.ids])).logits[0].double()
        lp = torch.log_softmax(lg[:-1], -1).gather(-1, torch.tensor(c.state.ids[1:])[:, None])
        assert c.logprob == pytest.approx(float(lp[-c.num_tokens:].sum()), abs=2e-4)
    assert short > 0          # steps that ended at a "\n" token, not at a stop token


@pytest.mark.parametrize("temp", [1.0, 0.0])
def test_decode_loop_step_cap_ends_rows_at_an_over_long_step(tiny, temp):
    """With a step cap, a row stops at the cap-th token since its last split-table token
    (the terminal "length" step the tree makes), in both loops alike; a delimiter resets
    the count.  A rollout's steps then never run past max_new_tokens_per_step, whatever
    the other states in its batch have left."""
    model, tok = tiny
    runs = []
    for kernel in (True, False):
        gen = HFStepModel(_newline_biased(model, tok, bias=0.5), tok, max_new_tokens=4,
                          temperature=temp, seed=3)
        gen.step_kernel = kernel
        roots = gen.root_states([0, 1], ["12+3=", "7="])
        d = gen._decode(roots, 4, 30, gen._eos_tab, split=gen._stop_tab,
                        budget=[3] * 8, step_cap=4)
        splits = gen._stop_set
        for row, n in zip(d.rows, d.length.tolist()):
            run = 0
            for t in row[:n]:
                run = 0 if t in splits else run + 1
                assert run <= 4
            assert n == 30 or row[n - 1] in splits or run == 4
        runs.append((d.rows, d.length.tolist(), d.stopped.tolist(), d.first_split))
        # sample_rollouts: a state with 1 step left samples no more than max_new_tokens
        rolled = gen.sample_rollouts(roots, 3, [1, 5])
        assert all(len(c.state.ids) - len(roots[0].ids) <= 4 for c, _ in rolled[0]
                   if c is not None)
    assert runs[0] == runs[1]
    assert any(n < 30 for n in runs[0][1])
