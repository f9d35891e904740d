"""Single-object tracking pieces shared by LoRAT and SEATrack (issue #34): crops, boxes, the
anchor-free MLP head, its loss, the causal tracking loop and the metrics.

Boxes are ``(x0, y0, x1, y1)`` in pixels. Success is the area under the success plot (the
fraction of frames whose IoU with the truth exceeds a threshold, averaged over thresholds
0, 0.05, …, 1, as OTB/LaSOT report "AUC"); precision is the fraction of frames whose predicted
centre lies within ``px`` pixels of the true one (OTB uses 20 px on full-size video; our
targets are ~12 px, so the default is 4 px).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.errors import SpliceError

__all__ = [
    "MLPHead",
    "best_box",
    "box_iou",
    "check_tiling",
    "crop",
    "foreground_tokens",
    "head_loss",
    "precision",
    "success_auc",
    "track",
]

Predict = Callable[[list[Tensor], list[Tensor], Tensor], Tensor]
"""(templates per stream, searches per stream, template foreground (B, Nt)) → boxes (B, 4)
in search-crop pixels."""


def check_tiling(size: int, patch: int, what: str) -> None:
    """A crop side must be a positive multiple of the patch size."""
    if size <= 0 or size % patch:
        raise SpliceError(
            f"{what} size {size} does not tile the {patch}px patch grid",
            fix=f"use a multiple of {patch}, e.g. {max(patch, size // patch * patch)}",
        )


def crop(frames: Tensor, centres: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``size``×``size`` crops of (B, H, W) frames centred (rounded) at (B, 2) ``(cx, cy)``,
    zero outside the frame; returns (crops, their top-left corners (B, 2) in frame pixels)."""
    _, h, w = frames.shape
    corner = torch.round(centres - size / 2).long()
    padded = F.pad(frames, (size, size, size, size))
    out = torch.stack(
        [padded[i, y + size : y + 2 * size, x + size : x + 2 * size] for i, (x, y) in enumerate(
            corner.clamp(-size, max(h, w)).tolist()
        )]
    )  # fmt: skip
    return out, corner.to(frames.dtype)


def foreground_tokens(boxes: Tensor, size: int, patch: int) -> Tensor:
    """(B, (size/patch)²) long: 1 where a template patch's centre lies inside the (B, 4) box
    given in template-crop pixels (LoRAT's foreground indicator)."""
    g = size // patch
    c = (torch.arange(g, dtype=boxes.dtype) + 0.5) * patch
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    cx, cy = cx.reshape(1, -1), cy.reshape(1, -1)
    x0, y0, x1, y1 = (boxes[:, i : i + 1] for i in range(4))
    return ((cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)).long()


class MLPHead(nn.Module):
    """Anchor-free head, MLP only (LoRAT): per search token a centre score and a box — the
    centre's offset inside the token's cell and the size, both through a sigmoid."""

    def __init__(self, dim: int, hidden: int, patch: int, search: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, 5)
        self.patch, self.search = patch, search

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Ns, d) search tokens → (scores (B, Ns), boxes (B, Ns, 4) in crop pixels)."""
        o = self.out(F.gelu(self.hidden(tokens)))
        g = self.search // self.patch
        idx = torch.arange(g * g, device=tokens.device)
        cell = torch.stack([idx % g, idx // g], -1).to(o.dtype)  # (Ns, 2) = (col, row)
        centre = (cell + o[..., 1:3].sigmoid()) * self.patch
        half = o[..., 3:5].sigmoid() * self.search / 2
        return o[..., 0], torch.cat([centre - half, centre + half], -1)


def _giou(a: Tensor, b: Tensor) -> Tensor:
    inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    area = (a[:, 2:] - a[:, :2]).prod(-1) + (b[:, 2:] - b[:, :2]).prod(-1) - inter
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).prod(-1)
    iou = inter / area.clamp(min=1e-6)
    return iou - (hull - area) / hull.clamp(min=1e-6)


def head_loss(scores: Tensor, boxes: Tensor, truth: Tensor, patch: int) -> Tensor:
    """Cross-entropy over search tokens for the cell holding the true centre, plus L1 (in
    patch units) and 1 − GIoU of that cell's box; ``truth`` (B, 4) in crop pixels."""
    g = _grid(scores.shape[1])
    centre = (truth[:, :2] + truth[:, 2:]) / 2
    cell = (centre / patch).floor().long().clamp(0, g - 1)
    target = cell[:, 1] * g + cell[:, 0]
    picked = boxes[torch.arange(len(boxes)), target]
    l1 = (picked - truth).abs().mean() / patch
    return F.cross_entropy(scores, target) + l1 + (1 - _giou(picked, truth)).mean()


def _grid(n: int) -> int:
    g = int(n**0.5 + 0.5)
    if g * g != n:
        raise SpliceError(f"{n} search tokens do not form a square grid")
    return g


def best_box(scores: Tensor, boxes: Tensor) -> Tensor:
    return boxes[torch.arange(len(boxes)), scores.argmax(-1)]


@torch.no_grad()
def track(
    predict: Predict,
    streams: Sequence[Tensor],
    init: Tensor,
    template: int,
    search: int,
    patch: int,
) -> Tensor:
    """Track causally through (N, L, H, W) frames of each stream from the (N, 4) first-frame
    boxes: the template is cut around the first box once; each later search crop is centred on
    the previous prediction. Returns (N, L, 4) boxes (frame 0: ``init``)."""
    length = streams[0].shape[1]
    centre = (init[:, :2] + init[:, 2:]) / 2
    templates, corners = [], None
    for s in streams:
        t, corners = crop(s[:, 0], centre, template)
        templates.append(t)
    fg = foreground_tokens(init - corners.repeat(1, 2), template, patch)
    out = [init]
    for t in range(1, length):
        searches = []
        for s in streams:
            crop_t, corner = crop(s[:, t], centre, search)
            searches.append(crop_t)
        box = predict(templates, searches, fg) + corner.repeat(1, 2)
        out.append(box)
        centre = (box[:, :2] + box[:, 2:]) / 2
    return torch.stack(out, 1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise IoU of (..., 4) boxes."""
    lo, hi = torch.max(a[..., :2], b[..., :2]), torch.min(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1) - inter
    return inter / union.clamp(min=1e-9)


def success_auc(pred: Tensor, truth: Tensor) -> float:
    """Mean over thresholds 0, 0.05, …, 1 of the fraction of boxes with IoU > threshold."""
    iou = box_iou(pred, truth).reshape(-1)
    thresholds = torch.linspace(0, 1, 21, dtype=iou.dtype)
    return float((iou[None] > thresholds[:, None]).float().mean())


def precision(pred: Tensor, truth: Tensor, px: float = 4.0) -> float:
    """Fraction of boxes whose centre is within ``px`` pixels of the true centre."""
    d = ((pred[..., :2] + pred[..., 2:]) - (truth[..., :2] + truth[..., 2:])) / 2
    return float((d.norm(dim=-1) <= px).float().mean())
