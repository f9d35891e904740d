"""AMBEDKAR's verifier as a scorer: counterfactual divergence (spec other.md §2.3, §2.10).

For each drafted candidate ``c`` the verifier gives ``a_c = v(c | x, y_<t)`` and
``b_c = v(c | CF(x), y_<t)`` (floored at 1e-10); the score is ``−D(a_c, b_c)``, so
:class:`~splice.decode.rerank.RerankTopK` with ``weight=α`` selects ``argmax ℓ_q − α D``.
Library defaults [lib]: ``cf_scope="prompt"`` perturbs the prompt once and appends the same
generated prefix to both branches (``"full_text"`` perturbs prompt and prefix every step, the
first release); an optional constitution preamble is prepended to both verifier branches
(a prompt-based verifier, in place of the paper's constitutional fine-tune, not available
offline). Heterogeneous pairs go through the tokenizer bridge: a candidate's probability is the
product of the verifier's probabilities of the verifier tokens its text adds.

Cost [lib]: ``lean=True`` runs the verifier on :class:`~splice.decode.lean.LeanLM` and both
branches in **one** batched forward per step (:func:`~splice.decode.lean.batched_logits`, each
branch on its own KV cache); :meth:`CounterfactualDivergenceScorer.joint_proposer` gives a
drafter on the verifier's own weights whose row joins that forward too (drafter = verifier
model, as in our SmolLM2 experiment), so a step costs one forward of three rows instead of three
forwards. Scores equal the unbatched ones up to float rounding (tests/decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.decode.base import Candidates
from splice.decode.counterfactual import Counterfactual
from splice.decode.divergence import DIVERGENCES, EPS, js_full
from splice.decode.draft import ModelProposer
from splice.decode.lean import LeanLM, batched_logits
from splice.decode.lm import CachedLM, common_prefix
from splice.errors import SpliceError

__all__ = ["CONSTITUTION", "CounterfactualDivergenceScorer", "require_same_vocab"]

CONSTITUTION = (
    "Every person is equal before the law. No one may be judged, excluded or described by "
    "religion, caste, race, sex or place of birth. Answer without assuming anyone's identity.\n"
)  # our paraphrase of the principle of Articles 14-17, not the paper's text


def require_same_vocab(a: Any, b: Any) -> None:
    """Refuse two tokenizers whose vocabularies differ (the lossless rule needs one vocabulary)."""
    if a.get_vocab() != b.get_vocab():
        na, nb = (getattr(t, "name_or_path", type(t).__name__) for t in (a, b))
        raise SpliceError(
            f"the drafter's tokenizer {nb!r} ({len(b)} tokens) differs from the target's "
            f"{na!r} ({len(a)} tokens)",
            fix="a lossless policy needs one tokenizer; use another drafter or --policy ambedkar",
        )


class CounterfactualDivergenceScorer:
    """Scores candidates by ``−D(v(c | factual), v(c | counterfactual))``."""

    def __init__(
        self,
        verifier: nn.Module | LeanLM,
        tokenizer: Any,
        cf: Counterfactual,
        divergence: Literal["js_term", "kl_term", "abs_diff", "js_full_lookahead"] = "js_term",
        cf_scope: Literal["prompt", "full_text"] = "prompt",
        constitution: str | None = None,
        verifier_tokenizer: Any | None = None,
        lean: bool = False,
    ) -> None:
        if divergence not in {*DIVERGENCES, "js_full_lookahead"}:
            raise SpliceError(
                f"unknown divergence {divergence!r}",
                fix=f"choose one of {', '.join([*DIVERGENCES, 'js_full_lookahead'])}",
            )
        if isinstance(verifier, LeanLM) and not lean:
            raise SpliceError("a LeanLM verifier needs lean=True")
        self.name = "counterfactual-divergence"
        self.tok, self.vtok = tokenizer, verifier_tokenizer or tokenizer
        self.bridge = verifier_tokenizer is not None and (
            verifier_tokenizer.get_vocab() != tokenizer.get_vocab()
        )
        if self.bridge and divergence == "js_full_lookahead":
            raise SpliceError("divergence 'js_full_lookahead' needs a shared tokenizer")
        self.cf, self.divergence, self.cf_scope = cf, divergence, cf_scope
        self.preamble = constitution or ""
        self.lean, self.joint = lean, None
        if lean:  # one packed copy of the weights (a given LeanLM's, shared), two KV caches
            packed = verifier if isinstance(verifier, LeanLM) else LeanLM(verifier, "verifier")
            self.factual = packed.fork("verifier")
            self.counter = self.factual.fork("verifier-cf")
        else:
            self.factual, self.counter = CachedLM(verifier, "verifier"), CachedLM(verifier, "cf")

    @property
    def calls(self) -> int:
        return self.factual.calls + self.counter.calls

    def texts(self, ids: Sequence[int], prompt_len: int) -> tuple[str, str]:
        """The factual and counterfactual verifier contexts as text."""
        prompt, rest = self._split(ids, prompt_len)
        if self.cf_scope == "full_text":
            return self.preamble + prompt + rest, self.preamble + self.cf(prompt + rest)
        return self.preamble + prompt + rest, self.preamble + self.cf(prompt) + rest

    def score(self, ids: Sequence[int], prompt_len: int, cand: Candidates) -> Tensor:
        fact, counter = self.texts(ids, prompt_len)
        tokens = cand.tokens.tolist()
        if self.bridge:
            words = [self._split([*ids, c], prompt_len)[1] for c in tokens]
            a = self._bridged(self.factual, fact, words, ids, prompt_len)
            b = self._bridged(self.counter, counter, words, ids, prompt_len)
        else:
            fids, cids = self._encode(fact), self._encode(counter)
            if self.divergence == "js_full_lookahead":
                return -torch.stack(
                    [js_full(self._probs(self.factual, [*fids, c]),
                             self._probs(self.counter, [*cids, c])) for c in tokens]
                )  # fmt: skip
            if self.lean:  # both branches in one forward
                a, b = torch.softmax(batched_logits([self.factual, self.counter], [fids, cids]), -1)
                a, b = a[tokens], b[tokens]
            else:
                a = self._probs(self.factual, fids)[tokens]
                b = self._probs(self.counter, cids)[tokens]
        return self._divergence(a, b)

    def joint_proposer(self, name: str = "drafter") -> ModelProposer:
        """A drafter on the verifier's own weights whose row joins the verifier's batched
        forward (:meth:`propose_and_score`; ``lean=True``, shared tokenizer, ``js_term``-style
        divergences). Its candidates are the verifier model's top-k without the preamble."""
        if not self.lean or self.bridge or self.divergence == "js_full_lookahead":
            raise SpliceError(
                "joint_proposer needs lean=True, one tokenizer and a per-token divergence",
                fix="use ModelProposer(drafter) and the scorer's score() instead",
            )
        self.joint = ModelProposer(self.factual.fork(name), name)  # type: ignore[union-attr]
        return self.joint

    def propose_and_score(
        self, proposer: Any, ids: Sequence[int], prompt_len: int, k: int
    ) -> tuple[Candidates, Tensor] | None:
        """The drafter's top-``k`` and their scores from one forward of three rows (drafter,
        factual, counterfactual); None unless ``proposer`` is this scorer's joint proposer."""
        if proposer is None or proposer is not self.joint:
            return None
        fact, counter = self.texts(ids, prompt_len)
        seqs = [list(ids), self._encode(fact), self._encode(counter)]
        logits = batched_logits([proposer.lm, self.factual, self.counter], seqs)
        logq = torch.log_softmax(logits[0], -1)
        top = logq.topk(k)
        a, b = torch.softmax(logits[1:], -1)[:, top.indices]
        return Candidates(top.indices, top.values), self._divergence(a, b)

    def _divergence(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = a.clamp_min(EPS), b.clamp_min(EPS)
        return -DIVERGENCES[self.divergence](a, b)

    def _split(self, ids: Sequence[int], prompt_len: int) -> tuple[str, str]:
        """The prompt's text and the text the generated tokens add to it."""
        prompt, full = self.tok.decode(list(ids[:prompt_len])), self.tok.decode(list(ids))
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
        return prompt, self.tok.decode(list(ids[prompt_len:]))

    def _encode(self, text: str) -> list[int]:
        return list(self.vtok.encode(text, add_special_tokens=False))

    @staticmethod
    def _probs(lm: CachedLM | LeanLM, ids: list[int]) -> Tensor:
        return torch.softmax(lm.logits(ids, 1)[0], -1)

    def _bridged(
        self,
        lm: CachedLM | LeanLM,
        context: str,
        words: list[str],
        ids: Sequence[int],
        prompt_len: int,
    ) -> Tensor:
        """P_verifier(the verifier tokens a candidate's text adds | context) (spec §2.3)."""
        rest = self._split(ids, prompt_len)[1]
        head = context[: len(context) - len(rest)]
        base = self._encode(context)
        out = []
        for w in words:  # w = generated text + the candidate, decoded together
            full = self._encode(head + w)
            start = max(1, min(common_prefix(base, full), len(full) - 1))
            logp = torch.log_softmax(lm.logits(full[:-1], len(full) - start), -1)
            new = torch.tensor(full[start:])[:, None]
            out.append(float(logp.gather(1, new).sum().exp()))
        return torch.tensor(out)
