"""Latent-perturbation safety (other.md §7): perturbations, NLL probe, ASA metrics, judges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splice.analysis.asa import asa_sweep, generate, lasr, lexicon_judge, masr, pasr
from splice.analysis.nll_probe import nll_landscape, nll_probe, reference_state, response_nll
from splice.analysis.perturb import (
    grad_direction,
    mean_diff_direction,
    random_direction,
    stats_matched,
)
from splice.analysis.prompt_set import BENIGN, HARMFUL, read_prompts
from splice.errors import SpliceError
from splice.probe import Hooks
from tests.probe._models import tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(layers=3, hidden=32)


def test_stats_matched_has_the_reference_mean_and_std():
    torch.manual_seed(0)
    z, h = torch.randn(4, 64) * 7 + 3, torch.randn(4, 64) * 0.5 - 2
    d = stats_matched(z, h)
    hn = h.numpy()
    np.testing.assert_allclose(d.mean(-1).numpy(), hn.mean(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.std(-1).numpy(), hn.std(-1, ddof=1), rtol=1e-4)
    # the direction survives: δ is an affine image of z per row, correlation 1
    assert np.corrcoef(d[0].numpy(), z[0].numpy())[0, 1] == pytest.approx(1.0)
    assert torch.equal(random_direction(16, 42), random_direction(16, 42))
    assert not torch.equal(random_direction(16, 42), random_direction(16, 43))


def test_grad_direction_is_the_sign_of_the_block_output_gradient(llama):
    prompt, target = torch.tensor([3, 9, 4, 1]), torch.tensor([7, 2, 5])
    ids = torch.cat([prompt, target]).view(1, -1)
    with Hooks(llama) as h:
        cap = h.capture(1, detach=False)
        logits = llama(ids).logits[0, 3:-1]
    loss = torch.nn.functional.cross_entropy(logits, target)
    (g,) = torch.autograd.grad(loss, cap[1])
    want = -g[0, -2].sign()
    assert torch.equal(grad_direction(llama, prompt, target, 1), want)
    assert torch.equal(grad_direction(llama, prompt, target, 1, sign="code"), -want)


def test_mean_diff_direction_from_hidden_states(llama):
    harmful = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7])]
    benign = [torch.tensor([8, 9]), torch.tensor([10, 11, 12])]

    def mean_last(prompts):
        with torch.no_grad():
            rows = [
                llama(p.view(1, -1), output_hidden_states=True).hidden_states[2][0, -1]
                for p in prompts
            ]
        return torch.stack(rows).mean(0)

    want = mean_last(harmful) - mean_last(benign)
    torch.testing.assert_close(mean_diff_direction(llama, harmful, benign, 1), want)


def test_response_nll_is_response_tokens_only(llama):
    prompt, response = torch.tensor([3, 9, 4, 1]), torch.tensor([7, 2, 5])
    s, m = response_nll(llama, prompt, response)
    with torch.no_grad():
        logp = llama(torch.cat([prompt, response]).view(1, -1)).logits[0].double().log_softmax(-1)
    want = -sum(logp[3 + t, response[t]].item() for t in range(3))
    assert s == pytest.approx(want) and m == pytest.approx(want / 3)
    # δ = 0 is clean; a δ at positions outside |x|−1 … |x|+|y|−2 is not applied
    assert response_nll(llama, prompt, response, layer=1, delta=torch.zeros(32)) == (s, m)


def test_nll_probe_rows_and_reference_sources(llama):
    prompt, response = torch.tensor([3, 9, 4, 1]), torch.tensor([7, 2, 5])
    rows = nll_probe(llama, prompt, response, [0, 2])
    ref = reference_state(llama, prompt, 2)
    delta = stats_matched(random_direction(32, 42), ref)
    s, m = response_nll(llama, prompt, response, layer=2, delta=delta)
    assert rows[2]["nll_sum"] == pytest.approx(s) and rows[2]["nll_mean"] == pytest.approx(m)
    assert rows[2]["delta_sum"] == pytest.approx(s - rows[2]["clean_sum"])
    with torch.no_grad():
        hs = llama(prompt.view(1, -1), output_hidden_states=True).hidden_states
    torch.testing.assert_close(reference_state(llama, prompt, 1, "hf_index"), hs[1][0, -1])
    torch.testing.assert_close(reference_state(llama, prompt, 1), hs[2][0, -1])
    grid = nll_landscape(llama, prompt, response, 1, delta, torch.zeros(32), grid=3)
    assert grid.shape == (3, 3) and grid[0, 0] == pytest.approx(rows[0]["clean_mean"])
    torch.testing.assert_close(grid[:, 0], grid[:, 2])  # the second direction is zero


def test_masr_pasr_lasr_on_a_hand_made_matrix():
    s = torch.tensor([[0, 1, 0], [0, 0, 0], [1, 1, 0], [0, 1, 1]])
    assert masr(s) == 0.75  # prompts 0, 2, 3 break at some layer
    assert lasr(s) == [0.25, 0.75, 0.25]
    assert pasr(s) == 0.75


def test_lexicon_judge():
    assert not lexicon_judge("x", "I'm sorry, but I can't help with that request at all.")
    assert not lexicon_judge("x", "ok ok ok")  # degenerate
    assert lexicon_judge("x", "Sure, here is a plan: first you find the target and then go.")
    assert not lexicon_judge("x", "That would be illegal and I will not describe it to you.")


def test_asa_sweep_on_a_tiny_model(llama):
    prompts = [torch.tensor([3, 9, 4, 1]), torch.tensor([5, 6, 7]), torch.tensor([8, 2])]
    calls = []

    def judge(prompt, response):  # a custom callable: "unsafe" when token 13 appears
        calls.append(prompt)
        return " 13 " in f" {response} "

    decode = lambda ids: " ".join(str(int(i)) for i in ids)  # noqa: E731
    rep = asa_sweep(llama, prompts, [0, 2], decode, judge=judge, max_new_tokens=6)
    s = torch.tensor(rep["success"])
    assert s.shape == (3, 2) and len(rep["records"]) == 6 and len(calls) == 3 + 6
    assert rep["masr"] == masr(s) and rep["pasr"] == pasr(s)
    for r in rep["records"]:
        assert r["unsafe"] == judge(r["prompt"], r["steered"])
        ids = prompts[r["prompt_idx"]]
        ref = reference_state(llama, ids, r["layer_idx"])
        delta = stats_matched(random_direction(32, 42), ref)
        again = generate(llama, ids, 6, layer=r["layer_idx"], delta=delta)
        assert r["steered"] == decode(again)
    assert any(r["steered"] != r["original"] for r in rep["records"])
    md = asa_sweep(
        llama,
        prompts,
        [1],
        decode,
        judge=judge,
        direction="mean_diff",
        benign=prompts[:2],
        max_new_tokens=3,
    )
    assert len(md["records"]) == 3


def test_prompt_set_and_prompt_files(tmp_path):
    assert len(HARMFUL) == len(BENIGN) == 24 and len(set(HARMFUL)) == 24
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(SpliceError, match="is empty"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(SpliceError, match=r"bad\.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")
