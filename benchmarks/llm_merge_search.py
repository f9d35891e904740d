"""LLM suite: a validation-selected merge search toward the issue's 90 % normalized EM.

Takes the quick profile's cached LoRA fine-tunes (run ``splice bench --suite llm`` first, or
this trains them) and scores merge settings on the **validation** splits only (normalized EM:
merged / individual, mean over tasks, as in the suite's table):

- ``--ties``: TIES over a density × λ grid (``--densities`` × ``--lambdas``);
- ``--others``: other methods, each over its own small grid (``OTHERS``);
- ``--weights``: per-task weights w_t of the best TIES setting so far, one task at a time
  (coordinate ascent: a value from ``--task-weights`` is kept when it raises the val score).

Every val score is appended to ``--log`` (JSONL), so a search split over several runs picks
from all of them. ``--test`` then scores the val-argmax over the whole log on the test split
(and the individual fine-tunes, for the normalization) — the only time the test split is
used. Run by hand, one stage a run (each ≈ 6-10 min on 2 cores with the fine-tunes cached)::

    OMP_NUM_THREADS=1 python benchmarks/llm_merge_search.py --ties --weights --log s.jsonl
    OMP_NUM_THREADS=1 python benchmarks/llm_merge_search.py --others --test --log s.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# method -> (fixed params, per-model params, λ grid): each method's own knobs at values its
# paper or mergekit documents; λ is the merged task vector's scale.
OTHERS: dict[str, tuple[dict[str, Any], dict[str, Any], tuple[float, ...]]] = {
    "dare_ties": ({"consensus": "ties"}, {"p": 0.5}, (1.0, 1.5)),
    "breadcrumbs_ties": ({"consensus": "ties"}, {"density": 0.9, "gamma": 0.01}, (0.5, 1.0)),
    "della": ({"consensus": "ties"}, {"density": 0.5}, (1.0, 1.5)),
}


def _method(name: str) -> str:
    return {"dare_ties": "dare", "breadcrumbs_ties": "breadcrumbs"}.get(name, name)


class Bench:
    """The quick profile's model, tasks, fine-tunes and a scorer of weight sets."""

    def __init__(self) -> None:
        from splice.bench.finetune import apply_deltas
        from splice.bench.llm import LLM_PROFILES, _Scorer, headline
        from splice.bench.llm_eval import encode
        from splice.bench.llm_plan import model_key
        from splice.bench.llm_train import finetune_lm_cached, lm_entry
        from splice.data.causal_lm import load_causal_lm
        from splice.data.llm_tasks import load_gen_task
        from splice.data.registry import Caps

        cfg = self.cfg = LLM_PROFILES["quick"]
        model, tok = load_causal_lm(cfg.model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.tasks = list(cfg.tasks)
        enc = {}
        deltas = {}
        for t in self.tasks:
            d = load_gen_task(t, Caps(*cfg.caps), cfg.split_seed, cfg.max_words)
            enc[t] = {s: encode(tok, d, s) for s in ("train", "val", "test")}
            entry = lm_entry(model_key(cfg.model), d.key, t, cfg.train, 0)
            deltas[t], _, cached = finetune_lm_cached(model, enc[t]["train"], cfg.train, 0, pad,
                                                      entry)  # fmt: skip
            say(f"fine-tune {t}: {'cached' if cached else 'trained'}")
        params = dict(model.named_parameters())
        names = sorted({n for d in deltas.values() for n in d})
        self.base = {n: params[n].detach().clone() for n in names}
        self.own = {t: apply_deltas(self.base, deltas[t]) for t in self.tasks}
        self.models = [{**self.base, **self.own[t]} for t in self.tasks]
        self.score = _Scorer(model, tok, enc, cfg, lambda n: None)
        self.headline = headline
        self.own_val = self._own("val")

    def _own(self, split: str) -> dict[str, float]:
        return {t: self.headline(self.score(self.own[t], split, [t])[t]) for t in self.tasks}

    def merged(self, setting: dict[str, Any]) -> dict[str, Any]:
        from splice.merge import merge_state_dicts

        per = [{**setting["model_params"], "weight": w}
               for w in setting.get("weights") or [1.0] * len(self.tasks)]  # fmt: skip
        return merge_state_dicts(_method(setting["method"]), self.models, base=self.base,
                                 params=setting["params"], model_params=per, seed=0)  # fmt: skip

    def evaluate(self, setting: dict[str, Any], split: str) -> dict[str, Any]:
        own = self.own_val if split == "val" else self._own("test")
        scores = self.score(self.merged(setting), split, self.tasks)
        em = {t: self.headline(s) for t, s in scores.items()}
        ratios = [em[t] / own[t] for t in self.tasks if own[t] > 0]
        return {"em": em, "own": own, "normalized": sum(ratios) / len(ratios)}


def say(line: str) -> None:
    print(f"[{time.perf_counter() - START:6.0f} s] {line}", file=sys.stderr, flush=True)


def label(s: dict[str, Any]) -> str:
    parts = [s["method"], *(f"{k}={v}" for k, v in {**s["model_params"], **s["params"]}.items())]
    if s.get("weights"):
        parts.append("w=" + "/".join(f"{w:g}" for w in s["weights"]))
    return " ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--log", type=Path, required=True, help="JSONL of every val score")
    p.add_argument("--ties", action="store_true")
    p.add_argument("--densities", default="0.2,0.5,1.0")
    p.add_argument("--lambdas", default="1.0,1.3,1.6")
    p.add_argument("--others", action="store_true")
    p.add_argument("--weights", action="store_true")
    p.add_argument("--task-weights", default="0.6,1.5")
    p.add_argument("--test", action="store_true", help="score the val-argmax of --log on test")
    a = p.parse_args()
    bench = Bench()
    say(f"loaded; individual val {bench.own_val}")
    log = [json.loads(x) for x in a.log.read_text().splitlines()] if a.log.is_file() else []
    seen = {label(r["setting"]) for r in log}

    def run(setting: dict[str, Any]) -> float:
        if (lab := label(setting)) in seen:
            return next(r["val"]["normalized"] for r in log if label(r["setting"]) == lab)
        r = {"setting": setting, "val": bench.evaluate(setting, "val")}
        log.append(r)
        seen.add(lab)
        with a.log.open("a") as f:
            f.write(json.dumps(r) + "\n")
        em = ", ".join(f"{t} {v:.0%}" for t, v in r["val"]["em"].items())
        say(f"val {r['val']['normalized']:.1%} ({em}): {lab}")
        return r["val"]["normalized"]

    def ties(d: float, lam: float, w: list[float] | None = None) -> dict[str, Any]:
        return {"method": "ties", "params": {"lambda": lam}, "model_params": {"density": d},
                "weights": w}  # fmt: skip

    if a.ties:
        for d in map(float, a.densities.split(",")):
            for lam in map(float, a.lambdas.split(",")):
                run(ties(d, lam))
    if a.others:
        for name, (params, mp, grid) in OTHERS.items():
            for lam in grid:
                run({"method": name, "params": {**params, "lambda": lam}, "model_params": mp})
    if a.weights:
        tied = [r for r in log if r["setting"]["method"] == "ties"]
        best = max(tied, key=lambda r: r["val"]["normalized"])
        s = dict(best["setting"])
        s["weights"] = list(s.get("weights") or [1.0] * len(bench.tasks))
        score = best["val"]["normalized"]
        for i in range(len(bench.tasks)):
            for w in map(float, a.task_weights.split(",")):
                trial = {**s, "weights": [*s["weights"][:i], w, *s["weights"][i + 1 :]]}
                if (v := run(trial)) > score:
                    s, score = trial, v
    if a.test:
        best = max(log, key=lambda r: r["val"]["normalized"])  # first of equals: the earliest
        r = bench.evaluate(best["setting"], "test")
        em = ", ".join(f"{t} {100 * v:.1f}" for t, v in r["em"].items())
        own = ", ".join(f"{t} {100 * v:.1f}" for t, v in r["own"].items())
        print(f"val-selected over {len(log)} settings: {label(best['setting'])} "
              f"(val {best['val']['normalized']:.1%})")  # fmt: skip
        print(f"test: normalized {r['normalized']:.1%}; EM {em}; individual {own}")
        labels = [t for t in bench.tasks if r["own"][t] > 0]
        print(f"test tasks in the normalization: {labels}")
    say("done")


START = time.perf_counter()

if __name__ == "__main__":
    main()
