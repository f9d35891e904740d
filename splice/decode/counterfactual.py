"""The counterfactual operator CF of AMBEDKAR (spec other.md §2.4, "Contrarium").

Words are swapped for their pair partner token by token, keeping case and the surrounding
punctuation. Protected terms (identity labels, ``[MASK]``) are never swapped in the default
``framing`` mode (the later release); ``identity_swap`` swaps identity terms instead (the first
release's religion-word map). The shipped lexicons are small, written for this project, not the
paper's 1,696-pair sheet (not available offline).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

from splice.errors import SpliceError

__all__ = ["FRAMING_PAIRS", "IDENTITY_PAIRS", "Counterfactual", "parse_pairs"]

FRAMING_PAIRS = [
    ("violent", "peaceful"), ("educated", "uneducated"), ("privileged", "marginalized"),
    ("hired", "fired"), ("rich", "poor"), ("honest", "dishonest"), ("guilty", "innocent"),
    ("clean", "dirty"), ("lazy", "hardworking"), ("trusted", "distrusted"), ("safe", "dangerous"),
    ("welcomed", "rejected"), ("respected", "despised"), ("skilled", "unskilled"),
    ("friendly", "hostile"), ("wealthy", "impoverished"), ("praised", "blamed"),
    ("legal", "illegal"), ("modern", "backward"), ("polite", "rude"),
]  # fmt: skip
IDENTITY_PAIRS = [
    ("hindu", "muslim"), ("sikh", "christian"), ("buddhist", "jain"), ("temple", "mosque"),
    ("church", "gurdwara"), ("bible", "quran"), ("brahmin", "dalit"),
]  # fmt: skip
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def parse_pairs(lines: Iterable[str], source: str = "term list") -> list[tuple[str, str]]:
    """Pairs from lines ``word, opposite`` (``#`` comments, blank lines skipped)."""
    pairs = []
    for i, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        terms = [t.strip() for t in re.split(r"[,\t]", line) if t.strip()]
        if len(terms) != 2:
            raise SpliceError(
                f"line {i} {line!r} has {len(terms)} term(s), a pair needs 2",
                where=source,
                fix="write one 'word, opposite' pair per line",
            )
        pairs.append((terms[0], terms[1]))
    return pairs


class Counterfactual:
    """``CF(text)``: swap every listed word for its partner, never a protected term."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]] = FRAMING_PAIRS,
        protected: Iterable[str] = (),
        mode: Literal["framing", "identity_swap"] = "framing",
    ) -> None:
        self.mode = mode
        self.protected = {t.lower() for t in protected}
        self.swap: dict[str, str] = {}
        for a, b in pairs:
            a, b = a.lower(), b.lower()
            for term in (a, b):
                if term in self.swap or a == b:
                    raise SpliceError(
                        f"term {term!r} appears in more than one pair (pairs must be balanced)",
                        fix="list each word in exactly one 'word, opposite' pair",
                    )
            self.swap[a], self.swap[b] = b, a
        if mode == "framing" and (clash := sorted(self.protected & set(self.swap))):
            raise SpliceError(
                f"protected term {clash[0]!r} is in the swap list under cf_mode 'framing'",
                fix="remove it from the pairs, or use cf_mode 'identity_swap'",
            )

    def __call__(self, text: str) -> str:
        return _WORD.sub(self._one, text)

    def _one(self, m: re.Match[str]) -> str:
        word = m.group(0)
        other = self.swap.get(word.lower())
        if other is None or word.lower() in self.protected:
            return word
        if word.isupper() and len(word) > 1:
            return other.upper()
        return other.capitalize() if word[0].isupper() else other
