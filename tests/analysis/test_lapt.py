"""LAPT (other.md §7.7): batch masks, the per-position perturbation, training through the loop."""

from __future__ import annotations

import pytest
import torch

from splice.analysis.lapt import collate_sft, lapt_loss, lapt_perturbation, perplexity
from splice.train.lapt import train_lapt
from tests.probe._models import tiny_llama


def test_collate_masks_prompt_and_padding():
    b = collate_sft(
        [(torch.tensor([5, 6]), torch.tensor([7, 8, 9])), (torch.tensor([1]), torch.tensor([2]))],
        pad_id=0,
    )
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7, 8, 9], [-100, 2, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    assert b["response_mask"].int().tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


def test_perturbation_is_statistics_matched_per_response_position():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 64) * 3 + 1
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    out = lapt_perturbation(mask, torch.Generator().manual_seed(1))(h, None)
    delta = out - h
    assert delta[~mask].abs().max() == 0
    d = delta[mask]
    torch.testing.assert_close(d.mean(-1), h[mask].mean(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d.std(-1), h[mask].std(-1), rtol=1e-4, atol=1e-4)
    assert (d[0] - d[1]).abs().max() > 0.1  # a fresh direction per position


def test_lapt_loss_without_response_positions_is_the_plain_lm_loss():
    model = tiny_llama(layers=2)
    b = collate_sft([(torch.tensor([5, 6]), torch.tensor([7, 8, 9]))], pad_id=0)
    plain = model(input_ids=b["input_ids"], labels=b["labels"]).loss
    off = dict(b, response_mask=torch.zeros_like(b["response_mask"]))
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(lapt_loss(model, off, 1, gen), plain)
    assert abs(lapt_loss(model, b, 1, gen).item() - plain.item()) > 1e-3


def test_train_lapt_steps_through_the_loop_and_learns():
    model = tiny_llama(layers=2)
    pairs = [
        (torch.tensor([5, 6, 3]), torch.tensor([7, 8, 9, 10])),
        (torch.tensor([11, 4]), torch.tensor([12, 13, 14])),
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts = [torch.cat(p) for p in pairs]
    ppl0 = perplexity(model, texts)
    state = train_lapt(model, pairs, 1, steps=30, lr=3e-3, grad_accum=2)
    assert state.step == 30 and len(state.history) == 30
    assert sum(state.history[-5:]) < sum(state.history[:5])
    assert perplexity(model, texts) < ppl0
    assert any((p - before[n]).abs().max() > 0 for n, p in model.named_parameters())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0 and not model.training


def test_perplexity_by_hand():
    model = tiny_llama(layers=2)
    ids = torch.tensor([3, 4, 5, 6])
    with torch.no_grad():
        logp = model(ids.view(1, -1)).logits[0].double().log_softmax(-1)
    nll = -sum(logp[t, ids[t + 1]].item() for t in range(3)) / 3
    assert perplexity(model, [ids]) == pytest.approx(torch.tensor(nll).exp().item())


def test_fused_adamw_gives_the_reference_update():
    """The fused AdamW LAPT steps with (less memory) equals the single-tensor reference."""
    pairs = [
        (torch.tensor([5, 6, 3]), torch.tensor([7, 8, 9, 10])),
        (torch.tensor([11, 4]), torch.tensor([12, 13, 14])),
    ]
    runs = {}
    for fused in (True, False):
        model = tiny_llama(layers=2)
        state = train_lapt(model, pairs, 1, steps=6, lr=3e-3, weight_decay=0.1, fused=fused)
        runs[fused] = (state.history, {n: p.detach() for n, p in model.named_parameters()})
    start = dict(tiny_llama(layers=2).named_parameters())
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, p in runs[False][1].items():
        assert (p - start[name]).abs().max() > 1e-4  # every parameter moved
        torch.testing.assert_close(runs[True][1][name], p, rtol=1e-5, atol=1e-6)


_RSS = """
import sys

import torch
from splice._memory import return_freed_memory

def rss():
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS")).split()[1]) / 1024

def kept():
    torch.ones(4 << 20)  # freeing 16 MiB raises glibc's mmap threshold to 16 MiB
    before = rss()
    xs = [torch.ones(1 << 16) for _ in range(256)]  # 64 MiB in 256 KiB tensors
    pin = torch.ones(1 << 16)  # allocated after them: the heap cannot shrink past it
    del xs
    return rss() - before, pin

for threshold in map(int, sys.argv[1:]):
    assert return_freed_memory(threshold)
print(kept()[0])
"""


def _kept_mib(*thresholds: int) -> float:
    """MiB still resident after freeing 64 MiB of 256 KiB tensors, in a fresh process that
    first asks for each threshold in turn."""
    import subprocess
    import sys

    args = [sys.executable, "-c", _RSS, *map(str, thresholds)]
    return float(subprocess.run(args, capture_output=True, text=True, check=True).stdout)


def test_freed_tensors_return_to_the_os_under_the_memory_policy():
    assert _kept_mib() > 48  # glibc's raised threshold: the heap keeps the freed tensors
    assert _kept_mib(1 << 17) < 8  # each tensor had its own mapping, returned on free
    # The merge's default (1 MB) asked for after LAPT's 128 KB does not undo it.
    assert _kept_mib(1 << 17, 1 << 20) < 8
