"""RegMean, Fisher merging and EMR-Merging wired to a causal LM (tiny random Llama)."""

from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np
import pytest
import torch

from splice.bench.finetune import apply_deltas
from splice.bench.llm import LLMBenchConfig, _settings, _wired, configure_llm, run_llm
from splice.bench.llm_eval import encode
from splice.bench.llm_learned import LMSequences, answer_labels, emr_rows, learned_merge
from splice.bench.llm_report import markdown
from splice.bench.llm_train import LMTrainConfig, finetune_lm
from splice.data.causal_lm import load_causal_lm
from splice.data.llm_tasks import LLM_TASKS, load_gen_task
from splice.data.registry import Caps
from splice.merge.learned._stats import stats_path
from tests.bench._llm_fixture import gen_task, tiny_llama

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tiny_llama(tmp_path_factory.mktemp("llama"), chat=True)
    model, tok = load_causal_lm(root)
    data = load_gen_task(gen_task(), Caps(200, 16, 24), 0)
    enc = encode(tok, data, "train")
    pad = tok.pad_token_id
    runs = [finetune_lm(model, enc, LMTrainConfig(steps=4, lr=1e-2), s, pad)[0] for s in (0, 1)]
    return root, model, tok, enc, runs


def _base(model, names):
    params = dict(model.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def test_regmean_of_one_task_is_that_tasks_model(lm):
    _, model, tok, enc, (d, _) = lm
    weights, info = learned_merge("regmean", model, {"a": d}, {"a": enc}, tok.pad_token_id, 12)
    own = apply_deltas(_base(model, d), d)
    assert set(weights) == set(own) and info["stats_seconds"] > 0
    for n, w in own.items():
        torch.testing.assert_close(weights[n], w, atol=1e-5, rtol=1e-4)


def test_regmean_plusplus_of_one_task_is_that_tasks_model(lm):
    _, model, tok, enc, (d, _) = lm
    weights, info = learned_merge("regmean_plusplus", model, {"a": d}, {"a": enc},
                                  tok.pad_token_id, 12)  # fmt: skip
    assert info["blocks"] == ["model.layers.0", "model.layers.1"]
    for n, w in apply_deltas(_base(model, d), d).items():
        torch.testing.assert_close(weights[n], w, atol=1e-5, rtol=1e-4)


def _gram(model, seqs, layer):
    """Σ xᵀx of a layer's inputs, each sequence run alone (no padding)."""
    grams = []
    handle = model.get_submodule(layer).register_forward_pre_hook(
        lambda m, a: grams.append(a[0][0].double().T @ a[0][0].double())
    )
    try:
        with torch.no_grad():
            for s in seqs:
                model(input_ids=torch.tensor([s]))
    finally:
        handle.remove()
    return sum(grams)


def test_padding_rows_do_not_change_the_gram(lm, tmp_path):
    _, model, tok, enc, (d, _) = lm
    pad = tok.pad_token_id
    enc = dataclasses.replace(enc, prompts=[p[i % 3 :] for i, p in enumerate(enc.prompts)])
    seqs = LMSequences(enc, pad, 10)
    assert len({len(s) for s in seqs.seqs}) == 3  # batches of 8 are padded
    grams = {}
    for b in (1, 8):
        out = tmp_path / f"b{b}"
        learned_merge("regmean", model, {"a": d}, {"a": enc}, pad, 10,
                      params={"batch_size": b, "stats": str(out)})  # fmt: skip
        values, rows = _stored(stats_path(out, "a", "gram"))
        grams[b] = values
        assert rows[Q] == rows[V] == sum(len(s) for s in seqs.seqs)  # real tokens only
    with apply_swap(model, apply_deltas(_base(model, d), d)):
        for layer in (Q, V):  # V shares layer 1's input Gram with its q_proj
            want = _gram(model, seqs.seqs, layer)  # entries up to ~500; float32 forward
            torch.testing.assert_close(grams[1][layer], want, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(grams[8][layer], want, atol=1e-4, rtol=1e-5)


def _stored(path):
    """A statistics file's values and counted rows."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        rows = json.loads((f.metadata() or {})["rows"])
        return {k: f.get_tensor(k) for k in f.keys()}, rows  # noqa: SIM118


def apply_swap(model, weights):
    from splice.bench.llm import _swapped

    return _swapped(model, weights)


def test_fisher_is_the_empirical_fisher_of_the_answer_tokens(lm, tmp_path):
    """The stored Fisher is the mean over sequences of the squared gradient of the summed
    answer-token log-likelihood, computed here with transformers' own loss."""
    _, model, tok, enc, (d, _) = lm
    pad, n = tok.pad_token_id, 5
    learned_merge("fisher", model, {"a": d}, {"a": enc}, pad, n,
                  params={"stats": str(tmp_path)})  # fmt: skip
    names = sorted(d)
    got, _ = _stored(stats_path(tmp_path, "a", "fisher"))
    seqs, labels = LMSequences(enc, pad, n).seqs, answer_labels(enc, n)
    want = {k: torch.zeros_like(v) for k, v in got.items()}
    own = apply_deltas(_base(model, d), d)
    with apply_swap(model, own):
        params = dict(model.named_parameters())
        for s, lab in zip(seqs, labels, strict=True):
            ids = torch.tensor([[*s, int(lab[-1])]])  # + the end token, the last label
            target = torch.full_like(ids, -100)
            k = int((lab >= 0).sum())
            target[0, -k:] = lab[-k:]
            model.requires_grad_(True)
            try:
                out = model(input_ids=ids, labels=target)
                grads = torch.autograd.grad(-out.loss * k, [params[m] for m in names])
            finally:
                model.requires_grad_(False)
            for m, g in zip(names, grads, strict=True):
                want[m] += g.double().pow(2) / n
    for m in names:
        assert float(want[m].abs().sum()) > 0
        torch.testing.assert_close(got[m], want[m], atol=1e-12, rtol=1e-4)


def test_equal_fishers_give_the_average(lm, monkeypatch):
    _, model, tok, enc, (d0, d1) = lm
    fisher_mod = importlib.import_module("splice.merge.learned.fisher")
    ones = lambda net, task, w, *a: {k: torch.ones_like(v) for k, v in w.items()}  # noqa: E731
    monkeypatch.setattr(fisher_mod, "diagonal_fisher", ones)
    weights, _ = learned_merge("fisher", model, {"a": d0, "b": d1}, {"a": enc, "b": enc},
                               tok.pad_token_id, 3)  # fmt: skip
    base = _base(model, d0)
    for n in base:
        avg = base[n] + (d0[n].materialize() + d1[n].materialize()) / 2
        torch.testing.assert_close(weights[n], avg)


def test_emr_rows_rebuild_one_task_exactly_and_count_the_masks(lm):
    _, model, _, _, (d0, d1) = lm
    base = _base(model, d0)
    dws = [{n: d[n].materialize() for n in base} for d in (d0, d1)]
    one, extra = emr_rows(base, dws[:1], ["a"])
    for n in base:
        torch.testing.assert_close(one["a"][n], base[n] + dws[0][n])
    assert extra["scales"] == {"a": 1.0}
    _, extra = emr_rows(base, dws, ["a", "b"])
    mask_bytes = sum(int(np.ceil(t.numel() / 8)) for t in base.values())
    assert extra["extra_params"] == int((2 * mask_bytes + 2 * 8) / 4)


@pytest.mark.slow
def test_run_llm_has_the_learned_and_emr_rows(lm, tmp_path, monkeypatch):
    root, *_ = lm
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(LLM_TASKS, "syn", gen_task("syn"))
    monkeypatch.setitem(LLM_TASKS, "syn_open", gen_task("syn_open", labels=False))
    cfg = LLMBenchConfig(model=str(root), tasks=("syn", "syn_open"), caps=(200, 8, 12),
                         train=LMTrainConfig(steps=3, lr=1e-2), methods=("ties", "regmean",
                         "fisher", "adamerging"), adapter_methods=(), learned_samples=4,
                         emr=True)  # fmt: skip
    res = run_llm(cfg, lambda _: None)
    rows = {r["key"]: r for r in res["rows"]}
    assert {"regmean@full", "fisher@full", "emr@per-task"} <= set(rows)
    assert rows["emr@per-task"]["kind"] == "per-task" and rows["regmean@full"]["kind"] == "merge"
    assert rows["regmean@full"]["stats_s"][0] > 0
    assert set(res["skipped"]) == {"adamerging"}
    md = markdown(res)
    assert "EMR-Merging (a model per task) (+" in md and "M mask params)" in md
    emr_line = next(x for x in md.splitlines() if x.startswith("| EMR"))
    assert emr_line.rstrip(" |").endswith("%")  # normalized, like a merge row


def test_all_runs_regmean_and_emr_and_lists_the_costly_wired_ones():
    for cfg in (configure_llm("full"), configure_llm("quick", methods=["all"])):
        assert _wired(cfg) == ["regmean"] and cfg.emr
        _, _, skipped = _settings(cfg)
        assert "regmean" not in skipped and "adamerging" in skipped
        assert skipped["fisher"].startswith("wired (run it with --methods fisher)")
    quick = configure_llm("quick")
    assert _wired(quick) == ["regmean"] and quick.emr
