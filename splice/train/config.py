"""The settings of ``splice train`` (one frozen schema, unknown keys refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic

from splice._schema import Strict

__all__ = ["DEFAULT_HEAD_LR", "DEFAULT_TARGETS", "WHOLE", "TrainConfig"]

# Attention projections per model family, as peft's defaults (used when --targets is omitted).
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
}


# A new classification head starts random and must learn within the run's steps: at the
# adapter's 5e-4 it barely moves in 200 steps (issue #21). On MiniLM's frozen features the
# 200-step linear probe of three 15-class tasks plateaus from 5e-2 to 2e-1 (docs/adapters.md).
DEFAULT_HEAD_LR = 5e-2

WHOLE = ("full", "head")  # methods without an adapter: every weight trains, or only the new head


class TrainConfig(Strict):
    """Everything one ``splice train`` run depends on; written to ``metrics.json``."""

    model: Path = pydantic.Field(description="local Hugging Face model dir")
    data: str = pydantic.Field(description="CSV/JSONL file (text,label) or bench task name")
    out: Path = pydantic.Field(description="output dir: adapter or model, metrics.json")
    method: str = pydantic.Field(
        "lora", description="registered adapter method, 'full', or 'head' (linear probe)"
    )
    targets: list[str] | str | None = pydantic.Field(None, description="module suffixes or regex")
    layers: list[int] | None = pydantic.Field(None, description="layer indices to adapt")
    adapter: dict[str, Any] = pydantic.Field({}, description="method hyperparameters")
    objective: Literal["auto", "classification", "causal-lm"] = "auto"
    eval_data: str | None = pydantic.Field(None, description="separate eval file")
    eval_fraction: float = pydantic.Field(0.1, gt=0, lt=1, description="held out if no eval file")
    eval_split: Literal["test", "val"] = pydantic.Field(
        "test", description="bench task split to evaluate on (val: for choosing settings)"
    )
    max_length: int = pydantic.Field(128, gt=0, description="tokens per example")
    batch_size: int = pydantic.Field(16, gt=0, description="examples per micro-batch")
    grad_accum: int = pydantic.Field(1, gt=0, description="micro-batches per optimizer step")
    steps: int | None = pydantic.Field(None, gt=0, description="optimizer steps (else epochs)")
    epochs: float = pydantic.Field(1.0, gt=0, description="passes over the data if no steps")
    lr: float | None = pydantic.Field(None, gt=0, description="peak LR (5e-4 adapter, 5e-5 full)")
    head_lr: float | None = pydantic.Field(
        None, gt=0, description="peak LR of new modules, e.g. the head (default 5e-2; head: lr)"
    )
    warmup: float = pydantic.Field(0.06, ge=0, lt=1, description="warmup fraction of steps")
    weight_decay: float = pydantic.Field(0.0, ge=0, description="AdamW decay on matrices")
    grad_clip: float = pydantic.Field(1.0, ge=0, description="max grad norm (0: off)")
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = pydantic.Field(0, ge=0, description="steps between checkpoints")
    resume: bool = pydantic.Field(False, description="continue from out/checkpoint")
    seed: int = 0
    device: str = "cpu"
    format: Literal["splice", "peft"] = pydantic.Field("splice", description="adapter format")
    progress: bool = True
    select: Literal["spt", "rdp", "id3"] | None = pydantic.Field(
        None, description="choose where to tune (splice.select): spt, rdp or id3"
    )
    budget: int | None = pydantic.Field(
        None, description="selector budget: SPT parameters, RDP layers K, ID³ entries B"
    )
    select_options: dict[str, Any] = pydantic.Field({}, description="the selector's options")
    base_bits: int | None = pydantic.Field(
        None, ge=2, le=8, description="QLoRA: the frozen base quantized to these bits (RTN)"
    )

    @pydantic.model_validator(mode="after")
    def _whole_model_methods_take_no_adapter_options(self) -> TrainConfig:
        if self.method in WHOLE and (self.adapter or self.targets or self.layers):
            raise ValueError(f"--method {self.method} takes no adapter options, targets or layers")
        if self.select and (self.layers or self.checkpoint_every or self.resume):
            raise ValueError(f"--select {self.select} chooses the layers and does not checkpoint")
        if self.select in ("spt", "id3") and (self.method != "lora" or self.adapter):
            raise ValueError(f"--select {self.select} builds its own adapter: drop --method/--set")
        if self.base_bits is not None and self.method in WHOLE:
            raise ValueError(
                f"--base-bits quantizes the frozen base; --method {self.method} has none"
            )
        return self

    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share to be resumed."""
        return self.model_dump(mode="json", exclude={"resume", "progress", "device"})
