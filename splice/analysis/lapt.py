"""LAPT — Layer-wise Adversarial Patch Training: the pure pieces (other.md §7.7).

Supervised fine-tuning on prompt + the model's own safe response, with a fresh
statistics-matched Gaussian perturbation (§7.2) added to block ``ℓ``'s output at every
response position of every training forward. Each position's statistics come from its own
clean state: block ``ℓ``'s output before the addition (detached), which equals the clean
no-grad pass of the released code because nothing upstream of block ``ℓ`` is perturbed.
Labels cover the response only ([lib]; the code trained on prompt and padding too). The
training loop is :func:`splice.train.lapt.train_lapt`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from splice.analysis.perturb import stats_matched
from splice.probe import Hooks, Replace

__all__ = ["collate_sft", "lapt_loss", "lapt_perturbation", "perplexity"]


def collate_sft(pairs: Sequence[tuple[Tensor, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (``-100`` outside the
    response) and ``response_mask`` (the response tokens' positions) for (prompt, response)."""
    length = max(p.numel() + r.numel() for p, r in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(pairs):
        n, m = p.numel(), r.numel()
        ids[i, : n + m] = torch.cat([p.view(-1), r.view(-1)])
        attn[i, : n + m] = 1
        labels[i, n : n + m] = r.view(-1)
        resp[i, n : n + m] = True
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "response_mask": resp}


def lapt_perturbation(mask: Tensor, generator: torch.Generator) -> Replace:
    """``h + mask · stats_matched(z, h)`` with ``z ~ N(0, I)`` drawn per position."""

    def perturb(hidden: Tensor, pos: Tensor) -> Tensor:
        z = torch.randn(hidden.shape, generator=generator, dtype=torch.float32)
        delta = stats_matched(z.to(hidden.device), hidden.detach())
        return hidden + delta * mask[:, : hidden.shape[1], None].to(hidden.dtype)

    return perturb


def lapt_loss(
    model: nn.Module, batch: dict[str, Tensor], layer: int, generator: torch.Generator
) -> Tensor:
    """The LM loss on the response tokens with block ``layer`` perturbed (one forward)."""
    with Hooks(model) as h:
        h.replace(layer, lapt_perturbation(batch["response_mask"], generator))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return _lm_loss(logits, batch["labels"])


def _lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


@torch.no_grad()
def perplexity(model: nn.Module, texts: Sequence[Tensor]) -> float:
    """``exp`` of the mean next-token NLL over all tokens of ``texts`` (token-weighted)."""
    total, count = 0.0, 0
    for ids in texts:
        ids = ids.view(1, -1)
        logits = model(ids).logits[0, :-1].double()
        total += nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return float(torch.tensor(total / count).exp())
