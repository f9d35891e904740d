"""WEMoE: weight-ensembling mixture of experts (Tang et al., ICML 2024; FusionBench
``WeightEnsemblingMoEAlgorithm``) and E-WEMoE's sparse task vectors.

:func:`upcycle` turns a base model and per-task deltas into one model where

- every tensor outside the MLP blocks is merged by task arithmetic, ``θ₀ + λ·Σ_t τ_t``
  (``init_lambda``, 0.3 by default, as the paper);
- every MLP block becomes a :class:`WEMoEMLP`: a router (``Linear → ReLU → Linear``, last layer
  zero with bias ``init_lambda``, so routing starts as task arithmetic) maps the block's input
  to one weight per task, averaged over the tokens of each sample; the block then runs with
  ``θ₀ + Σ_t r_t(x)·τ_t`` for that sample (the paper's input-dependent merge). With
  ``density < 1`` each MLP task vector keeps only its largest-magnitude entries per tensor
  (E-WEMoE's sparsity; its router sharing across layers is not implemented).

MLP blocks are the submodules whose name matches ``pattern`` (``mlp``, ``ffn``,
``feed_forward``, ``intermediate`` by default); a model with none is refused in one line. The
routers are the only trainable parameters (:func:`routers`); ``splice.train.wemoe`` trains
them through the one training loop by test-time entropy (the paper) or cross-entropy on
labeled validation data. :func:`save_wemoe` writes a normal directory (``wemoe.safetensors``:
the upcycled model's state dict; ``wemoe.json``: tasks, blocks and settings) and
:func:`load_wemoe` rebuilds it on the same base architecture. :func:`cost` counts the extra
parameters against the dense base (a WEMoE model is not one dense model).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from splice.errors import SpliceError

__all__ = ["WEMoEMLP", "cost", "load_wemoe", "routers", "save_wemoe", "upcycle"]

MLP_PATTERN = r"(^|\.)(mlp|ffn|feed_forward|intermediate)$"
_FORMAT = "splice-wemoe/1"


class WEMoEMLP(nn.Module):
    """An MLP block run with per-sample weights ``θ₀ + Σ_t r_t(x)·τ_t``."""

    def __init__(
        self, base: nn.Module, vectors: Mapping[str, Tensor], hidden: int, init_lambda: float
    ) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.names = list(vectors)
        num_tasks = next(iter(vectors.values())).shape[0]
        for i, n in enumerate(self.names):
            self.register_buffer(f"tv{i}", vectors[n].clone())
        width = _input_width(base)
        self.router = nn.Sequential(
            nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_tasks)
        )
        nn.init.normal_(self.router[0].weight, std=0.01)
        nn.init.zeros_(self.router[0].bias)
        nn.init.zeros_(self.router[2].weight)
        nn.init.constant_(self.router[2].bias, init_lambda)
        like = next(iter(vectors.values()))
        self.router.to(device=like.device, dtype=like.dtype)

    def routing(self, x: Tensor) -> Tensor:
        """Per-sample task weights ``(B, T)``: the router's output averaged over tokens."""
        r = self.router(x)
        return r.reshape(r.shape[0], -1, r.shape[-1]).mean(1)

    def forward(self, x: Tensor, *rest: Any) -> Tensor:
        """Route on ``x``; further arguments (e.g. the residual input of a BERT output
        block) are sliced per sample when they share ``x``'s batch size."""
        r = self.routing(x)
        own = dict(self.base.named_parameters())
        outs = []
        for b in range(x.shape[0]):
            weights = {
                n: own[n] + torch.tensordot(r[b].to(own[n].dtype), getattr(self, f"tv{i}"), 1)
                for i, n in enumerate(self.names)
            }
            args = [x[b : b + 1], *(_row(a, b, x.shape[0]) for a in rest)]
            outs.append(functional_call(self.base, weights, tuple(args)))
        return torch.cat(outs)


def _row(a: Any, b: int, batch: int) -> Any:
    return a[b : b + 1] if isinstance(a, Tensor) and a.dim() and a.shape[0] == batch else a


def _input_width(mod: nn.Module) -> int:
    first = next((m for m in mod.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise SpliceError("WEMoE: an MLP block without a Linear layer", where=type(mod).__name__)
    return first.in_features


def _sparsify(t: Tensor, density: float) -> Tensor:
    if density >= 1:
        return t
    k = max(1, round(density * t[0].numel()))
    flat = t.reshape(t.shape[0], -1)
    cut = flat.abs().topk(k, dim=1).values[:, -1:]
    return (flat * (flat.abs() >= cut)).reshape(t.shape)


def upcycle(
    module: nn.Module,
    deltas: Mapping[str, Mapping[str, Tensor]],
    *,
    init_lambda: float = 0.3,
    router_hidden: int | None = None,
    density: float = 1.0,
    pattern: str = MLP_PATTERN,
) -> nn.Module:
    """A WEMoE copy of ``module`` (which is not modified); see the module docstring.

    Raises:
        SpliceError: no tasks, no MLP block, a delta for a tensor the model lacks, or a
            density outside (0, 1].
    """
    if not deltas:
        raise SpliceError("WEMoE: no task deltas given")
    if not 0 < density <= 1:
        raise SpliceError(f"WEMoE density {density}: use a value in (0, 1]")
    blocks = [n for n, _ in module.named_modules() if n and re.search(pattern, n)]
    blocks = [b for b in blocks if not any(b.startswith(f"{o}.") for o in blocks if o != b)]
    if not blocks:
        raise SpliceError(
            f"WEMoE: the model has no MLP blocks (no submodule name matches {pattern!r})",
            fix="pass pattern= naming its feed-forward blocks",
        )
    model = copy.deepcopy(module)
    own = dict(model.named_parameters())
    tasks = list(deltas)
    unknown = sorted({n for d in deltas.values() for n in d} - set(own))
    if unknown:
        raise SpliceError(f"WEMoE: deltas for tensors the model lacks: {unknown[:3]}")

    def stacked(n: str) -> Tensor:
        zero = torch.zeros_like(own[n])
        return torch.stack([deltas[t].get(n, zero).to(own[n]) for t in tasks]).detach()

    inside = {n for n in own if any(n.startswith(f"{b}.") for b in blocks)}
    with torch.no_grad():
        for n in own:
            if n not in inside and any(n in d for d in deltas.values()):
                own[n].add_(init_lambda * stacked(n).sum(0))
    routed: dict[str, list[str]] = {}
    for b in blocks:
        mlp = model.get_submodule(b)
        vectors = {
            n: _sparsify(stacked(f"{b}.{n}"), density)
            for n, _ in mlp.named_parameters()
            if any(f"{b}.{n}" in d for d in deltas.values())
        }
        if not vectors:
            continue
        hidden = router_hidden or _input_width(mlp)
        parent, _, leaf = b.rpartition(".")
        moe = WEMoEMLP(mlp, vectors, hidden, init_lambda)
        routed[b] = list(vectors)
        setattr(model.get_submodule(parent) if parent else model, leaf, moe)
    model.wemoe_config = {  # type: ignore[assignment]
        "format": _FORMAT,
        "tasks": tasks,
        "blocks": blocks,
        "routed": routed,
        "init_lambda": init_lambda,
        "router_hidden": router_hidden,
        "density": density,
        "pattern": pattern,
    }
    return model


def routers(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of a WEMoE model: its routers'."""
    return [p for m in model.modules() if isinstance(m, WEMoEMLP) for p in m.router.parameters()]


def cost(model: nn.Module) -> dict[str, int]:
    """Parameters of the dense part, of the routers, and nonzero task-vector entries kept."""
    moes = [m for m in model.modules() if isinstance(m, WEMoEMLP)]
    router = sum(p.numel() for m in moes for p in m.router.parameters())
    vectors = sum(int((b != 0).sum()) for m in moes for b in m.buffers())
    dense = sum(p.numel() for p in model.parameters()) - router
    return {"dense": dense, "router": router, "task_vectors": vectors, "extra": router + vectors}


def save_wemoe(model: nn.Module, directory: str | Path) -> Path:
    """Write ``wemoe.safetensors`` and ``wemoe.json`` to ``directory``."""
    from safetensors.torch import save_file

    config = getattr(model, "wemoe_config", None)
    if config is None:
        raise SpliceError("not a WEMoE model (build it with splice.merge.fusion.wemoe.upcycle)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "wemoe.safetensors"))
    (out / "wemoe.json").write_text(json.dumps(config, indent=1))
    return out


def load_wemoe(module: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild a saved WEMoE model on ``module`` (the base architecture; its weights are
    replaced by the saved ones).

    Raises:
        SpliceError: not a WEMoE directory, or saved tensors that do not fit ``module``.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "wemoe.json").is_file():
        raise SpliceError("not a WEMoE directory (no wemoe.json)", where=str(d))
    cfg: dict[str, Any] = json.loads((d / "wemoe.json").read_text())
    if cfg.get("format") != _FORMAT:
        raise SpliceError(f"WEMoE format {cfg.get('format')!r}, not {_FORMAT}", where=str(d))
    state = load_file(str(d / "wemoe.safetensors"))
    own = dict(module.named_parameters())
    try:
        zero = {
            f"{b}.{n}": torch.zeros_like(own[f"{b}.{n}"])
            for b, names in cfg["routed"].items()
            for n in names
        }
    except KeyError as e:
        raise SpliceError(f"WEMoE: the base model lacks {e.args[0]}", where=str(d)) from None
    placeholder = {t: dict(zero) for t in cfg["tasks"]}
    model = upcycle(
        module,
        placeholder,
        init_lambda=cfg["init_lambda"],
        router_hidden=cfg["router_hidden"],
        density=cfg["density"],
        pattern=cfg["pattern"],
    )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        msg = f"WEMoE tensors do not fit this base model: {first}"
        raise SpliceError(msg, where=str(d)) from None
    model.wemoe_config = cfg  # type: ignore[assignment]
    return model
