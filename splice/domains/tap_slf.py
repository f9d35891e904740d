"""TAP-SLF: task-aware prompts + LoRA on the top blocks of a frozen backbone (peft.md §18).

From the released code (huiwanHW/Florence-2-adaptation; no paper): the first 70 % of blocks
frozen, LoRA (r 8, α 16, dropout 0.05) on the attention ``qkv`` and ``proj`` of the last 30 %,
whose MLPs and norms stay trainable; one group of prompt tokens per task *type*
(TruncNormal std 0.02). The three layer sets are explicit (:func:`layer_sets`):

- ``fidelity="intended"`` (default): frozen = the first ``⌊0.7·n⌋`` blocks, LoRA = all the
  others, nothing fully trained, the patch-merging layers frozen.
- ``fidelity="code"``: what the released rounding does — frozen ``⌊0.7·n⌋``, LoRA the last
  ``⌊0.3·n⌋``, the blocks in between fully trained, the patch merging (downsampling) trainable.

Prompts follow the *intended* semantics, not the released bug (there they were concatenated
after the last stage and sliced off at once, so they had no effect): a task type's tokens are
prepended to the tokens entering the first LoRA block, so attention in the adapted blocks reads
them, and are stripped at the end of that stage, before the heads. When the LoRA blocks span
several stages, each of those stages gets its own tokens (of its width) entering its first
LoRA block [ours]. ``prompts=False`` is the ablation without them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from splice.adapters import inject
from splice.domains.backbones.hier import HierBackbone
from splice.domains.dense import DENSE_TASKS, TASK_TYPES, MultiTask
from splice.errors import SpliceError

__all__ = ["LayerSets", "TapSlf", "layer_sets"]


@dataclass(frozen=True)
class LayerSets:
    """Block indices frozen / LoRA-adapted / fully trained, and whether patch merging trains."""

    frozen: tuple[int, ...]
    lora: tuple[int, ...]
    full: tuple[int, ...]
    merges_trainable: bool


def layer_sets(
    n_blocks: int, frozen_fraction: float = 0.7, fidelity: Literal["intended", "code"] = "intended"
) -> LayerSets:
    """The three layer sets of TAP-SLF for ``n_blocks`` blocks (see the module docstring)."""
    if fidelity not in ("intended", "code"):
        raise SpliceError(f"unknown fidelity {fidelity!r}", fix="use 'intended' or 'code'")
    if not 0 <= frozen_fraction < 1:
        raise SpliceError(f"frozen fraction {frozen_fraction} is not in [0, 1)", fix="e.g. 0.7")
    f = math.floor(n_blocks * frozen_fraction)
    if fidelity == "intended":
        if f >= n_blocks:
            raise SpliceError(
                f"{n_blocks} blocks leave none to adapt", fix="lower the frozen fraction"
            )
        return LayerSets(tuple(range(f)), tuple(range(f, n_blocks)), (), False)
    n_lora = math.floor(n_blocks * round(1 - frozen_fraction, 10))
    if n_lora == 0:
        raise SpliceError(
            f"⌊{n_blocks}·{1 - frozen_fraction:g}⌋ = 0 LoRA blocks", fix="use more blocks"
        )
    return LayerSets(
        tuple(range(f)),
        tuple(range(n_blocks - n_lora, n_blocks)),
        tuple(range(f, n_blocks - n_lora)),
        True,
    )


class TapSlf(MultiTask):
    """The multi-task model adapted by TAP-SLF; ``prompt_groups[type]`` holds a type's tokens
    (one ``(tokens, width)`` parameter per stage that has LoRA blocks)."""

    def __init__(
        self,
        backbone: HierBackbone,
        tasks: tuple[str, ...] = DENSE_TASKS,
        *,
        tokens: int = 10,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.05,
        frozen_fraction: float = 0.7,
        fidelity: Literal["intended", "code"] = "intended",
        prompts: bool = True,
        classes: int = 10,
    ):
        super().__init__(backbone, tasks, classes)
        self.sets = sets = layer_sets(len(backbone.blocks), frozen_fraction, fidelity)
        targets = [f"blocks.{i}.attn.{m}" for i in sets.lora for m in ("qkv", "proj")]
        inject(backbone, "lora", targets, r=r, alpha=alpha, dropout=dropout)
        for i in sets.lora:
            for name, p in backbone.blocks[i].named_parameters():
                if not name.startswith("attn.") or "lora" in name or ".adapter" in name:
                    p.requires_grad_(True)
        for i in sets.full:
            backbone.blocks[i].requires_grad_(True)
        if sets.merges_trainable:
            backbone.merges.requires_grad_(True)
        self.entry: dict[int, int] = {}  # stage → its first LoRA block
        for i in sets.lora:
            self.entry.setdefault(backbone.stage_of[i], i)
        self.prompt_groups = nn.ModuleDict()
        if prompts:
            for kind in sorted({TASK_TYPES[t] for t in self.tasks}):
                group = nn.ParameterList()
                for s in self.entry:
                    p = nn.Parameter(torch.empty(tokens, backbone.cfg.widths[s]))
                    nn.init.trunc_normal_(p, std=0.02)
                    group.append(p)
                self.prompt_groups[kind] = group
        self.ablate = False

    def hooks(self, task: str) -> tuple[dict[int, Tensor] | None, None]:
        kind = TASK_TYPES[task]
        if self.ablate or kind not in self.prompt_groups:
            return None, None
        group = self.prompt_groups[kind]
        return {block: group[j] for j, block in enumerate(self.entry.values())}, None
