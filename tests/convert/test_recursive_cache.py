"""The recursive model's KV cache: one cache layer per depth, ``generate()``, and the
speculative decoder's CachedLM rollback (splice.convert.modeling_recursive)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from splice.convert import convert_recursive
from splice.decode.draft import ModelProposer
from splice.decode.engine import generate
from splice.decode.lm import CachedLM
from splice.decode.lossless import GreedyMatch
from splice.decode.sampling import Sampling

from .test_recursive import tiny_llama


@pytest.fixture(scope="module")
def rec():
    """6 depths = 2 shared layers × 3 loops, with non-zero per-loop LoRA residuals."""
    model = convert_recursive(tiny_llama(), 2, "average", rank=3).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def full_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_incremental_logits_equal_the_full_pass_and_each_depth_has_its_cache(rec):
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    want = full_logits(rec, ids)
    cache = DynamicCache(config=rec.config)
    with torch.no_grad():
        got = [rec(ids[:, :5], cache=cache).logits]
        for t in range(5, 9):
            out = rec(ids[:, t : t + 1], cache=cache)
            assert out.cache is cache
            got.append(out.logits)
    torch.testing.assert_close(torch.cat(got, 1), want, atol=1e-5, rtol=1e-5)
    assert len(cache.layers) == rec.config.num_hidden_layers == 6
    assert cache.get_seq_length() == 9
    # depths 0, 2, 4 run shared layer 0 on different inputs: their keys differ
    k = [cache.layers[d].keys for d in (0, 2, 4)]
    assert not torch.allclose(k[0], k[1]) and not torch.allclose(k[1], k[2])


def test_generate_with_cache_equals_without_token_for_token(rec):
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 is left-padded
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=mask)
    with torch.no_grad():
        cached = rec.generate(ids, use_cache=True, **kw)
        plain = rec.generate(ids, use_cache=False, **kw)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, plain)
    # and both are the greedy argmax of full passes, one token at a time (row 0: no padding)
    seq = ids[:1]
    for _ in range(10):
        seq = torch.cat([seq, full_logits(rec, seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached[:1], seq)


def test_logits_to_keep_and_the_mask_must_cover_the_cache(rec):
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        last = rec(ids, logits_to_keep=2, use_cache=False).logits
        cache = DynamicCache(config=rec.config)
        rec(ids[:, :4], cache=cache)
        with pytest.raises(ValueError, match="the cache holds 4 and the input 3"):
            rec(ids[:, 4:], cache=cache, attention_mask=torch.ones(1, 3))
    torch.testing.assert_close(last, full_logits(rec, ids)[:, -2:], atol=1e-5, rtol=1e-5)


def test_cached_lm_rolls_back_across_all_depths(rec):
    lm = CachedLM(rec)
    a = [3, 9, 4, 7, 1, 12, 8]
    b = [*a[:4], 30, 31, 33]  # shares 4 tokens: the cache is cropped to them
    for ids in (a, b, a[:5], b):
        got = lm.logits(ids, 3)
        torch.testing.assert_close(got, full_logits(rec, torch.tensor([ids]))[0, -3:],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
        assert all(layer.keys.shape[-2] == len(ids) for layer in lm.cache.layers)


def test_speculative_decoding_with_a_recursive_target_is_lossless(rec):
    drafter = convert_recursive(tiny_llama(), 2, "stepwise", rank=0).eval()
    prompt = [5, 17, 2, 40]
    greedy = Sampling(temperature=0)
    plain = generate(prompt, target=CachedLM(rec), sampling=greedy, max_new_tokens=12)
    spec = generate(prompt, target=CachedLM(rec), proposer=ModelProposer(drafter),
                    policy=GreedyMatch(), sampling=greedy, gamma=3, max_new_tokens=12)  # fmt: skip
    assert spec.tokens == plain.tokens and spec.lossless
    with torch.no_grad():  # = transformers' greedy generate()
        want = rec.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert plain.tokens == want[0, 4:].tolist()
    assert spec.metrics["drafted"] > spec.metrics["accepted"]  # rejections: rollbacks happened
