"""The LLM suite's data-driven merges and its per-task row: RegMean, RegMean++ and Fisher
merging wired to a causal LM, and EMR-Merging.

The statistics come from each task's *training* sequences, as its fine-tune saw them (the
instruction prefix, the prompt and the answer without its end token), run through that task's
fine-tuned model (:mod:`splice.merge.learned`: the deltas are swapped into the unmodified base
with ``torch.func.functional_call``). Sequences are left padded with explicit positions, so a
padded batch gives each real token the hidden states it has alone.

- **RegMean / RegMean++**: the Gram of every changed linear layer's inputs over the real
  tokens of ``stats_samples`` sequences per task (padding rows dropped through the ``rows=``
  mask); the forward stops at the decoder's last hidden state (no 49k-way output head).
- **Fisher merging**: the *empirical* Fisher of the answer-token LM loss — per sequence, the
  squared gradient of ``Σ log p(answer token | prefix)`` over the gold answer tokens (end
  token included), the prompt positions ignored (label −100) — as the fine-tune's own
  objective; one forward and backward per sequence.
- **EMR-Merging** (:mod:`splice.merge.fusion.emr`): not one dense model; each task is scored
  with its own rebuilt model ``θ₀ + λ_t·M_t ⊙ τ_uni``. Its extra parameters are the per-task
  packed masks and rescalers counted in float32 parameters (bytes / 4), as the paper
  protocol counts them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from splice.bench.llm_eval import Encoded

__all__ = [
    "LLM_LEARNED",
    "NOT_IN_ALL",
    "LMSequences",
    "answer_labels",
    "emr_rows",
    "hidden_forward",
    "learned_merge",
]

# The learned merges whose objective is defined for a causal LM scored by generation, with the
# settings the suite runs them at (stats_samples sequences per task replace num_samples).
LLM_LEARNED: dict[str, dict[str, Any]] = {
    "regmean": {"batch_size": 8},
    "regmean_plusplus": {"batch_size": 8},
    "fisher": {"target": "labels"},
}
# Wired but not part of ``--methods all`` (the full profile), with the reason: their statistics
# cost more than the full profile's 120-minute bound leaves.
NOT_IN_ALL = {
    "regmean_plusplus": "wired (run it with --methods regmean_plusplus) but not in 'all': its "
    "statistics re-run each task's sequences once per decoder block (about 15 RegMean passes "
    "on SmolLM2's 30 blocks), over the full profile's time bound",
    "fisher": "wired (run it with --methods fisher) but not in 'all': one forward and backward "
    "per sequence, over the full profile's time bound",
}


class LMSequences:
    """The first ``count`` training sequences of a task (prefix + prompt + answer without its
    end token): ``len()`` and ``batch(idx, device)`` → left-padded ``input_ids``,
    ``attention_mask`` and ``position_ids`` (the data of :mod:`splice.merge.learned`)."""

    def __init__(self, enc: Encoded, pad: int, count: int) -> None:
        n = min(count, len(enc))
        self.seqs = [[*enc.prefix, *enc.prompts[i], *enc.answers[i][:-1]] for i in range(n)]
        self.pad = pad

    def __len__(self) -> int:
        return len(self.seqs)

    def batch(self, idx: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        seqs = [self.seqs[int(i)] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.as_tensor(s)
            mask[r, width - len(s) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "position_ids": pos.to(device)}  # fmt: skip


def answer_labels(enc: Encoded, count: int) -> Tensor:
    """``(count, W)`` gold answer tokens (end token included) aligned to the right edge of
    :class:`LMSequences`' rows, −100 to the left of each answer; W = the longest answer."""
    answers = enc.answers[: min(count, len(enc))]
    width = max(len(a) for a in answers)
    out = torch.full((len(answers), width), -100, dtype=torch.long)
    for r, a in enumerate(answers):
        out[r, width - len(a) :] = torch.as_tensor(a)
    return out


def hidden_forward(module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The decoder's last hidden state of a :class:`LMSequences` batch."""
    return module.get_decoder()(**batch).last_hidden_state


def _answer_logits(width: int) -> Any:
    """``forward(module, batch)``: the LM logits at the last ``width`` positions, which
    predict the answer tokens of :func:`answer_labels` (a sequence's last input token
    predicts the end token)."""

    def forward(module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        hidden = hidden_forward(module, batch)[:, -width:]
        return module.get_output_embeddings()(hidden)

    return forward


def learned_merge(
    method: str,
    model: nn.Module,
    deltas: Mapping[str, Mapping[str, Any]],
    train: Mapping[str, Encoded],
    pad: int,
    samples: int,
    seed: int = 0,
    params: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Run a learned merge of :data:`LLM_LEARNED` on ``model`` (holding the base weights)
    with statistics from ``samples`` training sequences per task; returns the merged tensors
    and the method's info (``stats_seconds`` among them)."""
    from splice.merge.learned import learned

    spec = learned.get(method)
    kw = {**LLM_LEARNED[method], "num_samples": samples, **(params or {})}
    if method == "fisher":
        data: dict[str, Any] = {
            t: (LMSequences(e, pad, samples), answer_labels(e, samples)) for t, e in train.items()
        }
        width = max(int(lab.shape[1]) for _, lab in data.values())
        data = {t: (s, _pad_left(lab, width)) for t, (s, lab) in data.items()}
        forward = _answer_logits(width)
    else:
        data = {t: LMSequences(e, pad, samples) for t, e in train.items()}
        forward = hidden_forward
    out = spec.run(
        model, deltas, data, params=kw, forward=forward,
        rows=lambda b: b["attention_mask"], seed=seed,
    )  # fmt: skip
    return out.weights, out.info


def _pad_left(labels: Tensor, width: int) -> Tensor:
    extra = width - labels.shape[1]
    return torch.cat([labels.new_full((labels.shape[0], extra), -100), labels], 1)


def emr_rows(
    base: Mapping[str, Tensor], dws: Sequence[Mapping[str, Tensor]], tasks: Sequence[str]
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """EMR-Merging of the tasks' ΔW: each task's rebuilt weights and the row's extras
    (``extra_params``: masks and rescalers in float32 parameters; ``merge_s``)."""
    from splice.merge.fusion.emr import emr_merge

    start = time.perf_counter()
    emr = emr_merge(dict(zip(tasks, dws, strict=True)))
    weights = {t: emr.weights(base, t) for t in tasks}
    extra = {
        "extra_params": int(emr.extra_params()),
        "merge_s": round(time.perf_counter() - start, 2),
        "scales": {t: round(s, 4) for t, s in emr.scales.items()},
    }
    return weights, extra
