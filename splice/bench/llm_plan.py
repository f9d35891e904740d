"""Progress of an LLM-suite run: an up-front estimate, then a line per phase with the ETA.

The estimate counts optimizer steps of the fine-tunes not in the cache, test/val examples
to score and the learned merges' statistics sequences, at :data:`STEP_S`, :data:`EXAMPLE_S`
and :data:`STATS_S` seconds each (SmolLM2-135M, one thread, on
the 2-core dev box); the ETA rescales the rest by how fast the finished part ran against it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from splice.bench.progress import clock

__all__ = ["EXAMPLE_S", "STATS_S", "STEP_S", "Clock", "model_key"]

# Measured by the first quick run (docs/bench.md, "LLM suite"): 372 s for 4 × 30 steps,
# 197 s for 1,120 scored examples.
STEP_S = 3.1  # one LoRA step, batch 8, ~60 tokens
EXAMPLE_S = 0.18  # one example scored: prompt, free and constrained decoding, gold answer
# Statistics of the learned merges, per training sequence and task (splice.bench.llm_learned),
# measured on the quick profile 2026-12-08 (docs/bench.md): RegMean one forward (43.0 s for
# 4 × 32 sequences); Fisher one forward and backward (147 s, beside other jobs); RegMean++ a
# forward per decoder block, stopped after it (233 s for 4 × 16 sequences).
STATS_S = {"regmean": 0.34, "fisher": 1.15, "regmean_plusplus": 3.6}


def model_key(name: str) -> str:
    """Identifies the model's weights for the fine-tune cache."""
    from splice.data.cache import file_sha256, stable_hash

    if name == "smollm2":
        from splice.data.causal_lm import SMOLLM2

        return f"smollm2:{SMOLLM2.sha256}"
    root = Path(name)
    files = [*sorted(root.glob("*.safetensors")), root / "config.json"]
    return stable_hash({p.name: file_sha256(p) for p in files if p.is_file()})


class Clock:
    """Estimated and actual work, and the lines that report it through ``say``."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.start = time.perf_counter()
        self.est_total = 0.0
        self.est_done = 0.0
        self.work_start = self.start
        self.load_s = 0.0
        self.train_s = 0.0

    def loaded(self, cfg: Any, encoded: Mapping[str, Mapping[str, Any]],
               entries: Mapping[Any, Path], settings: int,
               learned: Sequence[str] = ()) -> None:  # fmt: skip
        """Print the estimate once the model and data are loaded (``settings``: weight sets
        scored on test besides the references; ``learned``: the learned merges among them,
        whose statistics passes are counted too)."""
        from splice.bench.llm_train import load_entry

        self.load_s = time.perf_counter() - self.start
        self.work_start = time.perf_counter()
        fresh = sum(1 for e in entries.values() if load_entry(e) is None)
        test = sum(len(e["test"]) for e in encoded.values())
        val = sum(len(e["val"]) for e in encoded.values()) if cfg.lambda_grid else 0
        tuned = settings * len(cfg.lambda_grid) * val
        evals = (2 + settings) * test + tuned  # zero-shot, individual, settings
        seeds = len(cfg.seeds)
        stats = sum(STATS_S.get(n, 0.0) for n in learned) * cfg.learned_samples * len(encoded)
        self.est_total = seeds * (evals * EXAMPLE_S + stats) + fresh * cfg.train.steps * STEP_S
        self.say(
            f"[{clock(self.load_s)}] loaded {cfg.model} and {len(encoded)} tasks; plan: "
            f"{fresh} of {len(entries)} fine-tunes to train ({cfg.train.steps} steps), "
            f"{2 + settings} weight sets × {test} test examples × {seeds} seed(s); "
            f"estimate {clock(self.load_s + self.est_total)} in all"
        )

    def tick(self, n: int, train: bool = False) -> None:
        self.est_done += n * (STEP_S if train else EXAMPLE_S)

    def tick_stats(self, method: str, sequences: int) -> None:
        """A learned merge's statistics passes over ``sequences`` training sequences."""
        self.est_done += sequences * STATS_S.get(method, 0.0)

    def _eta(self) -> str:
        spent = time.perf_counter() - self.work_start
        rate = spent / self.est_done if self.est_done else 1.0
        left = max(0.0, self.est_total - self.est_done) * rate
        return f"[{clock(time.perf_counter() - self.start)}, ETA {clock(left)}]"

    def trained(self, task: str, seed: int, meta: Mapping[str, Any], cached: bool,
                steps: int) -> None:  # fmt: skip
        if cached:
            self.say(f"{self._eta()} train {task} (seed {seed}): cached")
            return
        self.train_s += float(meta.get("train_s", 0.0))
        first, final = meta.get("first_loss") or 0.0, meta.get("final_loss") or 0.0
        self.say(
            f"{self._eta()} train {task} (seed {seed}): {steps} steps in "
            f"{meta.get('train_s', 0):.0f} s, answer loss {first:.2f} → {final:.2f}"
        )

    def say_row(
        self,
        scores: Mapping[str, list[dict[str, Any]]],
        label: str,
        own: Mapping[str, float] | None = None,
        secs: float | None = None,
    ) -> None:
        from splice.bench.llm import headline

        vals = {t: headline(s[-1]) for t, s in scores.items()}
        text = ", ".join(f"{t} {v:.0%}" for t, v in vals.items())
        if own:
            ratios = [vals[t] / own[t] for t in vals if own.get(t, 0) > 0]
            text += f"; normalized {sum(ratios) / max(len(ratios), 1):.1%}"
        took = f" ({secs:.0f} s)" if secs is not None else ""
        self.say(f"{self._eta()} {label}: {text}{took}")

    def meta(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start
        return {
            "wall_s": round(wall, 1),
            "load_s": round(self.load_s, 1),
            "train_s": round(self.train_s, 1),
            "eval_s": round(wall - self.load_s - self.train_s, 1),
        }
