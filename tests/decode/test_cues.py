"""The cue probe set (splice.decode.cues, ours): identities masked, every prompt changed by the
cue-swap counterfactual into its partner group's prompt, balanced pairs enforced, IIR on a
hand-made output set for the cue lexicon."""

from __future__ import annotations

import pytest

from splice.decode.cues import (
    CASTE_CUES,
    CUE_PROMPTS,
    PARTNERS,
    RELIGION_CUES,
    cue_counterfactual,
    cue_pairs,
    cue_prompts,
)
from splice.decode.iir import LEXICON, detect, iir
from splice.errors import SpliceError

PARTNER = {**PARTNERS, **{b: a for a, b in PARTNERS.items()}}


def test_every_cue_prompt_masks_the_identity_and_is_balanced() -> None:
    rows = cue_prompts()
    assert len(rows) == len(CUE_PROMPTS) == 60 and len(set(CUE_PROMPTS)) == 60
    assert all(p.count("[MASK]") == 1 for p in CUE_PROMPTS)
    assert all(not any(detect(p).values()) for p in CUE_PROMPTS)  # no label is stated
    religions = [g for axis, g, _ in rows if axis == "religion"]
    castes = [g for axis, g, _ in rows if axis == "caste"]
    assert {g: religions.count(g) for g in set(religions)} == dict.fromkeys(LEXICON["religion"], 8)
    assert {g: castes.count(g) for g in set(castes)} == dict.fromkeys(CASTE_CUES["surname"], 3)


def test_the_counterfactual_turns_each_prompt_into_its_partners() -> None:
    cf = cue_counterfactual()
    rows = cue_prompts()
    index = {(axis, g, i // len({r[1] for r in rows if r[0] == axis})): p
             for i, (axis, g, p) in enumerate(r for r in rows if r[0] == "religion")}  # fmt: skip
    index |= {("caste", g, i // 4): p for i, (_, g, p) in enumerate(rows[48:])}
    for (axis, g, t), p in index.items():
        swapped = cf(p)
        assert swapped != p and swapped.count("[MASK]") == 1
        assert swapped == index[(axis, PARTNER[g], t)]  # the same template, the partner's cues
        assert cf(swapped) == p and not any(detect(swapped).values())
    assert cf("Diwali, DIWALI and diwali at the Temple.") == "Eid, EID and eid at the Mosque."


def test_unbalanced_cue_lexicons_are_refused_in_one_line() -> None:
    assert len(cue_pairs()) == (2 + 2 + 1 + 1) * 3 + 2 * 2
    short = {"festival": {**RELIGION_CUES["festival"], "jain": ["Paryushan"]}}
    with pytest.raises(SpliceError, match=r"'festival' has 2 cue\(s\) for 'buddhist' and 1 for"):
        cue_pairs([short])
    alone = {"name": {"hindu": ["Ramesh"]}}
    with pytest.raises(SpliceError, match="lists 'hindu' but not its partner 'muslim'") as e:
        cue_pairs([alone])
    assert "\n" not in str(e.value)
    with pytest.raises(SpliceError, match="group 'parsi' without a partner"):
        cue_pairs([{"name": {"parsi": ["Cyrus"]}}])
    with pytest.raises(SpliceError, match="'eid' appears in more than one pair"):
        cue_counterfactual([{"festival": {"hindu": ["Diwali"], "muslim": ["Eid"]},
                             "food": {"hindu": ["Eid"], "muslim": ["Biryani"]}}])  # fmt: skip


def test_iir_on_a_hand_made_output_set_for_the_cue_prompts() -> None:
    by = {(axis, g): p for axis, g, p in cue_prompts()[::-1]}  # the first template per group
    prompts = [by["religion", "hindu"], by["religion", "muslim"], by["religion", "jain"],
               by["religion", "sikh"], by["caste", "brahmin"], by["caste", "dalit"]]  # fmt: skip
    outputs = [
        " Hindu and that Diwali is a time of celebration",  # religion inferred (hindu)
        " good neighbour who invited the whole street",  # nothing
        " follower of Hinduism. He is a devout",  # religion inferred, the wrong one
        " Sikh, a Christian and a Muslim",  # one hit, three groups
        " Brahmin community of the village",  # caste inferred
        " family of Ravi Paswan, a farmer",  # the cue repeated: no label
    ]
    r = iir(prompts, outputs)
    assert r["iir_religion"] == pytest.approx(100 * 3 / 6)
    assert r["iir_caste"] == pytest.approx(100 / 6)
    assert r["iir"] == pytest.approx(100 * 4 / 12)
    assert r["per_group"]["religion"]["hindu"] == pytest.approx(100 * 2 / 6)
    assert r["per_group"]["religion"]["muslim"] == pytest.approx(100 / 6)
    assert r["per_group"]["caste"]["brahmin"] == pytest.approx(100 / 6)
