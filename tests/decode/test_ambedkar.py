"""AMBEDKAR pieces (spec other.md §2): the counterfactual operator, the divergence registry,
the verifier scorer (shared and bridged tokenizers), the re-ranking engine, and IIR."""

from __future__ import annotations

import pytest
import torch

from splice.decode import Candidates, ModelProposer, RerankTopK, generate
from splice.decode.ambedkar import CounterfactualDivergenceScorer, require_same_vocab
from splice.decode.counterfactual import Counterfactual, parse_pairs
from splice.decode.divergence import DIVERGENCES, js_full
from splice.decode.iir import LEXICON, PROBE_PROMPTS, PROTECTED, iir
from splice.errors import SpliceError

from .conftest import WORDS, tiny_llama, word_tokenizer


def test_counterfactual_swaps_keep_case_and_punctuation() -> None:
    cf = Counterfactual(protected=PROTECTED)
    assert cf("The Violent, RICH man was [MASK].") == "The Peaceful, POOR man was [MASK]."
    assert cf("Hindu and Muslim") == "Hindu and Muslim"  # framing mode never touches identities
    swap = Counterfactual([("hindu", "muslim"), ("temple", "mosque")], mode="identity_swap")
    assert swap("A Hindu went to the temple.") == "A Muslim went to the mosque."


def test_unbalanced_pairs_are_refused() -> None:
    with pytest.raises(SpliceError, match=r"line 2 'rich, poor, broke' has 3 term\(s\)"):
        parse_pairs(["violent, peaceful", "rich, poor, broke"], source="terms.txt")
    with pytest.raises(SpliceError, match="line 1 'lonely' has 1 term"):
        parse_pairs(["lonely"])
    with pytest.raises(SpliceError, match="'rich' appears in more than one pair"):
        Counterfactual([("rich", "poor"), ("rich", "wealthy")])
    with pytest.raises(SpliceError, match="protected term 'hindu'"):
        Counterfactual([("hindu", "muslim")], protected=PROTECTED)


def test_js_terms_sum_to_the_full_js() -> None:
    g = torch.Generator().manual_seed(0)
    p, q = (torch.softmax(torch.randn(50, generator=g) * 2, -1) for _ in range(2))
    terms = DIVERGENCES["js_term"](p, q)
    assert (terms >= 0).all()
    torch.testing.assert_close(terms.sum(), js_full(p, q))
    assert float(js_full(p, p)) == pytest.approx(0, abs=1e-6)


def _scorer(**kw) -> tuple[CounterfactualDivergenceScorer, torch.nn.Module]:
    verifier = tiny_llama(vocab=len(WORDS), seed=11, sharpen=3.0)
    cf = Counterfactual(protected=PROTECTED)
    return CounterfactualDivergenceScorer(verifier, word_tokenizer(WORDS), cf, **kw), verifier


def test_scorer_is_minus_the_js_term_of_two_independent_passes() -> None:
    tok = word_tokenizer(WORDS)
    scorer, verifier = _scorer()
    ids = [*tok.encode("the violent man was", add_special_tokens=False), 11]  # + "very"
    cand = Candidates(torch.tensor([8, 9, 3]), torch.zeros(3))
    fact = tok.encode("the violent man was very", add_special_tokens=False)
    counter = tok.encode("the peaceful man was very", add_special_tokens=False)
    with torch.no_grad():
        a = torch.softmax(verifier(torch.tensor([fact])).logits[0, -1], -1)[cand.tokens]
        b = torch.softmax(verifier(torch.tensor([counter])).logits[0, -1], -1)[cand.tokens]
    m = a + b
    expect = -0.5 * (a * torch.log(2 * a / m) + b * torch.log(2 * b / m))
    torch.testing.assert_close(scorer.score(ids, 4, cand), expect)
    # nothing to swap: both branches are equal and every candidate scores 0
    same = tok.encode("Hindu man was", add_special_tokens=False)
    assert scorer.score(same, 3, cand).abs().max() < 1e-7


def test_bridge_scores_through_the_verifiers_own_tokenizer() -> None:
    """A verifier with a permuted vocabulary: the bridge must map candidates by text."""
    tok = word_tokenizer(WORDS)
    perm = WORDS[:1] + WORDS[1:][::-1]
    vtok = word_tokenizer(perm)
    verifier = tiny_llama(vocab=len(WORDS), seed=12, sharpen=3.0)
    cf = Counterfactual(protected=PROTECTED)
    scorer = CounterfactualDivergenceScorer(verifier, tok, cf, verifier_tokenizer=vtok)
    assert scorer.bridge
    ids = tok.encode("the rich man", add_special_tokens=False)
    cand = Candidates(torch.tensor([5, 14]), torch.zeros(2))  # "was", "said"
    vfact = vtok.encode("the rich man", add_special_tokens=False)
    vcounter = vtok.encode("the poor man", add_special_tokens=False)
    want = [vtok.convert_tokens_to_ids(w) for w in ("was", "said")]
    with torch.no_grad():
        a = torch.softmax(verifier(torch.tensor([vfact])).logits[0, -1], -1)[want]
        b = torch.softmax(verifier(torch.tensor([vcounter])).logits[0, -1], -1)[want]
    expect = -DIVERGENCES["js_term"](a, b)
    torch.testing.assert_close(scorer.score(ids, 3, cand), expect)
    with pytest.raises(SpliceError, match="differs from the target's"):
        require_same_vocab(tok, vtok)


def test_ambedkar_rerank_runs_on_the_engine_and_is_not_lossless() -> None:
    tok = word_tokenizer(WORDS)
    drafter = tiny_llama(vocab=len(WORDS), seed=13, sharpen=3.0)
    scorer, _ = _scorer(divergence="js_full_lookahead")
    prompt = tok.encode("the violent man was", add_special_tokens=False)
    out = generate(
        prompt,
        proposer=ModelProposer(drafter),
        policy=RerankTopK(k=4, weight=50.0),
        scorer=scorer,
        max_new_tokens=5,
    )
    assert len(out.tokens) == 5 and not out.lossless and out.policy == "rerank"
    assert out.metrics["scorer_calls"] == 5 * 4 * 2  # one lookahead pass per candidate per branch


def test_iir_on_a_hand_made_output_set() -> None:
    prompts = ["The [MASK] man was", "The Hindu man was", "A [MASK] woman", "The [MASK] boy"]
    outputs = [
        "a Muslim trader and a Dalit",  # religion + caste inferred
        "a devout Hindu.",  # named in the prompt: not an inference
        "kind and generous",  # nothing
        "from a Brahmin family, Brahmins say",  # caste only
    ]
    r = iir(prompts, outputs)
    assert r["n"] == 4
    assert r["iir_religion"] == pytest.approx(25.0) and r["iir_caste"] == pytest.approx(50.0)
    assert r["iir"] == pytest.approx(100 * 3 / 8)
    assert r["per_group"]["caste"]["brahmin"] == pytest.approx(25.0)
    assert r["per_group"]["religion"]["hindu"] == 0
    assert iir(["x"], ["SHUDRAS!"])["iir_caste"] == 100 and iir(["x"], ["shudrasy"])["iir"] == 0


def test_probe_set_masks_every_identity() -> None:
    assert len(PROBE_PROMPTS) == 40 and all("[MASK]" in p for p in PROBE_PROMPTS)
    assert all(not any(iir([p], [p])[f"iir_{a}"] for a in LEXICON) for p in PROBE_PROMPTS)
    # the default framing counterfactual changes every probe prompt (else every D(c) = 0 and
    # AMBEDKAR is greedy drafting), and never touches the identity slot
    cf = Counterfactual(protected=PROTECTED)
    assert all(cf(p) != p and cf(p).count("[MASK]") == 1 for p in PROBE_PROMPTS)


def test_lean_batched_scorer_and_joint_drafter_equal_the_unbatched_reference() -> None:
    """Both branches (and the drafter's row) in one LeanLM forward score as the separate
    transformers passes do, and AMBEDKAR then emits the same tokens."""
    tok = word_tokenizer(WORDS)
    model = tiny_llama(vocab=len(WORDS), seed=14, sharpen=12.0)
    kw = {"constitution": "the rich man said it was good and very good ."}
    ref = CounterfactualDivergenceScorer(model, tok, Counterfactual(protected=PROTECTED), **kw)
    lean = CounterfactualDivergenceScorer(
        model, tok, Counterfactual(protected=PROTECTED), lean=True, **kw
    )
    joint = CounterfactualDivergenceScorer(
        model, tok, Counterfactual(protected=PROTECTED), lean=True, **kw
    )
    drafter, proposer = ModelProposer(model), joint.joint_proposer()
    ids = tok.encode("the violent man was", add_special_tokens=False)
    for _ in range(4):
        cand = drafter.candidates(ids, 4)
        want = ref.score(ids, 4, cand)
        assert want.abs().max() > 1e-4  # the branches differ: the scores are not all 0
        torch.testing.assert_close(lean.score(ids, 4, cand), want, rtol=1e-4, atol=1e-7)
        got_cand, got = joint.propose_and_score(proposer, ids, 4, 4)
        assert got_cand.tokens.tolist() == cand.tokens.tolist()
        torch.testing.assert_close(got_cand.logq, cand.logq, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        ids = [*ids, int(cand.tokens[int((cand.logq - 50 * want).argmax())])]
    assert joint.propose_and_score(drafter, ids, 4, 4) is None  # not its joint proposer
    prompt = tok.encode("the violent man was", add_special_tokens=False)
    policy = RerankTopK(k=4, weight=50.0)
    a = generate(prompt, proposer=drafter, policy=policy, scorer=ref, max_new_tokens=6)
    b = generate(prompt, proposer=proposer, policy=policy, scorer=joint, max_new_tokens=6)
    assert a.tokens == b.tokens and b.metrics["drafter_calls"] == 6
    with pytest.raises(SpliceError, match="joint_proposer needs lean=True"):
        ref.joint_proposer()
