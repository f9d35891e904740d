"""Relaxed Recursive Transformers: convert an N-layer Llama into K shared layers looped
B = N/K times, relaxed by per-loop LoRA from the SVD of the tying residuals (spec peft.md §8).

CYCLE tying: depth ``ℓ`` runs shared layer ``ℓ mod K``. The shared block is initialised by
``stepwise`` (``Φ'_j = Φ_{j·B}``, 0-based; the spec marks the index formula [recon]),
``average`` (``Φ'_j = mean_b Φ_{j+bK}``) or ``lower`` (``Φ'_j = Φ_j``). Each depth's linear
``W_ℓ`` gets ``B_ℓ A_ℓ`` with ``R_ℓ = W_ℓ − W'_{ℓ mod K} = UΣVᵀ``, ``B_ℓ = U_r Σ_r``,
``A_ℓ = V_rᵀ``; at full rank the converted model equals the original (norms stay private per
depth by default, so nothing else is tied). Which architectures convert is decided from the
tensor names (as the merge engine does): any causal LM whose layers carry exactly the Llama
linears without biases (Llama, Mistral-style and SmolLM2 checkpoints).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.convert.modeling_recursive import (
    ATTENTION,
    MLP,
    RecursiveLlamaConfig,
    RecursiveLlamaForCausalLM,
)
from splice.errors import SpliceError

__all__ = [
    "INITS",
    "check_config",
    "check_rank",
    "convert_recursive",
    "cycle_map",
    "init_shared",
    "save_recursive",
    "svd_relax",
]

Init = Literal["stepwise", "average", "lower"]
INITS: tuple[str, ...] = ("stepwise", "average", "lower")
LINEARS = tuple(f"self_attn.{n}" for n in ATTENTION) + tuple(f"mlp.{n}" for n in MLP)
NORMS = ("input_layernorm", "post_attention_layernorm")


def cycle_map(n_layers: int, k: int) -> list[int]:
    """The shared layer each of the ``n_layers`` depths runs: ``ℓ mod k`` (CYCLE)."""
    _check_k(n_layers, k)
    return [depth % k for depth in range(n_layers)]


def _check_k(n_layers: int, k: int) -> None:
    if k < 1 or n_layers % k:
        divisors = [d for d in range(1, n_layers + 1) if n_layers % d == 0]
        raise SpliceError(
            f"K={k} shared layers do not divide the model's {n_layers} layers",
            fix=f"choose K in {divisors}",
        )


def init_shared(layers: list[Tensor], k: int, init: str) -> list[Tensor]:
    """The K shared values of one weight, given its per-depth values ``layers`` (N of them)."""
    n = len(layers)
    _check_k(n, k)
    loops = n // k
    if init == "stepwise":
        return [layers[j * loops].clone() for j in range(k)]
    if init == "average":
        return [torch.stack(layers[j::k]).mean(0) for j in range(k)]
    if init == "lower":
        return [layers[j].clone() for j in range(k)]
    raise SpliceError(f"unknown init {init!r}", fix=f"choose one of {', '.join(INITS)}")


def svd_relax(residual: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``B @ A`` the best rank-``rank`` approximation of ``residual``
    (``B = U_r Σ_r``, ``A = V_rᵀ``); ``rank`` ≤ ``min(d_out, d_in)``.

    Computed in float64 from the eigendecomposition of the smaller Gram matrix (about twice
    as fast as a full SVD on CPU): for a tall ``R``, ``RᵀR = VΣ²Vᵀ`` and ``U_rΣ_r = R V_r``;
    for a wide one, ``RRᵀ = UΣ²Uᵀ`` and ``V_rᵀ = Σ_r⁻¹ U_rᵀ R`` (directions with σ ≈ 0 are
    dropped: they carry nothing).
    """
    r = residual.double()
    tall = r.shape[0] >= r.shape[1]
    gram = r.T @ r if tall else r @ r.T
    eigvals, vecs = torch.linalg.eigh(gram)  # ascending
    order = torch.arange(len(eigvals) - 1, len(eigvals) - 1 - rank, -1)
    top = vecs[:, order]
    if tall:
        a, b = top.T, r @ top
    else:
        sigma = eigvals[order].clamp_min(0).sqrt()
        keep = sigma > eigvals.abs().max().sqrt() * 1e-12
        inv = torch.where(keep, 1 / sigma.clamp_min(1e-300), 0)
        a, b = (top.T @ r) * inv[:, None], top * sigma
    return a.to(residual.dtype), b.to(residual.dtype)


def _layer_tensors(state: dict[str, Tensor], n: int) -> dict[str, list[Tensor]]:
    """Per-suffix lists of the N layers' tensors; raises if the layers are not Llama-shaped."""
    prefix = "model.layers."
    found: dict[str, dict[int, Tensor]] = {}
    for name, t in state.items():
        if name.startswith(prefix):
            idx, suffix = name[len(prefix) :].split(".", 1)
            found.setdefault(suffix, {})[int(idx)] = t
    wanted = {f"{s}.weight" for s in LINEARS + NORMS}
    extra = sorted(set(found) - wanted)
    missing = sorted(wanted - set(found))
    if extra or missing:
        raise SpliceError(
            f"layers are not Llama-shaped (unexpected {extra[:3]}, missing {missing[:3]})",
            fix="convert a Llama-family causal LM (q/k/v/o, gate/up/down, two RMSNorms, no biases)",
        )
    return {s: [found[s][i] for i in range(n)] for s in wanted}


def convert_recursive(
    model: nn.Module,
    k: int,
    init: str = "average",
    rank: int | Literal["full"] = 0,
    *,
    private_norms: bool = True,
    exit_loss_weight: float = 0.0,
) -> RecursiveLlamaForCausalLM:
    """Convert a Llama-family causal LM into a recursive one with ``k`` shared layers.

    Args:
        model: the N-layer causal LM (its state dict is read; it is not modified).
        k: shared layers; must divide N.
        init: ``stepwise``, ``average`` or ``lower``.
        rank: per-loop LoRA rank (0: none; ``"full"``: ``min(d_in, d_out)`` per linear, which
            reproduces ``model`` exactly); at most the smallest ``min(d_in, d_out)``.
        private_norms: keep each depth's RMSNorm weights (else they are tied and initialised
            like the linears).
        exit_loss_weight: weight of the intermediate-loop losses when the result is trained.

    Raises:
        SpliceError: not a causal LM, layers not Llama-shaped, K not dividing N, rank too large,
            a negative exit loss weight.
    """
    cfg = model.config
    archs = list(getattr(cfg, "architectures", None) or [type(model).__name__])
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise SpliceError(
            f"not a causal LM (architectures {archs})", fix="convert a *ForCausalLM model"
        )
    if init not in INITS:
        raise SpliceError(f"unknown init {init!r}", fix=f"choose one of {', '.join(INITS)}")
    if exit_loss_weight < 0:
        raise SpliceError(f"exit loss weight {exit_loss_weight} is negative", fix="pass w >= 0")
    n = cfg.num_hidden_layers
    _check_k(n, k)
    state = model.state_dict()
    layers = _layer_tensors(state, n)
    check_rank(rank, min(min(layers[f"{s}.weight"][0].shape) for s in LINEARS))
    new_cfg = RecursiveLlamaConfig(
        **_llama_fields(cfg),
        num_shared_layers=k,
        lora_rank=-1 if rank == "full" else int(rank),
        private_norms=private_norms,
        exit_loss_weight=exit_loss_weight,
    )
    new_cfg.architectures = ["RecursiveLlamaForCausalLM"]
    with torch.device("meta"):
        out = RecursiveLlamaForCausalLM(new_cfg)
    out.to_empty(device="cpu")
    _fill(out, state, layers, k, init)
    return out.eval()


def check_rank(rank: int | str, smallest: int) -> None:
    """Raise unless ``rank`` is ``"full"`` or in ``0..smallest`` (the least min(d_in, d_out))."""
    if rank != "full" and not 0 <= int(rank) <= smallest:
        raise SpliceError(
            f"rank {rank} is above min(d_in, d_out) = {smallest} of the smallest linear",
            fix=f"choose a rank in 0..{smallest}, or 'full'",
        )


def check_config(config: dict[str, Any], k: int, rank: int | str) -> None:
    """Validate ``k`` and ``rank`` against a Llama ``config.json`` before loading weights."""
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    kv = config.get("num_key_value_heads") or heads
    _check_k(config["num_hidden_layers"], k)
    check_rank(rank, min(d, head_dim * kv, head_dim * heads, config["intermediate_size"]))


def _llama_fields(cfg: Any) -> dict[str, Any]:
    keep = set(RecursiveLlamaConfig.__dataclass_fields__) - {
        "num_shared_layers",
        "lora_rank",
        "private_norms",
        "exit_loss_weight",
    }
    src = cfg.to_dict()
    return {k: v for k, v in src.items() if k in keep and k not in ("architectures", "model_type")}


@torch.no_grad()
def _fill(
    out: RecursiveLlamaForCausalLM,
    state: dict[str, Tensor],
    layers: dict[str, list[Tensor]],
    k: int,
    init: str,
) -> None:
    m = out.model
    m.embed_tokens.weight.copy_(state["model.embed_tokens.weight"])
    m.norm.copy_(state["model.norm.weight"])
    head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
    if out.config.tie_word_embeddings:
        out.lm_head.weight = m.embed_tokens.weight
    else:
        out.lm_head.weight.copy_(head)
    for target, norms in zip(NORMS, (m.input_norms, m.post_norms), strict=True):
        per_depth = layers[f"{target}.weight"]
        values = per_depth if out.config.private_norms else init_shared(per_depth, k, init)
        norms.copy_(torch.stack(values))
    m.rotary_emb.inv_freq.copy_(type(m.rotary_emb)(out.config).inv_freq)
    for suffix in LINEARS:
        per_depth = layers[f"{suffix}.weight"]
        shared = init_shared(per_depth, k, init)
        group, name = suffix.split(".")
        for j, layer in enumerate(m.layers):
            lin = getattr(layer, group)[name]
            lin.weight.copy_(shared[j])
            if not lin.rank:
                continue
            for loop in range(out.config.num_loops):
                a, b = svd_relax(per_depth[loop * k + j] - shared[j], lin.rank)
                lin.lora_A[loop].copy_(a)
                lin.lora_B[loop].copy_(b)


def save_recursive(model: RecursiveLlamaForCausalLM, out: Path, tokenizer: Any = None) -> Path:
    """Write an HF directory: safetensors, config (with ``auto_map``), the modeling file, and
    the tokenizer if given. Loads with ``AutoModelForCausalLM`` (``trust_remote_code=True``
    outside splice)."""
    from splice.io.atomic import atomic_dir

    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        modeling = Path(__file__).with_name("modeling_recursive.py")
        if not (Path(tmp) / modeling.name).is_file():
            shutil.copy(modeling, Path(tmp) / modeling.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
