"""Multi-task dense vision on the hierarchical backbone [ours]: heads, losses, scores, and the
two references the dense methods are measured against (issue #34, peft.md §18–19).

Four tasks share one :class:`~splice.domains.backbones.hier.HierBackbone`: ``mask``
(foreground segmentation), ``saliency`` (per-pixel regression), ``edges`` (boundary
segmentation) and ``cls`` (classification). Dense heads fuse every stage (a linear per stage
to a common width, upsampled to the first stage's grid and summed, then a linear to the
pixels of each patch: an MLP-only FPN); the classification head reads the mean-pooled last
stage. :class:`MultiTask` runs one task per batch and asks its subclass for the two backbone
hooks (prefix tokens, a function after each block): full multi-task fine-tuning is the
class itself with everything trainable, :class:`PerTaskAdapters` adds a private bottleneck
adapter per task and block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.domains.backbones.hier import BlockHook, HierBackbone
from splice.errors import SpliceError

__all__ = [
    "DENSE_TASKS",
    "TASK_TYPES",
    "Bottleneck",
    "DenseHead",
    "MultiTask",
    "PerTaskAdapters",
    "freeze",
    "task_loss",
    "task_score",
]

DENSE_TASKS = ("mask", "saliency", "edges", "cls")
TASK_TYPES = {
    "mask": "segmentation",
    "saliency": "regression",
    "edges": "segmentation",
    "cls": "classification",
}
"""Each task's type (TAP-SLF groups its prompts by type)."""


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class DenseHead(nn.Module):
    """Per-pixel output (B, out, S, S) from the stage maps (an MLP-only FPN)."""

    def __init__(self, widths: tuple[int, ...], patch: int, out: int = 1, dim: int = 32):
        super().__init__()
        self.patch, self.out_ch = patch, out
        self.lateral = nn.ModuleList(nn.Linear(w, dim) for w in widths)
        self.out = nn.Linear(dim, patch * patch * out)

    def forward(self, maps: list[Tensor]) -> Tensor:
        g = maps[0].shape[-1]
        fused = 0
        for lat, m in zip(self.lateral, maps, strict=True):
            y = lat(m.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            fused = fused + (
                y if y.shape[-1] == g else F.interpolate(y, size=(g, g), mode="nearest")
            )
        pix = self.out(F.gelu(fused).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.pixel_shuffle(pix, self.patch)


class ClassHead(nn.Module):
    def __init__(self, width: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, maps: list[Tensor]) -> Tensor:
        return self.fc(maps[-1].mean((2, 3)))


def make_heads(backbone: HierBackbone, tasks: tuple[str, ...], classes: int = 10) -> nn.ModuleDict:
    cfg = backbone.cfg
    return nn.ModuleDict(
        {
            t: ClassHead(cfg.widths[-1], classes)
            if t == "cls"
            else DenseHead(cfg.widths, cfg.patch)
            for t in tasks
        }
    )


def task_loss(task: str, pred: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy (cls), BCE on logits (mask, edges; edges weighted ×4 on the rare
    positives), MSE of the sigmoid (saliency)."""
    if task == "cls":
        return F.cross_entropy(pred, target)
    if task == "saliency":
        return F.mse_loss(torch.sigmoid(pred[:, 0]), target)
    weight = torch.tensor(4.0) if task == "edges" else None
    return F.binary_cross_entropy_with_logits(pred[:, 0], target, pos_weight=weight)


def task_score(task: str, pred: Tensor, target: Tensor) -> float:
    """Score in [.., 100]: accuracy (cls), foreground IoU (mask), F1 (edges), R² (saliency)."""
    if task == "cls":
        return 100.0 * (pred.argmax(-1) == target).float().mean().item()
    if task == "saliency":
        p = torch.sigmoid(pred[:, 0])
        return (
            100.0
            * (1 - (p - target).square().sum() / (target - target.mean()).square().sum()).item()
        )
    hit, true = pred[:, 0] > 0, target > 0.5
    tp = (hit & true).sum().item()
    if task == "mask":
        return 100.0 * tp / max((hit | true).sum().item(), 1)
    return 100.0 * 2 * tp / max(hit.sum().item() + true.sum().item(), 1)


class MultiTask(nn.Module):
    """The backbone, one head per task, and the hooks a method adds; one task per batch."""

    def __init__(
        self, backbone: HierBackbone, tasks: tuple[str, ...] = DENSE_TASKS, classes: int = 10
    ):
        super().__init__()
        unknown = sorted(set(tasks) - set(DENSE_TASKS))
        if unknown:
            raise SpliceError(
                f"unknown dense task(s) {unknown}", fix=f"choose from {list(DENSE_TASKS)}"
            )
        self.tasks = tuple(tasks)
        self.backbone = backbone
        self.heads = make_heads(backbone, self.tasks, classes)

    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise SpliceError(
                f"task {task!r} is not one of this model's", fix=f"use one of {list(self.tasks)}"
            )
        return self.tasks.index(task)

    def hooks(self, task: str) -> tuple[dict[int, Tensor] | None, BlockHook | None]:
        """(prefix tokens by block, function after each block) for ``task``; none here."""
        return None, None

    def forward(self, images: Tensor, task: str) -> Tensor:
        self.task_index(task)
        prefix, after = self.hooks(task)
        return self.heads[task](self.backbone.features(images, prefix, after))


class Bottleneck(nn.Module):
    """``h + Up(GELU(Down(h)))`` with ``Up`` zero-initialised (the adapter starts as identity)."""

    def __init__(self, dim: int, r: int):
        super().__init__()
        self.down, self.up = nn.Linear(dim, r), nn.Linear(r, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(F.gelu(self.down(x)))


class PerTaskAdapters(MultiTask):
    """Frozen backbone; a private :class:`Bottleneck` (width/``ratio``) per task and block."""

    def __init__(
        self,
        backbone: HierBackbone,
        tasks: tuple[str, ...] = DENSE_TASKS,
        ratio: int = 8,
        classes: int = 10,
    ):
        super().__init__(freeze(backbone), tasks, classes)
        widths = [backbone.cfg.widths[s] for s in backbone.stage_of]
        self.adapters = nn.ModuleList(
            nn.ModuleList(Bottleneck(w, max(1, w // ratio)) for w in widths) for _ in self.tasks
        )

    def hooks(self, task: str) -> tuple[None, BlockHook]:
        mine = self.adapters[self.task_index(task)]
        return None, lambda i, x: mine[i](x)
