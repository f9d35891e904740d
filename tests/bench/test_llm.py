"""The LLM suite on a tiny random Llama: the answer loss, decoding, training, the run, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from splice.bench.finetune import apply_deltas
from splice.bench.llm import LLMBenchConfig, _swapped, configure_llm, run_llm
from splice.bench.llm_eval import _decode_batch, encode, score
from splice.bench.llm_train import LMTrainConfig, answer_loss, finetune_lm, finetune_lm_cached
from splice.data.causal_lm import load_causal_lm
from splice.data.llm_tasks import LLM_TASKS, load_gen_task
from splice.data.registry import Caps
from tests.bench._llm_fixture import gen_task, tiny_llama
from tests.cli._run import run_cli


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tiny_llama(tmp_path_factory.mktemp("llama"), chat=True)
    model, tok = load_causal_lm(root)
    data = load_gen_task(gen_task(), Caps(200, 16, 24), 0)
    return root, model, tok, data


def test_answer_loss_with_a_shared_prefix_equals_per_example_lm_loss(lm):
    """The prefix run once and repeated gives the same loss and gradients as each full
    sequence through the model with the prompt masked out (transformers' own loss)."""
    _, model, tok, data = lm
    enc = encode(tok, data, "train")
    assert len(enc.prefix) > 3  # the system turn is shared
    idx = [0, 1, 2, 5]
    model.requires_grad_(True)
    try:
        loss, n = answer_loss(model, enc, idx, tok.pad_token_id)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        total, count = 0.0, 0
        for i in idx:
            ids = enc.prefix + enc.prompts[i] + enc.answers[i]
            labels = [-100] * (len(ids) - len(enc.answers[i])) + enc.answers[i]
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            total, count = total + out.loss * len(enc.answers[i]), count + len(enc.answers[i])
        (total / count).backward()
        assert n == count
        torch.testing.assert_close(loss, total / count)
        for k, p in model.named_parameters():
            torch.testing.assert_close(grads[k], p.grad, atol=1e-5, rtol=1e-4)
    finally:
        model.zero_grad()
        model.requires_grad_(False)


def test_free_decoding_matches_generate_and_loglik_matches_teacher_forcing(lm):
    _, model, tok, data = lm
    enc = encode(tok, data, "test")
    idx = list(range(6))
    free, label, loglik = _decode_batch(model, enc, idx, 5, tok.pad_token_id)
    for j, i in enumerate(idx):
        prompt = torch.tensor([enc.prefix + enc.prompts[i]])
        limit = min(5, enc.trie.depth + 2)  # a label task's free answers stop early
        out = model.generate(prompt, max_new_tokens=limit, do_sample=False, eos_token_id=enc.end,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        ref = out[0, prompt.shape[1] :].tolist()
        assert free[j] == (ref[: ref.index(enc.end)] if enc.end in ref else ref)
        full = torch.tensor([enc.prefix + enc.prompts[i] + enc.answers[i]])
        logp = torch.log_softmax(model(input_ids=full).logits[0].float(), -1)
        k = len(enc.answers[i])
        want = sum(float(logp[-k - 1 + t, a]) for t, a in enumerate(enc.answers[i]))
        assert loglik[j] == pytest.approx(want, abs=1e-4)
        assert tok.decode(label[j]) in data.task.labels  # constrained: a label string only


def test_constrained_decoding_emits_only_labels_even_from_a_random_model(lm):
    _, model, tok, data = lm
    enc = encode(tok, data, "test")
    _, label, _ = _decode_batch(model, enc, range(len(enc)), 8, tok.pad_token_id)
    allowed = {tuple(tok(w, add_special_tokens=False)["input_ids"]) for w in data.task.labels}
    assert {tuple(seq) for seq in label} <= allowed


def test_lora_on_a_tiny_llama_reaches_exact_match_one(lm):
    _, model, tok, data = lm
    before = score(model, tok, encode(tok, data, "test"))
    cfg = LMTrainConfig(steps=150, lr=1e-2)
    deltas, meta = finetune_lm(model, encode(tok, data, "train"), cfg, 0, tok.pad_token_id)
    assert meta["final_loss"] < meta["first_loss"] / 10
    assert all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in deltas)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in deltas}
    with _swapped(model, apply_deltas(base, deltas)):
        after = score(model, tok, encode(tok, data, "test"))
    assert after["em"] == after["em_label"] == 1.0 > before["em_label"]
    assert after["loglik"] > before["loglik"]
    for n, t in base.items():  # the model is back to its own weights
        assert torch.equal(dict(model.named_parameters())[n], t)


def test_fine_tune_cache_hits_and_a_damaged_entry_is_retrained(lm, tmp_path):
    _, model, tok, data = lm
    enc = encode(tok, data, "train")
    cfg, entry = LMTrainConfig(steps=3), tmp_path / "entry"
    d1, _, cached1 = finetune_lm_cached(model, enc, cfg, 0, tok.pad_token_id, entry)
    d2, _, cached2 = finetune_lm_cached(model, enc, cfg, 0, tok.pad_token_id, entry)
    assert (cached1, cached2) == (False, True)
    name = next(iter(d1))
    assert torch.equal(d1[name].materialize(), d2[name].materialize())
    blob = entry / "deltas.safetensors"
    raw = bytearray(blob.read_bytes())
    raw[-8:] = b"\x00" * 8  # flip the last bytes: the manifest's sha256 no longer matches
    blob.write_bytes(bytes(raw))
    _, _, cached3 = finetune_lm_cached(model, enc, cfg, 0, tok.pad_token_id, entry)
    assert not cached3
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["meta"]["trainable"] > 0


def test_run_llm_rows_and_identical_rerun_from_cache(lm, tmp_path, monkeypatch):
    root, *_ = lm
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(LLM_TASKS, "syn", gen_task("syn"))
    monkeypatch.setitem(LLM_TASKS, "syn_open", gen_task("syn_open", labels=False))
    train = LMTrainConfig(steps=20, lr=1e-2)
    cfg = LLMBenchConfig(model=str(root), tasks=("syn", "syn_open"), caps=(200, 8, 12),
                         train=train, lambda_grid=(0.5, 1.0))  # fmt: skip
    lines: list[str] = []
    first = run_llm(cfg, lines.append)
    second = run_llm(cfg, lambda _: None)
    keys = [r["key"] for r in first["rows"]]
    assert keys[:2] == ["zero_shot", "individual"]
    assert {r.get("space") for r in first["rows"][2:]} == {"full", "adapter"}
    assert [r["scores"] for r in first["rows"]] == [r["scores"] for r in second["rows"]]
    assert all(r["cached"] for r in second["runs"]) and not any(r["cached"] for r in first["runs"])
    assert first["rows"][0]["scores"]["syn_open"][0]["em_label"] is None
    ta = [r for r in first["rows"] if r["key"].startswith("task_arithmetic@tuned")]
    assert all(r["params"][0]["lambda"] in (0.5, 1.0) for r in ta)
    assert "ETA" in lines[1] and "estimate" in lines[0]


def test_configure_llm_and_cli_usage_errors(monkeypatch, capsys):
    assert configure_llm("quick", steps=5, methods=["ties"]).adapter_methods == ("ties",)
    assert configure_llm("full").methods is None
    assert configure_llm("quick", methods=["ties", "emr"]).model_dump()["emr"] is True
    assert configure_llm("quick", methods=["ties", "emr"]).methods == ("ties",)
    assert configure_llm("quick", methods=["all"]).emr
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--suite", "llm", "--tasks", "nope")
    assert code == 2 and "unknown llm task 'nope'" in err
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--suite", "llm", "--track", "continual")
    assert code == 2 and "merge and peft tracks" in err


def test_cli_runs_the_llm_suite_and_writes_its_report(lm, tmp_path, monkeypatch, capsys):
    root, *_ = lm
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(LLM_TASKS, "syn", gen_task("syn"))
    monkeypatch.setitem(LLM_TASKS, "syn_open", gen_task("syn_open", labels=False))
    code, out, err = run_cli(monkeypatch, capsys, "bench", "--suite", "llm", "--text-model",
                             str(root), "--tasks", "syn,syn_open", "--steps", "3", "--methods",
                             "ties,adamerging", "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 0, err
    assert "ETA" in err and "ties → adapter r8" in out
    md = (tmp_path / "out" / "llm-results.md").read_text()
    assert "| zero-shot |" in md and "adamerging: objective" in md
