"""A sequence classifier as a reward model ``r(x, y)`` for value-guided decoding (spec §3.6).

The token ids (in the policy's tokenizer) are decoded to text, re-tokenised for the classifier
(capped at ``max_length``) and the reward is one output logit (``label``, default the last
class: "positive" for a two-class sentiment head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ClassifierReward"]


class ClassifierReward:
    """``reward(ids, prompt_len)`` = the classifier's ``label`` logit of the response text
    (with ``include_prompt``, of prompt + response)."""

    def __init__(
        self,
        classifier: nn.Module,
        tokenizer: Any,
        policy_tokenizer: Any,
        label: int = -1,
        max_length: int = 512,
        include_prompt: bool = False,
    ) -> None:
        self.model, self.tok, self.policy_tok = classifier.eval(), tokenizer, policy_tokenizer
        self.label, self.max_length, self.include_prompt = label, max_length, include_prompt

    @torch.inference_mode()
    def __call__(self, ids: Sequence[int], prompt_len: int) -> float:
        text = self.policy_tok.decode(list(ids if self.include_prompt else ids[prompt_len:]))
        enc = self.tok(text, return_tensors="pt", truncation=True, max_length=self.max_length)
        return float(self.model(**enc).logits[0, self.label])
