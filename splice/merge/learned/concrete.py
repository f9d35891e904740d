"""Concrete subspace merging: a shared learned mask over task vectors (Tang et al., 2023).

merging.md §11: mask logits ℓ, one per task-vector entry and shared by all tasks (init 0), a
relaxed Bernoulli (Concrete) sample ``m = σ((ℓ + g)/τ)`` with logistic noise g, and masked
task vectors ``τ_t ⊙ m / mean(m)`` (mean per tensor). The mask minimises the summed prediction
entropy with the host merge as the inner problem:

- ``inner="ta"``: fixed coefficients ``scale`` (0.3); one Adam step (lr 1e-3) on ℓ per step;
- ``inner="adamerging"``: per meta-step, reset the coefficients to ``scale``, take one inner
  Adam step (lr 1.0, state kept across steps) on them with the mask sample held fixed, then
  one outer step on ℓ through the re-merged model (first-order bi-level, as coded); finally
  draw one mask and run plain AdaMerging on the masked task vectors.

The final model uses one mask sample (``discrete``: a Bernoulli draw instead of the relaxed
one), seeded. Like AdaMerging, the paper adapts on unlabeled test inputs (transductive).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from splice.merge.base import HyperParams
from splice.merge.learned._base import LearnedMerge, LearnedMethod, learned
from splice.merge.learned._data import Progress, progress_bar, streams
from splice.merge.learned._functional import (
    Forward,
    Head,
    Network,
    TaskVectors,
    resolve_device,
    to_cpu,
)
from splice.merge.learned.adamerging import entropy_objective, learn_coefficients

__all__ = ["Params", "concrete", "concrete_mask", "rescale"]


class Params(HyperParams):
    inner: Literal["ta", "adamerging"] = Field("ta", description="host merge of the mask")
    mode: Literal["layer", "task"] = Field("layer", description="AdaMerging coefficients")
    temperature: float = Field(0.5, gt=0, description="Concrete temperature τ")
    init_logit: float = Field(0.0, description="initial mask logit (0: keep-probability 0.5)")
    scale: float = Field(0.3, description="TA coefficient / AdaMerging initial coefficient")
    mask_lr: float = Field(1e-3, description="Adam lr of the mask logits")
    inner_lr: float = Field(1.0, description="Adam lr of the inner coefficient step")
    steps: int = Field(2000, ge=0, description="mask (meta) steps")
    adamerging_steps: int = Field(1000, ge=0, description="final AdaMerging steps")
    adamerging_lr: float = Field(1e-3, description="final AdaMerging Adam lr")
    batch_size: int = Field(16, ge=1, description="examples per task per step")
    clamp: bool = Field(True, description="clamp AdaMerging coefficients to [0, 1]")
    discrete: bool = Field(False, description="final mask: Bernoulli draw, not relaxed")


def concrete_mask(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """A relaxed Bernoulli sample ``σ((ℓ + log u − log(1−u))/τ)``, differentiable in ℓ."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + u.log() - (-u).log1p()) / temperature)


def rescale(mask: Tensor) -> Tensor:
    """``m / mean(m)`` over the tensor (an all-zero mask stays zero)."""
    return mask / mask.mean().clamp_min(1e-12)


def _sample(
    logits: Mapping[str, Tensor], temperature: float, g: torch.Generator, discrete: bool = False
) -> dict[str, Tensor]:
    if discrete:
        return {
            n: rescale(torch.bernoulli(torch.sigmoid(x), generator=g)) for n, x in logits.items()
        }
    return {n: rescale(concrete_mask(x, temperature, g)) for n, x in logits.items()}


def concrete(
    module: nn.Module,
    deltas: Mapping[str, Mapping[str, Any]],
    data: Mapping[str, Any],
    *,
    heads: Mapping[str, Head] | None = None,
    forward: Forward | None = None,
    inner: Literal["ta", "adamerging"] = "ta",
    mode: Literal["layer", "task"] = "layer",
    temperature: float = 0.5,
    init_logit: float = 0.0,
    scale: float = 0.3,
    mask_lr: float = 1e-3,
    inner_lr: float = 1.0,
    steps: int = 2000,
    adamerging_steps: int = 1000,
    adamerging_lr: float = 1e-3,
    batch_size: int = 16,
    clamp: bool = True,
    discrete: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress = False,
) -> LearnedMerge:
    """Learn a shared Concrete mask on unlabeled ``data`` ({task: inputs}); merge with it.

    Returns the merged tensors and the coefficients (``(T,)`` of ``scale`` for TA; the learned
    AdaMerging ones otherwise); ``info["mask_keep"]`` is the mean keep-probability σ(ℓ).
    """
    start = time.perf_counter()
    dev = resolve_device(module, device)
    tv = TaskVectors.build(module, deltas, dev)
    net = Network(module, forward, heads, tv.tasks)
    feeds = streams(data, tv.tasks, batch_size, seed)
    dtype = tv.coef_dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    logits = {
        n: torch.full(tv.base[n].shape, init_logit, device=dev, dtype=dtype, requires_grad=True)
        for n in tv.names
    }
    mask_opt = torch.optim.Adam(list(logits.values()), lr=mask_lr)
    coef_shape = (
        (tv.num_blocks, tv.num_tasks)
        if inner == "adamerging" and mode == "layer"
        else (tv.num_tasks,)
    )
    coef = torch.full(coef_shape, scale, device=dev, dtype=dtype, requires_grad=inner != "ta")
    coef_opt = torch.optim.Adam([coef], lr=inner_lr) if inner != "ta" else None

    def effective() -> Tensor:
        return coef.clamp(0, 1) if clamp and inner != "ta" else coef

    history: list[float] = []
    with net.frozen(), progress_bar(f"Concrete mask ({inner})", steps, progress) as update:
        for step in range(steps):
            masks = _sample(logits, temperature, g)
            if coef_opt is not None:  # inner: one step on the coefficients, mask held fixed
                with torch.no_grad():
                    coef.fill_(scale)
                coef_opt.zero_grad(set_to_none=True)
                fixed = {n: m.detach() for n, m in masks.items()}
                entropy_objective(tv.merge(effective(), fixed), net, feeds, 1, dev)
                coef_opt.step()
            mask_opt.zero_grad(set_to_none=True)
            weights = tv.merge(effective().detach(), masks)
            history.append(entropy_objective(weights, net, feeds, 1, dev))
            mask_opt.step()
            update(step + 1, history[-1])
    with torch.no_grad():
        final_masks = _sample(logits, temperature, g, discrete)
        keep = float(
            sum(torch.sigmoid(x).sum() for x in logits.values())
            / sum(x.numel() for x in logits.values())
        )
    if inner == "adamerging":
        final, more = learn_coefficients(
            tv,
            net,
            feeds,
            mode,
            scale,
            adamerging_lr,
            adamerging_steps,
            clamp,
            1,
            dev,
            progress,
            masks=final_masks,
        )
        history += more
    else:
        final = coef.detach()
    with torch.no_grad():
        weights = to_cpu(tv.merge(final, final_masks), tv.base)
    info = {
        "inner": inner,
        "tasks": list(tv.tasks),
        "names": list(tv.names),
        "mask_steps": steps,
        "mask_keep": keep,
        "num_mask_logits": sum(x.numel() for x in logits.values()),
        "num_coefficients": final.numel() if inner == "adamerging" else 0,
        "seconds": time.perf_counter() - start,
    }
    return LearnedMerge(weights, final.cpu(), history, info)


learned.register("concrete")(
    LearnedMethod(
        name="concrete",
        pretty_name="Concrete subspace",
        reference="https://arxiv.org/abs/2312.06173 (merging.md §11)",
        fn=concrete,
        Params=Params,
        data="unlabeled",
        short={"steps": 100, "mask_lr": 2e-2, "adamerging_steps": 100, "adamerging_lr": 1e-2},
    )
)
