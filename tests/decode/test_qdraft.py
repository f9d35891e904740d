"""The int8 self-drafter: a quantised copy of the target that only proposes (issue #29)."""

from __future__ import annotations

import pytest
import torch

from splice.decode import CachedLM, ModelProposer, Sampling, generate, int8_draft
from splice.errors import SpliceError

from .conftest import tiny_llama

GREEDY = Sampling(temperature=0)


def _linears(m: torch.nn.Module) -> int:
    return sum(type(x) is torch.nn.Linear for x in m.modules())


def test_int8_copy_leaves_the_target_and_is_close_to_it() -> None:
    model = tiny_llama(vocab=40, layers=3, seed=11, sharpen=4.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_linear = _linears(model)
    draft = int8_draft(model)
    assert _linears(model) == n_linear > 0  # the target keeps its float layers ...
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # ... and its weights
    assert _linears(draft) == 0  # every Linear of the copy, the head included, is int8
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        a, b = model(x).logits, draft(x).logits
    # int8 weights and activations: close, not equal
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_int8_first_k_blocks() -> None:
    model = tiny_llama(vocab=40, layers=4, seed=12)
    draft = int8_draft(model, 2)
    assert draft.config.num_hidden_layers == 2 and len(draft.model.layers) == 2
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    with pytest.raises(SpliceError, match="outside"):
        int8_draft(model, 4)


def test_int8_drafter_keeps_greedy_output_and_is_mostly_accepted() -> None:
    model = tiny_llama(vocab=50, layers=4, seed=4, sharpen=4.0)
    target, proposer = CachedLM(model), ModelProposer(int8_draft(model), "int8")
    g = torch.Generator().manual_seed(1)
    alphas = []
    for i in range(20):
        prompt = torch.randint(0, 50, (1 + i % 6,), generator=g).tolist()
        ref = generate(prompt, target=target, sampling=GREEDY, max_new_tokens=12)
        out = generate(
            prompt, target=target, proposer=proposer, sampling=GREEDY, gamma=3, max_new_tokens=12
        )
        assert out.tokens == ref.tokens and out.lossless
        alphas.append(out.metrics["alpha"])
    assert sum(alphas) / len(alphas) > 0.8


def test_int8_drafter_refuses_a_model_off_the_cpu() -> None:
    model = tiny_llama(vocab=20, seed=13).to("meta")
    with pytest.raises(SpliceError, match="CPU only"):
        int8_draft(model)
