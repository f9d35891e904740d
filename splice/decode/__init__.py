"""Decoding-time methods on one guided speculative engine (spec other.md §1–3, issue #29).

    from splice.decode import CachedLM, ModelProposer, Sampling, early_exit, generate
    target = CachedLM(model)
    out = generate(prompt_ids, target=target, proposer=ModelProposer(early_exit(model, 8)),
                   sampling=Sampling(temperature=0), gamma=4, max_new_tokens=64)
    out.tokens, out.lossless, out.metrics["alpha"]

Pieces, one per file: :mod:`.sampling` (the logit processor φ), :mod:`.lm` (a model behind a
KV cache with rollback), :mod:`.lean` (a packed-weight CPU forward with the same interface),
proposers (:mod:`.draft`, :mod:`.selfdraft`, :mod:`.qdraft`,
:mod:`.ngram`), policies
(:mod:`.lossless`, :mod:`.rerank`), scorers (:mod:`.ambedkar`, :mod:`.tq`), and
:mod:`.engine`, the one decoding loop. Nothing here updates a model's weights.
"""

from __future__ import annotations

from .base import Candidates, Draft, Proposer, Scorer
from .draft import ModelProposer
from .engine import Generation, generate
from .lean import LeanLM
from .lm import CachedLM
from .lossless import GreedyMatch, LosslessRejection
from .ngram import NgramProposer
from .qdraft import int8_draft
from .rerank import RerankTopK
from .sampling import Sampling, sample, warp
from .selfdraft import early_exit

__all__ = [
    "CachedLM",
    "Candidates",
    "Draft",
    "Generation",
    "GreedyMatch",
    "LeanLM",
    "LosslessRejection",
    "ModelProposer",
    "NgramProposer",
    "Proposer",
    "RerankTopK",
    "Sampling",
    "Scorer",
    "early_exit",
    "generate",
    "int8_draft",
    "sample",
    "warp",
]
