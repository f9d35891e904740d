"""Writing the MoE checkpoint: transformers' fused expert layout, streamed layer by layer.

Mixtral (from Llama/Mistral bases) and Qwen2-MoE (from Qwen2 bases, optionally with one
shared expert and its sigmoid gate) store, per layer, ``mlp.gate.weight`` (the router,
``experts × hidden``), ``mlp.experts.gate_up_proj`` (``experts × 2·inter × hidden``: each
expert's ``gate_proj`` then ``up_proj``) and ``mlp.experts.down_proj``
(``experts × hidden × inter``). Everything outside the MLPs is the base's. The output is
written atomically with the base's tokenizer files and a ``config.json`` for the MoE class.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from splice.errors import SpliceError
from splice.io import CheckpointWriter, open_checkpoint
from splice.merge.moe.config import Expert, load_moe_recipe
from splice.merge.moe.router import gate_vectors
from splice.merge.recipe.settings import parse_dtype

__all__ = ["build_moe"]

_ARCH = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("qwen2",)}
_SAME = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")


def _open(ref: str, where: str) -> Any:
    if not Path(ref).is_dir():
        raise SpliceError("model dir does not exist", where=f"{where}: {ref}")
    return open_checkpoint(ref)


def _check_expert(base_cfg: dict, ckpt: Any, ref: str, where: str) -> None:
    cfg = ckpt.config or {}
    for key in _SAME:
        if key in base_cfg and cfg.get(key) != base_cfg[key]:
            raise SpliceError(
                f"expert {ref} has {key} {cfg.get(key)!r}, the base {base_cfg[key]!r}",
                where=where,
                fix="experts must be fine-tunes of the base's architecture and size",
            )


def _expert_mlp(ckpt: Any, layer: int, e: Expert, seed: int) -> tuple[torch.Tensor, ...]:
    p = f"model.layers.{layer}.mlp."
    gate, up, down = (
        ckpt[p + n + ".weight"].float() for n in ("gate_proj", "up_proj", "down_proj")
    )
    if e.noise_scale:
        g = torch.Generator().manual_seed(seed)
        gate, up, down = (
            t + e.noise_scale * torch.randn(t.shape, generator=g) for t in (gate, up, down)
        )
    if e.residual_scale is not None:
        down = down * e.residual_scale
    return gate, up, down


def _config(base_cfg: dict, arch: str, r: Any, shared_inter: int | None) -> dict:
    cfg = {k: v for k, v in base_cfg.items() if k not in ("architectures", "model_type")}
    n = len(r.experts)
    if arch == "mixtral":
        cfg.update(
            model_type="mixtral",
            architectures=["MixtralForCausalLM"],
            num_local_experts=n,
            num_experts_per_tok=r.experts_per_token,
            sliding_window=None,
        )
    else:
        cfg.update(
            model_type="qwen2_moe",
            architectures=["Qwen2MoeForCausalLM"],
            num_experts=n,
            num_experts_per_tok=r.experts_per_token,
            moe_intermediate_size=base_cfg["intermediate_size"],
            shared_expert_intermediate_size=shared_inter or 0,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    if r.dtype:
        cfg["torch_dtype"] = parse_dtype(r.dtype)
    return cfg


def build_moe(
    recipe: str | Path, out: str | Path, *, allow_random: bool = False, force: bool = False
) -> dict[str, Any]:
    """Assemble the MoE described by ``recipe`` (see :mod:`.config`) into ``out``.

    Raises:
        SpliceError: a bad recipe, an expert of another architecture or size, a base the
            chosen output class cannot hold, ``gate_mode: random`` without ``allow_random``.
    """
    start = time.perf_counter()
    r, where = load_moe_recipe(recipe)
    if r.gate_mode == "random" and not allow_random:
        raise SpliceError(
            "gate_mode: random gives a router that routes arbitrarily until trained",
            where=where("gate_mode"),
            fix="pass --i-understand-this-is-not-useful-without-training, or use hidden / "
            "cheap_embed with prompts",
        )
    base = _open(r.base_model, where("base_model"))
    base_cfg = base.config or {}
    arch = r.architecture or ("qwen2_moe" if r.shared_experts else "mixtral")
    if base_cfg.get("model_type") not in _ARCH[arch]:
        raise SpliceError(
            f"a {arch} MoE needs a {' or '.join(_ARCH[arch])} base, not "
            f"{base_cfg.get('model_type')!r}",
            where=where("base_model"),
        )
    experts = []
    for i, e in enumerate(r.experts):
        ck = _open(e.source_model, where("experts", i))
        _check_expert(base_cfg, ck, e.source_model, where("experts", i, "source_model"))
        experts.append(ck)
    shared = None
    if r.shared_experts:
        shared = _open(r.shared_experts[0].source_model, where("shared_experts", 0))
        cfg = shared.config or {}
        if cfg.get("hidden_size") != base_cfg.get("hidden_size"):
            raise SpliceError(
                "the shared expert's hidden_size differs from the base's",
                where=where("shared_experts", 0, "source_model"),
            )
    layers, hidden = base_cfg["num_hidden_layers"], base_cfg["hidden_size"]
    embed = base["model.embed_tokens.weight"] if r.gate_mode == "cheap_embed" else None
    gates = gate_vectors(r.gate_mode, r.base_model, r.experts, layers, hidden, embed)
    shared_gates = None
    if r.shared_experts and r.gate_mode != "random":
        shared_gates = gate_vectors(
            r.gate_mode, r.base_model, r.shared_experts, layers, hidden, embed
        )
    del embed
    dtype = getattr(torch, parse_dtype(r.dtype) or "float32") if r.dtype else None
    shared_inter = (shared.config or {}).get("intermediate_size") if shared else None
    config = _config(base_cfg, arch, r, shared_inter)
    with CheckpointWriter(
        out, force=force, copy_files_from=r.base_model, protect=[r.base_model]
    ) as w:
        for name in base:
            if ".mlp." not in name:
                t = base[name]
                w.write(name, t.to(dtype) if dtype and t.is_floating_point() else t)
        for layer in range(layers):
            p = f"model.layers.{layer}.mlp."
            mlps = [
                _expert_mlp(ck, layer, e, i)
                for i, (ck, e) in enumerate(zip(experts, r.experts, strict=True))
            ]
            dt = dtype or base[p + "gate_proj.weight"].dtype
            w.write(p + "gate.weight", gates[layer].to(dt).contiguous())
            w.write(
                p + "experts.gate_up_proj",
                torch.stack([torch.cat([g, u]) for g, u, _ in mlps]).to(dt),
            )
            w.write(p + "experts.down_proj", torch.stack([d for _, _, d in mlps]).to(dt))
            del mlps
            if shared is not None:
                e = r.shared_experts[0]  # type: ignore[index]
                g, u, d = _expert_mlp(shared, layer, e, len(experts))
                for n, t in (("gate_proj", g), ("up_proj", u), ("down_proj", d)):
                    w.write(f"{p}shared_expert.{n}.weight", t.to(dt))
                sg = shared_gates[layer] if shared_gates is not None else torch.zeros(1, hidden)
                w.write(p + "shared_expert_gate.weight", sg.reshape(1, hidden).to(dt).contiguous())
        w.add_file("config.json", json.dumps(config, indent=2) + "\n")
    return {
        "out": str(out),
        "architecture": config["architectures"][0],
        "experts": len(experts),
        "shared_experts": int(shared is not None),
        "gate_mode": r.gate_mode,
        "seconds": round(time.perf_counter() - start, 3),
    }
