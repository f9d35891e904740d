"""Shared by the quantization benchmarks (issue #28): the bench's fine-tuned classifiers, their
calibration and test batches, a resumable JSON store of finished rows, progress with an ETA.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from splice.bench.finetune import FinetuneConfig, apply_deltas, finetune_cached
from splice.bench.runner import TEXT_TASKS, VISION_TASKS
from splice.data.encoders import load_encoder
from splice.data.registry import TASKS, load_task

__all__ = [
    "Classifier", "Progress", "Store", "accuracy", "batches", "samples_for", "suite_tasks",
    "task_model",
]  # fmt: skip


class Classifier(nn.Module):
    """A bench encoder's module with a task head: batch → logits (the pooling of
    ``splice.data.encoders``: a text encoder's mean over tokens; the image net's own)."""

    def __init__(self, text: bool, body: nn.Module, head) -> None:
        super().__init__()
        self.text = text
        self.body = body
        self.head = nn.Linear(head.weight.shape[1], head.weight.shape[0])
        self.head.weight.data.copy_(head.weight)
        self.head.bias.data.copy_(head.bias)

    def forward(self, batch):
        if not self.text:
            return self.head(self.body(batch))
        h = self.body(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def suite_tasks(spec: str) -> list[str]:
    """``image``, ``text``, ``all`` or comma-separated task names."""
    suites = {"image": list(VISION_TASKS), "text": list(TEXT_TASKS)}
    suites["all"] = suites["image"] + suites["text"]
    return suites.get(spec) or [t for t in spec.split(",") if t]


def samples_for(args: Any, task: str) -> int:
    """Calibration samples of ``task``: ``--text-samples`` for a text task where given."""
    text = getattr(args, "text_samples", None)
    return text if text and task in TEXT_TASKS else args.samples


def batches(prepared, n: int, size: int) -> list:
    order = np.arange(min(n, len(prepared)))
    return [
        prepared.batch(order[i : i + size], torch.device("cpu")) for i in range(0, len(order), size)
    ]


@torch.no_grad()
def accuracy(model: nn.Module, test: list, labels: np.ndarray) -> float:
    preds = torch.cat([model(b).argmax(-1) for b in test]).numpy()
    return float((preds == labels).mean())


def task_model(task_name: str) -> tuple[Classifier, Any, Any]:
    """The task's fine-tuned checkpoint (LoRA r=8, 100 steps, and its head; cached by
    ``splice.bench.finetune_cached``) as one module, its encoder and its data splits."""
    task = TASKS.get(task_name)
    encoder = load_encoder(task.modality)
    data = load_task(task)
    run, _ = finetune_cached(encoder, data, FinetuneConfig(steps=100), seed=0)
    body = copy.deepcopy(encoder.module)
    body.load_state_dict(apply_deltas(encoder.module.state_dict(), run.deltas), strict=False)
    return Classifier(task.modality == "text", body, run.head).eval(), encoder, data


class Store:
    """Finished rows in a JSON file (``key → result``), rewritten atomically after each row, so
    an interrupted or budget-limited run continues where it stopped; runs of different rows
    may share the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict] = json.loads(path.read_text()) if path.is_file() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def put(self, key: str, result: dict) -> None:
        """Adds a row to the file as it is now (under a lock: another process may have added
        rows of other tasks or rows since this one read it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                self.rows = {**self.rows, **json.loads(self.path.read_text())}
            self.rows[key] = result
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.rows, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


class Progress:
    """``[done/total] … elapsed, ETA`` lines; the ETA is the mean time of this run's finished
    pieces times the pieces left (machines differ up to 4×, so it learns as it goes)."""

    def __init__(self, total: int, budget_s: float) -> None:
        self.total, self.done, self.budget_s = total, 0, budget_s
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.budget_s > 0 and self.elapsed > self.budget_s

    def step(self, what: str) -> None:
        self.done += 1
        eta = self.elapsed / self.done * (self.total - self.done)
        print(
            f"[{self.done}/{self.total}] {what} — {self.elapsed:.0f} s elapsed, ETA {eta:.0f} s",
            flush=True,
        )
