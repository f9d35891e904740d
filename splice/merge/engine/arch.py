"""Architecture from tensor names and ``config.json``: no hand-written file per model family.

A transformer's weights sit in one or more *layer stacks*: a container named ``layers``,
``layer``, ``h``, ``block`` or ``blocks`` followed by the block index (``model.layers.3.…``
Llama/Mistral/Qwen2, ``transformer.h.3.…`` GPT-2, ``bert.encoder.layer.3.…`` BERT/ViT,
``encoder.block.3.…`` / ``decoder.block.3.…`` T5). Each stack is counted separately and checked
against the layer counts in ``config.json`` (``num_hidden_layers``, ``n_layer``,
``num_layers``, ``num_decoder_layers``, …, nested ``text_config``/``vision_config`` too).
A tensor's *block type* (embed, attn, mlp, norm, head, other) comes from its name's path
components; tied embeddings come from ``tie_word_embeddings`` (mergekit-notes.md §3 and §5,
pain points 7–9: new families need no JSON, tied heads are not "required but not present").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from splice._names import INDEX
from splice.errors import SpliceError

__all__ = [
    "Architecture",
    "Block",
    "TensorRole",
    "block_of",
    "config_layer_counts",
    "infer_architecture",
    "tie_pairs",
]

Block = Literal["embed", "attn", "mlp", "norm", "head", "other"]
BLOCKS: tuple[Block, ...] = ("embed", "attn", "mlp", "norm", "head", "other")

_CONTAINERS = ("layers", "layer", "h", "block", "blocks")
_STACK = re.compile(r"(?:^|\.)(?:" + "|".join(_CONTAINERS) + r")\.(\d+)(?=\.|$)")
_LAYER_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "encoder_layers",
    "decoder_layers",
)
_HEAD = {"lm_head", "classifier", "score", "cls", "pooler", "qa_outputs", "embed_out", "head"}
_EMBED = {"wte", "wpe", "shared", "cls_token", "mask_token", "embed_in"}
_MLP = {
    "mlp",
    "ffn",
    "feed_forward",
    "intermediate",
    "densereludense",
    "experts",
    "block_sparse_moe",
    "moe",
    "c_fc",
    "fc1",
    "fc2",
    "w1",
    "w2",
    "w3",
    "output",
}
# (head, embedding) names that tie_word_embeddings makes one tensor, by family.
_TIES = (
    ("lm_head.weight", "model.embed_tokens.weight"),  # Llama, Mistral, Qwen2, Gemma
    ("lm_head.weight", "transformer.wte.weight"),  # GPT-2
    ("lm_head.weight", "shared.weight"),  # T5
    ("encoder.embed_tokens.weight", "shared.weight"),  # T5
    ("decoder.embed_tokens.weight", "shared.weight"),  # T5
    ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),  # BERT MLM
    ("embed_out.weight", "gpt_neox.embed_in.weight"),  # GPT-NeoX
    ("lm_head.weight", "model.decoder.embed_tokens.weight"),  # OPT
)


def block_of(name: str) -> Block:
    """Block type from the name's path components (first rule that matches wins).

    norm: a component containing ``norm`` or ``ln_*``; head: ``lm_head``, ``classifier``,
    ``score``, ``cls``, ``pooler``…; embed: a component containing ``embed`` (or ``wte``,
    ``wpe``, ``shared``, ``cls_token``); attn: containing ``attn``/``attention``; mlp:
    ``mlp``, ``intermediate``, ``DenseReluDense``, ``experts``, BERT's in-layer ``output``….
    """
    parts = [p.lower() for p in name.split(".")]
    if any("norm" in p or p == "ln" or p.startswith("ln_") for p in parts):
        return "norm"
    if parts[0] in _HEAD or (len(parts) > 1 and parts[1] in _HEAD and not _STACK.search(name)):
        return "head"
    if any("embed" in p or p in _EMBED for p in parts):
        return "embed"
    if any("attn" in p or "attention" in p for p in parts):
        return "attn"
    if any(p in _MLP or "mlp" in p for p in parts):
        return "mlp"
    return "other"


@dataclass(frozen=True)
class TensorRole:
    """Where one tensor sits: its block type, and its block index in its layer stack."""

    block: Block
    stack: str | None = None
    layer: int | None = None
    num_layers: int | None = None

    @property
    def depth(self) -> float:
        """``layer / (num_layers − 1)``; 0 outside the stack, 1 in a one-block stack."""
        if self.layer is None or self.num_layers is None:
            return 0.0
        return self.layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0


@dataclass
class Architecture:
    """Roles of every tensor, the layer stacks and the tied tensor pairs of one checkpoint."""

    roles: dict[str, TensorRole]
    stacks: dict[str, int]
    model_type: str | None = None
    tied: list[tuple[str, str]] = field(default_factory=list)

    def role(self, name: str) -> TensorRole:
        return self.roles.get(name) or TensorRole(block_of(name))

    def summary(self) -> dict[str, Any]:
        counts = {b: 0 for b in BLOCKS}
        for r in self.roles.values():
            counts[r.block] += 1
        return {
            "model_type": self.model_type,
            "stacks": dict(self.stacks),
            "blocks": {b: n for b, n in counts.items() if n},
            "tied": [list(t) for t in self.tied],
        }


def config_layer_counts(config: Mapping[str, Any] | None) -> dict[str, int]:
    """Layer counts a config declares, ``{"num_hidden_layers": 12, "text_config.n_layer": …}``."""
    out: dict[str, int] = {}

    def walk(cfg: Mapping[str, Any], prefix: str) -> None:
        for key, value in cfg.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            elif key in _LAYER_KEYS and isinstance(value, int) and not isinstance(value, bool):
                out[prefix + key] = value

    if config:
        walk(config, "")
    return out


def _stack_of(name: str, known: bool) -> tuple[str, int] | None:
    m = (_STACK if known else INDEX).search(name)
    if m is None:
        return None
    return name[: m.start(1) - 1], int(m[1])


def infer_architecture(
    names: Iterable[str],
    config: Mapping[str, Any] | None = None,
    *,
    where: str = "model",
    need_layers: bool = False,
) -> Architecture:
    """Roles of ``names`` (block type, stack, layer) checked against ``config``.

    Stacks are found under the known containers; only when none is found does the first
    numeric path component count as a block index (any ``nn.Sequential``-like state dict).

    Raises:
        SpliceError: a stack's block count differs from every layer count in the config, or
            (with ``need_layers``: per-layer parameters, LiNeS) no stack is found or a block
            index is missing.
    """
    names = list(names)
    known = any(_STACK.search(n) for n in names)
    found: dict[str, tuple[str, int]] = {}
    for n in names:
        s = _stack_of(n, known)
        if s is not None:
            found[n] = s
    indices: dict[str, set[int]] = {}
    for prefix, i in found.values():
        indices.setdefault(prefix, set()).add(i)
    counts = config_layer_counts(config)
    stacks = {p: max(ix) + 1 for p, ix in indices.items()}
    if counts:
        allowed = set(counts.values())
        for prefix, n in stacks.items():
            if n not in allowed:
                keys = ", ".join(f"{k}={v}" for k, v in counts.items())
                missing = sorted(set(range(max(allowed))) - indices[prefix])[:3]
                hint = f" (blocks {missing} missing)" if missing else ""
                raise SpliceError(
                    f"config.json says {keys} but the tensor names give {n} blocks in "
                    f"{prefix}.*{hint}",
                    where=where,
                    fix="the checkpoint is incomplete, or its config.json belongs to another model",
                )
    if need_layers:
        if not stacks:
            example = names[0] if names else "(none)"
            raise SpliceError(
                f"no layer stack found in the tensor names (e.g. {example!r}): per-layer "
                "parameters (gradient, LiNeS) need block indices",
                where=where,
                fix="use scalar parameters, or name blocks like '<prefix>.layers.<i>.…'",
            )
        for prefix, ix in indices.items():
            gaps = sorted(set(range(stacks[prefix])) - ix)
            if gaps:
                raise SpliceError(
                    f"block {gaps[0]} of {prefix}.* has no tensors, so depth is ambiguous",
                    where=where,
                    fix="the checkpoint is incomplete; per-layer parameters need every block",
                )
    roles = {}
    for n in names:
        s = found.get(n)
        if s is None:
            roles[n] = TensorRole(block_of(n))
        else:
            roles[n] = TensorRole(block_of(n), s[0], s[1], stacks[s[0]])
    model_type = (config or {}).get("model_type")
    present = set(names)
    tied = [(h, e) for h, e in tie_pairs(config) if e in present]
    return Architecture(roles, stacks, model_type if isinstance(model_type, str) else None, tied)


def tie_pairs(config: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """``(head, embedding)`` name pairs that the config ties into one tensor.

    HF's default for ``tie_word_embeddings`` is True, so a config without the key ties; T5's
    encoder/decoder ``embed_tokens`` always share ``shared.weight``.
    """
    if config is None:
        return []
    tied = config.get("tie_word_embeddings", True)
    return [(h, e) for h, e in _TIES if tied or h.endswith("embed_tokens.weight")]
