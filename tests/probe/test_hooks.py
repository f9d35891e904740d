"""The probe hooks: capture = output_hidden_states, cached = uncached, nothing leaks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from splice.errors import SpliceError
from splice.probe import Hooks, block_path, blocks, knn_loo, select


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_capture_equals_output_hidden_states(llama):
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad(), Hooks(llama) as h:
        cap = h.capture(range(4))
        cap_in = h.capture([0, 3], inputs=True)
        out = llama(ids, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == 5
    torch.testing.assert_close(cap_in[0], hs[0], rtol=0, atol=0)
    torch.testing.assert_close(cap_in[3], hs[3], rtol=0, atol=0)
    for layer in range(3):
        torch.testing.assert_close(cap[layer], hs[layer + 1], rtol=0, atol=0)
    # HF reports the last block after the final norm; the hook sees the block's own output.
    torch.testing.assert_close(llama.model.norm(cap[3]), hs[4], rtol=0, atol=0)
    assert (cap[3] - hs[4]).abs().max() > 0.1


def test_capture_bert_tuple_outputs(bert):
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad(), Hooks(bert) as h:
        cap = h.capture([0, 2])
        out = bert(ids, output_hidden_states=True)
    assert block_path(bert) == "encoder.layer"
    torch.testing.assert_close(cap[0], out.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(cap[2], out.hidden_states[3], rtol=0, atol=0)


def _logits_per_position(model, ids, cached: bool, layer: int, delta, positions):
    """Logits of every position of ``ids`` with ``delta`` added, one forward or token by token."""
    with torch.no_grad(), Hooks(model) as h:
        h.add(layer, delta, positions=positions)
        if not cached:
            return model(ids).logits
        prompt = 4
        out = model(ids[:, :prompt], use_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.cache
        return torch.cat(logits, dim=1)


@pytest.mark.parametrize("kind", ["index", "mask", "per_position", "all"])
def test_add_in_cached_decoding_equals_uncached(llama, kind):
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (1, 9))
    delta, positions = torch.randn(32), "all"
    if kind == "index":
        positions = [2, 5, 7]
    elif kind == "mask":
        positions = torch.tensor([[0, 0, 1, 0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    elif kind == "per_position":
        delta, positions = torch.randn(1, 9, 32), [1, 6, 8]
    full = _logits_per_position(llama, ids, False, 2, delta, positions)
    cached = _logits_per_position(llama, ids, True, 2, delta, positions)
    clean = llama(ids).logits.detach()
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
    assert (full - clean).abs().max() > 1e-2  # the intervention did something


def test_add_last_position_matches_greedy_generation(llama):
    """``"last"`` in generate = adding at each step's last position, recomputed from scratch."""
    torch.manual_seed(2)
    ids, delta = torch.randint(0, 64, (1, 5)), 3 * torch.randn(32)
    with torch.no_grad(), Hooks(llama) as h:
        h.add(1, delta, positions="last")
        gen = llama.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # Reference without cache: every prefix gets the vector at its last position only once
    # it is *that* step's last token; earlier tokens keep the vector they got when they were last.
    seq = ids
    for _ in range(4):
        n = seq.shape[1]
        mask = torch.zeros(1, n, dtype=torch.bool)
        mask[0, ids.shape[1] - 1 :] = True
        with torch.no_grad(), Hooks(llama) as h:
            h.add(1, delta, positions=mask)
            nxt = llama(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen, seq)


def test_replace_and_continue(llama):
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad(), Hooks(llama) as h:
        cap = h.capture(1)
        clean = llama(ids).logits
    with torch.no_grad(), Hooks(llama) as h:  # feeding the captured state back is a no-op
        h.replace(1, lambda hidden, pos: cap[1].clone())
        same = llama(ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)


def test_hooks_removed_on_exit_and_on_error(llama):
    before = _hook_count(llama)
    with Hooks(llama) as h:
        h.capture([0, 1])
        h.add(2, torch.zeros(32))
        assert h.active == 3 and _hook_count(llama) == before + 3
    assert _hook_count(llama) == before
    with pytest.raises(RuntimeError, match="boom"), Hooks(llama) as h:
        h.add(0, torch.zeros(32))
        raise RuntimeError("boom")
    assert _hook_count(llama) == before


def test_grad_through_delta_is_block_output_grad(llama):
    ids = torch.randint(0, 64, (1, 6))
    delta = torch.zeros(32, requires_grad=True)
    with Hooks(llama) as h:
        cap = h.capture(2, detach=False)
        h.add(2, delta, positions=[3])
        cap2 = h.capture(2, detach=False)
        out = llama(ids).logits[0, -1].logsumexp(-1)
    (g_delta,) = torch.autograd.grad(out, delta, retain_graph=True)
    (g_out,) = torch.autograd.grad(out, cap2[2])
    torch.testing.assert_close(g_delta, g_out[0, 3])
    assert cap[2].shape == (1, 6, 32)


def test_bad_model_and_layer_errors(llama):
    with pytest.raises(SpliceError, match="Linear has no stack of blocks"):
        blocks(nn.Linear(3, 3))
    with pytest.raises(SpliceError, match=r"layer 4 out of range.*0…3"):
        Hooks(llama).add(4, torch.zeros(32))
    assert len(blocks(llama)) == 4


def test_select_positions():
    pos = torch.tensor([[3, 4, 5]])
    assert select("last", pos).tolist() == [[False, False, True]]
    assert select([4], pos).tolist() == [[False, True, False]]
    mask = torch.tensor([[0, 0, 0, 0, 1]], dtype=torch.bool)
    assert select(mask, pos).tolist() == [[False, True, False]]


def test_knn_loo_matches_brute_force():
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    x[7] = x[3] * 2  # a duplicate direction: cosine distance 0
    got = knn_loo(x, 5)
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    dist = 1 - xn @ xn.T
    dist.fill_diagonal_(np.inf)
    want = dist.argsort(1)[:, :5]
    assert not (got == torch.arange(40)[:, None]).any()
    for i in range(40):
        assert set(got[i].tolist()) == set(want[i].tolist())
    with pytest.raises(ValueError, match="k=40"):
        knn_loo(x, 40)
