"""``splice quantize``'s driver: load a model and calibration data, run a
:mod:`splice.compress` pipeline through the training loop, write and reload the result.

Models: ``efficientnet-lite0`` (the packaged ImageNet classifier), ``minilm`` (the packaged
sentence encoder) or a local Hugging Face model dir. The calibration loss compares the
quantized model's output with the float model's: KL of the logits where the model has a
classifier, mean squared error of the last hidden state otherwise (an encoder; a causal LM,
whose 49k-way logits for every token of every calibration batch would not fit in memory).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from splice.compress import QuantizeConfig, QuantizeReport, kl_to_target, quantize
from splice.compress.files import apply_quantized, save_quantized
from splice.errors import SpliceError
from splice.train.loop import minimise

__all__ = ["Calibration", "load_model", "load_quantized_model", "quantize_model", "text_batches"]

MODEL_FILE = "quantize.json"
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "vocab.txt")  # fmt: skip


def _mse(out: Tensor, target: Tensor) -> Tensor:
    return nn.functional.mse_loss(out.float(), target.float())


@dataclass
class Calibration:
    """A model ready to quantize: its float module, how to run it and compare outputs."""

    model: nn.Module
    modality: str  # "image" or "text"
    spec: dict[str, Any]  # how to rebuild the float architecture (written to quantize.json)
    forward: Callable[[nn.Module, Any], Tensor]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    tokenizer: Any = None
    image_size: int = 32
    source_dir: Path | None = None
    batches: list[Any] = field(default_factory=list)


def _image_forward(model: nn.Module, batch: Tensor) -> Tensor:
    return model(batch)


def _hf_forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    out = model(**batch)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _build(spec: dict[str, Any], config_dir: Path | None = None) -> nn.Module:
    """The float model of ``spec``; from ``config_dir``, the architecture alone (its weights
    are about to be replaced by :func:`apply_quantized`)."""
    if spec["kind"] == "efficientnet-lite0":
        from efficientnet_lite_pytorch import EfficientNet

        from splice.data.encoders import EFFNET_LITE0

        net = EfficientNet.from_name("efficientnet-lite0", image_size=spec["image_size"])
        state = torch.load(EFFNET_LITE0.locate(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        return net.eval()
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cls = getattr(transformers, spec["auto"])
    if config_dir is not None:
        return cls.from_config(transformers.AutoConfig.from_pretrained(str(config_dir))).eval()
    return cls.from_pretrained(spec["dir"], dtype=torch.float32).eval()


def _hf_spec(model_dir: Path) -> tuple[dict[str, Any], Callable]:
    """A classifier is compared by its logits; anything else (an encoder, a causal LM whose
    logits for every token would not fit) by its last hidden state."""
    config = json.loads((model_dir / "config.json").read_text())
    if "ForSequenceClassification" in " ".join(config.get("architectures") or []):
        return {"kind": "hf", "auto": "AutoModelForSequenceClassification"}, kl_to_target
    return {"kind": "hf", "auto": "AutoModel"}, _mse


def load_model(name: str, image_size: int = 32) -> Calibration:
    """``efficientnet-lite0``, ``minilm`` or a local Hugging Face model dir."""
    if name == "efficientnet-lite0":
        spec = {"kind": name, "image_size": image_size}
        return Calibration(_build(spec), "image", spec, _image_forward, kl_to_target,
                           image_size=image_size)  # fmt: skip
    if name == "minilm":
        from splice.data.encoders import MINILM

        model_dir = MINILM["config.json"].locate().parent
    else:
        model_dir = Path(name)
        if not (model_dir / "config.json").is_file():
            raise SpliceError(
                "not a model (no config.json)", where=name,
                fix="pass efficientnet-lite0, minilm or a Hugging Face model dir",
            )  # fmt: skip
    from transformers import AutoTokenizer

    spec, loss_fn = _hf_spec(model_dir)
    spec["dir"] = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return Calibration(_build(spec), "text", spec, _hf_forward, loss_fn, tokenizer,
                       source_dir=model_dir)  # fmt: skip


def text_batches(tokenizer: Any, texts: list[str], batch_size: int, max_len: int) -> list[dict]:
    """Padded ``input_ids``/``attention_mask`` batches of ``texts`` (in order)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], truncation=True, max_length=max_len,
                        padding=True, return_tensors="pt")  # fmt: skip
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def load_calibration(cal: Calibration, data: str, samples: int, batch_size: int,
                     max_len: int = 32, seed: int = 0) -> list[Any]:  # fmt: skip
    """The first ``samples`` training inputs of a bench task, or the texts of a CSV/JSONL
    file, as batches for ``cal``'s model; data of another modality is refused."""
    path = Path(data)
    if path.suffix.lower() in (".csv", ".jsonl", ".json") or path.exists():
        from splice.train.data import read_file

        modality, inputs = "text", read_file(path).texts
    else:
        from splice.data.registry import TASKS, load_task

        task = TASKS.get(data)
        modality = task.modality
        inputs = load_task(task, seed=seed).train.x if modality == cal.modality else []
    if modality != cal.modality:
        raise SpliceError(
            f"calibration data {data!r} is {modality}, but the model takes {cal.modality}",
            fix=f"pass {cal.modality} data (a bench task of that modality"
            + (" or a CSV/JSONL file)" if cal.modality == "text" else ")"),
        )
    inputs = inputs[:samples]
    if modality == "text":
        return text_batches(cal.tokenizer, [str(t) for t in inputs], batch_size, max_len)
    from splice.data.encoders import image_tensor

    images = image_tensor(np.asarray(inputs), cal.image_size)
    return list(images.split(batch_size))


def quantize_model(cal: Calibration, batches: list[Any], cfg: QuantizeConfig, out: Path | None,
                   progress: Callable[[str], None] | None = None,
                   ) -> tuple[nn.Module, QuantizeReport]:  # fmt: skip
    """Quantize ``cal.model`` on ``batches``; with ``out``, write the directory (integer
    weights, ``quantize.json`` with the config, report and architecture, and the model's
    config/tokenizer files) atomically."""
    q, report = quantize(cal.model, batches, cal.forward, minimise, cfg, loss_fn=cal.loss_fn,
                         progress=progress)  # fmt: skip
    if out is not None:
        meta = {
            "model": cal.spec,
            "config": cfg.model_dump(mode="json"),
            "report": report.to_dict(),
        }
        files: dict[str, str | Path] = {MODEL_FILE: json.dumps(meta, indent=2)}
        if cal.source_dir is not None:
            files.update({n: cal.source_dir / n for n in _COPY if (cal.source_dir / n).is_file()})
        save_quantized(q, out, files=files)
    return q, report


def load_quantized_model(path: str | Path) -> nn.Module:
    """A ``splice quantize`` output as a module of frozen quantized layers (outputs equal the
    quantized model's)."""
    meta_file = Path(path) / MODEL_FILE
    if not meta_file.is_file():
        raise SpliceError("not a splice quantize output", where=str(path), fix=f"no {MODEL_FILE}")
    spec = json.loads(meta_file.read_text())["model"]
    return apply_quantized(_build(spec, Path(path)), path).eval()
