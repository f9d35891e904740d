"""The lean CPU forward (splice.decode.lean): equal to transformers' forward, in-place KV cache
rollback equal to a fresh prefix run, greedy speculative = greedy plain through it, bad input."""

from __future__ import annotations

import pytest
import torch

from splice.decode import (
    CachedLM,
    LeanLM,
    ModelProposer,
    Sampling,
    early_exit,
    generate,
    int8_draft,
)
from splice.errors import SpliceError

from .conftest import tiny_llama

GREEDY = Sampling(temperature=0)


def _hf(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_fp32_equals_the_transformers_forward_prefill_and_cached() -> None:
    model = tiny_llama(vocab=40, layers=3, seed=1)
    ids = torch.randint(0, 40, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    ref, lm = _hf(model, ids), LeanLM(model)
    torch.testing.assert_close(lm.logits(ids[:7], 7), ref[:7], rtol=0, atol=1e-5)
    for t in range(8, 21):  # one token at a time, then the verify shape (several rows)
        torch.testing.assert_close(lm.logits(ids[:t], 1), ref[t - 1 : t], rtol=0, atol=1e-5)
    lm.rollback(10)
    torch.testing.assert_close(lm.logits(ids, 10), ref[10:], rtol=0, atol=1e-5)
    assert lm.calls == 15


def test_rollback_equals_a_fresh_prefix_run_and_the_cache_grows() -> None:
    model = tiny_llama(vocab=30, layers=2, seed=2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30, (300,), generator=g).tolist()  # past the first 256 slots
    lm = LeanLM(model)
    lm.logits(ids[:250], 1)
    lm.logits([*ids[:250], 1, 2, 3, 4, 5], 1)  # a rejected draft ...
    got = lm.logits(ids, 50)  # ... rolled back to 250, then 50 more rows (cache regrown)
    torch.testing.assert_close(got, LeanLM(model).logits(ids, 50), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, _hf(model, ids)[250:], rtol=0, atol=1e-4)
    assert lm.ids == ids


def test_int8_is_the_int8_drafter_and_layers_cut_blocks() -> None:
    model = tiny_llama(vocab=40, layers=4, seed=3, sharpen=4.0)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    # the same per-channel weights and per-call activation scales as int8_draft (q, k, v
    # quantised as one matrix share their input's scale): the same logits up to rounding
    a = LeanLM(model, weights="int8").logits(ids, 4)
    torch.testing.assert_close(a, CachedLM(int8_draft(model)).logits(ids, 4), rtol=0, atol=1e-4)
    assert not torch.equal(a, _hf(model, ids)[-4:])
    b = LeanLM(model, weights="int8", layers=2).logits(ids, 4)
    c = CachedLM(int8_draft(model, 2)).logits(ids, 4)
    torch.testing.assert_close(b, c, rtol=0, atol=1e-4)
    d = LeanLM(model, weights="bf16").logits(ids, 4)  # bf16 weights: close, not equal
    assert 0 < (d - _hf(model, ids)[-4:]).abs().max() < 0.05


def test_greedy_speculative_equals_greedy_plain_through_the_lean_target() -> None:
    model = tiny_llama(vocab=50, layers=4, seed=4, sharpen=4.0)
    target = LeanLM(model, "target")
    proposer = ModelProposer(LeanLM(model, "int8", weights="int8"), "int8")
    g = torch.Generator().manual_seed(5)
    for i in range(12):
        prompt = torch.randint(0, 50, (1 + i % 5,), generator=g).tolist()
        plain = generate(prompt, target=target, sampling=GREEDY, max_new_tokens=10)
        ref = generate(prompt, target=CachedLM(model), sampling=GREEDY, max_new_tokens=10)
        assert plain.tokens == ref.tokens
        for gamma in (1, 3):
            out = generate(prompt, target=target, proposer=proposer, sampling=GREEDY,
                           gamma=gamma, max_new_tokens=10)  # fmt: skip
            assert out.tokens == plain.tokens and out.lossless
            assert out.metrics["drafter_calls"] > 0


def test_refuses_what_it_does_not_implement() -> None:
    model = tiny_llama(vocab=20, layers=2)
    with pytest.raises(SpliceError, match="fp16"):
        LeanLM(model, weights="fp16")
    with pytest.raises(SpliceError, match="outside"):
        LeanLM(model, layers=3)
    with pytest.raises(SpliceError, match="bfloat16"):
        LeanLM(tiny_llama(vocab=20, layers=2).to(torch.bfloat16))
    with pytest.raises(SpliceError, match="Llama-style"):
        LeanLM(torch.nn.Linear(2, 2))
    model.config.mlp_bias = True
    with pytest.raises(SpliceError, match="bias-free"):
        LeanLM(model)


def test_kv_from_gives_a_drafter_the_targets_exact_context() -> None:
    model = tiny_llama(vocab=30, layers=4, seed=6)
    target = LeanLM(model, "target")
    # an fp32 drafter of the first 2 blocks on the target's K/V is the early-exit view exactly
    drafter = LeanLM(model, "draft", layers=2, kv_from=target)
    ref = CachedLM(early_exit(model, 2))
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, 30, (60,), generator=g).tolist()
    t = 5
    for step in range(25):  # interleaved calls with rollbacks, as speculative decoding makes
        t = max(2, min(55, t + int(torch.randint(-3, 5, (1,), generator=g))))
        ids = seq[:t] + torch.randint(0, 30, (step % 3,), generator=g).tolist()
        if step % 2:
            target.logits(ids, 1 + step % 3)
        else:
            got = drafter.logits(ids, 1)
            torch.testing.assert_close(got, ref.logits(ids, 1), rtol=0, atol=1e-5)
    with pytest.raises(SpliceError, match="blocks"):
        LeanLM(model, layers=4, kv_from=LeanLM(model, layers=2))


def test_sampling_with_a_drafter_equal_to_the_target_accepts_everything() -> None:
    # an fp32 drafter of all blocks on the target's K/V has q = p: min(1, p/q) = 1 at every
    # drafted token, so the lossless rule must accept all of them
    model = tiny_llama(vocab=40, layers=3, seed=7)
    target = LeanLM(model, "target")
    proposer = ModelProposer(LeanLM(model, "same", kv_from=target), "same")
    out = generate([1, 2, 3], target=target, proposer=proposer, sampling=Sampling(temperature=1.0),
                   gamma=4, max_new_tokens=30, seed=3)  # fmt: skip
    assert out.lossless and len(out.tokens) == 30
    assert out.metrics["acceptance_rate"] == 1.0 and out.metrics["alpha"] > 0.999


def test_batched_logits_equal_one_context_at_a_time() -> None:
    from splice.decode.lean import batched_logits

    model = tiny_llama(vocab=40, layers=3, seed=5)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 40, (m,), generator=g).tolist() for m in (9, 14, 5)]
    a = LeanLM(model)
    lms = [a, a.fork("b"), a.fork("c")]
    assert lms[1].blocks is a.blocks and lms[1]._k is not a._k  # weights shared, caches not
    for step in range(6):  # prefills of three lengths, then one token per context per step
        if step == 3:
            seqs[1] = seqs[1][:10]  # one context rolls back, as a re-ranked step can
        got = batched_logits(lms, seqs)
        for b, ids in enumerate(seqs):
            want = LeanLM(model).logits(ids, 1)[0]
            torch.testing.assert_close(got[b], want, rtol=0, atol=1e-5)
            torch.testing.assert_close(got[b], _hf(model, ids)[-1], rtol=0, atol=1e-5)
            seqs[b] = [*ids, int(got[b].argmax())]
    assert [lm.calls for lm in lms] == [6, 6, 6]
    with pytest.raises(SpliceError, match="distinct forks of one LeanLM"):
        batched_logits([a, LeanLM(model)], seqs[:2])
    with pytest.raises(SpliceError, match="distinct forks"):
        batched_logits([a, a], seqs[:2])
