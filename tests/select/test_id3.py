"""ID³ (spec §12): the increment-S schedule, the D³ score, masked entries frozen under AdamW
weight decay, decay on unmasked entries as AdamW's, and the O(B) export reloading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from splice.adapters import load_adapter, save_adapter
from splice.errors import SpliceError
from splice.select.id3 import ID3, export

from .conftest import Tiny, data


def setup(budget, horizon, wd=0.1, lr=5e-2, seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    named = {f"{n}.weight": m.weight for n, m in model.named_modules() if n.startswith("layers.")
             and isinstance(m, torch.nn.Linear)}  # fmt: skip
    trained = [*named.values(), *model.head.parameters()]  # the layer biases stay frozen
    inner = torch.optim.AdamW(trained, lr=lr, weight_decay=wd)
    return model, named, ID3(inner, named, budget, horizon)


def train(model, opt, steps, seed=0):
    x, y = data(seed=seed)
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_increment_s_unmasks_exactly_b_after_t_steps():
    model, _, opt = setup(budget=23, horizon=5)
    assert [opt.increment(t) for t in range(7)] == [5, 5, 5, 4, 4, 0, 0]
    counts = []
    for _ in range(7):
        train(model, opt, 1)
        counts.append(opt.unmasked())
    assert counts == [5, 10, 15, 19, 23, 23, 23]


def test_masked_entries_are_bit_identical_after_50_adamw_steps_with_weight_decay():
    model, named, opt = setup(budget=40, horizon=10, wd=0.5)
    before = {n: p.detach().clone() for n, p in named.items()}
    head = model.head.weight.detach().clone()
    train(model, opt, 50)
    moved = 0
    for n, p in named.items():
        m = opt.masks[n]
        assert torch.equal(p[~m], before[n][~m])  # bit for bit
        assert torch.equal(opt.inner.state[p]["exp_avg"][~m], torch.zeros(int((~m).sum())))
        moved += int((p[m] != before[n][m]).sum())
    assert moved == 40 and opt.unmasked() == 40
    assert not torch.equal(model.head.weight, head)  # the head trains in full, decayed too


@pytest.mark.parametrize("horizon", [1, 3])
def test_unmasked_entries_follow_adamw_with_its_weight_decay(horizon):
    """Against plain AdamW fed the gradients masked as ID³ masked them at each step (so an
    entry unmasked at step t starts from zero moments then): the masked entries' second
    moments set to 1 and reset on unmasking change nothing."""
    model, named, opt = setup(budget=30, horizon=horizon, wd=0.3)
    ref = Tiny()
    ref.load_state_dict(model.state_dict())
    ref_named = {n: ref.get_parameter(n) for n in named}
    ref_opt = torch.optim.AdamW(
        [*ref_named.values(), *ref.head.parameters()], 5e-2, weight_decay=0.3
    )
    start = {n: p.detach().clone() for n, p in ref_named.items()}
    x, y = data()
    for _ in range(6):
        for m_, o in ((model, opt), (ref, ref_opt)):
            F.cross_entropy(m_(x), y).backward()
            if o is ref_opt:
                for n, p in ref_named.items():
                    p.grad.mul_(opt.masks[n])  # the mask opt used at this step
            o.step()
            o.zero_grad()
            if o is ref_opt:  # the reference: plain AdamW, masked entries put back after
                with torch.no_grad():
                    for n, p in ref_named.items():
                        p.copy_(torch.where(opt.masks[n], p, start[n]))
    for n, p in named.items():
        m = opt.masks[n]
        assert torch.allclose(p[m], ref_named[n][m], atol=1e-6)
    assert torch.allclose(model.head.weight, ref.head.weight, atol=1e-6)


@pytest.mark.parametrize("exp", [0.0, 1.0, 2.0])
def test_first_unmasking_takes_the_top_d3_scores(exp):
    model, named, opt = setup(budget=12, horizon=3)
    opt.exp = exp
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    score = torch.cat(
        [(p.grad.abs() / (p.detach().abs() + 1e-3) ** exp).reshape(-1) for p in named.values()]
    )
    expected = set(torch.topk(score, 4).indices.tolist())
    opt.step()
    mask = torch.cat([m.reshape(-1) for m in opt.masks.values()])
    assert set(torch.nonzero(mask).reshape(-1).tolist()) == expected


def test_export_stores_b_entries_and_reloads_to_the_trained_outputs(tmp_path):
    model, _, opt = setup(budget=25, horizon=4)
    train(model, opt, 8)
    x, _ = data()
    with torch.no_grad():
        trained = model(x)
    export(model, opt, modules_to_save=["head"])
    with torch.no_grad():
        assert torch.allclose(model(x), trained, atol=1e-5)
        adapted = model(x)
    save_adapter(model, tmp_path / "id3")
    saved = load_file(str(tmp_path / "id3" / "splice_adapter.safetensors"))
    assert sum(t.numel() for k, t in saved.items() if k.endswith(".values")) == 25
    torch.manual_seed(0)
    again = load_adapter(Tiny(), tmp_path / "id3")
    with torch.no_grad():
        assert torch.equal(again(x), adapted)


@pytest.mark.parametrize("budget", [0, 433])
def test_budget_outside_the_maskable_weights_is_refused(budget):
    with pytest.raises(SpliceError, match=rf"budget {budget} is outside 1\.\.432"):
        setup(budget=budget, horizon=3)


def brute_force_picks(opt, grads, count):
    """The ``count`` highest D³ scores among masked entries, by ranking every entry."""
    scores = []
    for n, p in opt.named.items():
        s = grads[n].abs() / (p.detach().abs() + opt.eps) ** opt.exp
        scores.append(s.reshape(-1).masked_fill(opt.masks[n].reshape(-1), float("-inf")))
    return set(torch.topk(torch.cat(scores), count).indices.tolist())


@pytest.mark.parametrize("exp", [0.0, 1.0])
def test_each_unmasking_is_the_exact_top_among_masked_entries(exp):
    """Tensors of 4,800 and 3,003 entries (rows of 64 and a shorter last row), fresh random
    gradients each step: every step's picks are the global top-k over all masked entries."""
    torch.manual_seed(0)
    named = {"a.weight": torch.nn.Parameter(torch.randn(60, 80)),
             "b.weight": torch.nn.Parameter(torch.randn(91, 33))}  # fmt: skip
    inner = torch.optim.AdamW(list(named.values()), lr=1e-2, weight_decay=0.1)
    opt = ID3(inner, named, budget=700, horizon=7, exp=exp)
    for _ in range(7):
        grads = {n: torch.randn_like(p) for n, p in named.items()}
        before = torch.cat([m.reshape(-1) for m in opt.masks.values()])
        expected = brute_force_picks(opt, grads, opt.increment(opt.t))
        for n, p in named.items():
            p.grad = grads[n].clone()
        opt.step()
        after = torch.cat([m.reshape(-1) for m in opt.masks.values()])
        assert set(torch.nonzero(after & ~before).reshape(-1).tolist()) == expected
    assert opt.unmasked() == 700


def test_gradients_accumulated_in_place_are_masked_too():
    """zero_grad(set_to_none=False) keeps the gradient tensor ID³ handed the inner step, so
    the next backward adds into it: the step still sees 0 at every masked entry."""
    runs = []
    for set_to_none in (True, False):
        model, named, opt = setup(budget=40, horizon=4, wd=0.2)
        before = {n: p.detach().clone() for n, p in named.items()}
        x, y = data()
        for _ in range(8):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        for n, p in named.items():
            m = opt.masks[n]
            assert torch.equal(p[~m], before[n][~m])
        runs.append({n: p.detach().clone() for n, p in named.items()})
    for n in runs[0]:
        assert torch.allclose(runs[0][n], runs[1][n], atol=1e-6)


def test_random_mask_is_static_uniform_and_of_the_budget():
    """mask="random": B entries at the first step, none after; masked entries frozen; the
    draw follows torch's generator (two seeds differ, one seed repeats)."""
    picks = []
    for seed in (0, 0, 1):
        model, named, _ = setup(budget=50, horizon=5, wd=0.5)
        inner = torch.optim.AdamW(list(named.values()), lr=5e-2, weight_decay=0.5)
        torch.manual_seed(seed)
        opt = ID3(inner, named, budget=50, horizon=5, mask="random")
        before = {n: p.detach().clone() for n, p in named.items()}
        train(model, opt, 1)
        first = torch.cat([m.reshape(-1) for m in opt.masks.values()])
        train(model, opt, 6)
        assert opt.unmasked() == 50
        assert torch.equal(torch.cat([m.reshape(-1) for m in opt.masks.values()]), first)
        for n, p in named.items():
            m = opt.masks[n]
            assert torch.equal(p[~m], before[n][~m])
        picks.append(set(torch.nonzero(first).reshape(-1).tolist()))
    assert picks[0] == picks[1] != picks[2]
    with pytest.raises(SpliceError, match="mask 'top' is not d3 or random"):
        ID3(inner, named, budget=5, horizon=1, mask="top")
