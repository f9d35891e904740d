"""Does the §6 alignment target fail because of an estimator choice? (issue #30)

For a few blocks of one model, fits the diagonal tokenwise map under several [lib] estimator
choices and prints, per block and choice: the mean per-token cos(u, tᵘ) and cos(u, r) (update
scale), the same pooled over tokens (one cosine of the stacked matrices), cos(y, t) and
cos(y, r) (transition scale), and — for the leave-one-out fits — Spearman's ρ between three
per-token error definitions (‖r‖²/‖u‖², ‖r‖², ‖r‖²/‖x‖²) and the output change when the
block outputs the tokenwise part (KL for a causal LM, relative L2 of the last state else).

``--tokens N1,N2,…`` asks instead how the alignment depends on the sample size (the spec
suggests 10k–100k tokens; the analysis default is ~1.5k): per block, for each N, the default
fit and the centred k = 8 fit on a random subsample of N tokens (seed 0; the subsamples are
nested), cos columns only.

    python benchmarks/geometry_estimators.py minilm --layers 0,3,5 --texts 64
    python benchmarks/geometry_estimators.py smollm2 --layers 15 --texts 48
    python benchmarks/geometry_estimators.py minilm --layers 0 --texts 400 --tokens 2000,15000
"""

from __future__ import annotations

import argparse
import time

import torch

from splice.analysis.geometry import fit_tokenwise, layer_metrics, spearman
from splice.analysis.inputs import load_model, prose, token_batches
from splice.analysis.layer_geometry import _final, _replace_run
from splice.probe import Hooks

CHOICES = {  # name: (k, center, leave_one_out)
    "k64 (default)": (64, False, True),
    "k8 centred": (8, True, True),
    "k8 centred in-sample": (8, True, False),
}


def pooled(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a * b).sum() / (a.norm() * b.norm())).item()


def by_tokens(layer: int, x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> None:
    """Rows of the sample-size study for one block (nested random subsamples)."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    for n in sizes:
        idx = order[:n]
        for choice in ("k64 (default)", "k8 centred"):
            k, center, _ = CHOICES[choice]
            t = fit_tokenwise(x[idx], y[idx], fit="diag", k=k, center=center)
            met = layer_metrics(x[idx], y[idx], t)
            cells = [f"{met[c].mean():.3f}" for c in ("cos_u_t", "cos_u_r", "cos_y_t")]
            print(f"| {layer} | {len(idx)} | {choice} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="smollm2, minilm or a local model dir")
    ap.add_argument("--layers", default="0")
    ap.add_argument("--texts", type=int, default=48, help="prose paragraphs (≤ 64 tokens each)")
    ap.add_argument("--tokens", default="", help="sample sizes N1,N2,… (the sample-size study)")
    a = ap.parse_args()
    layers = [int(v) for v in a.layers.split(",")]
    sizes = [int(v) for v in a.tokens.split(",") if v]
    start = time.perf_counter()
    model, tok, name = load_model(a.model)
    batches = token_batches(tok, prose(a.texts), max_len=64, batch_size=8)
    with torch.no_grad(), Hooks(model) as h:
        cap_in, cap_out = h.capture(layers, inputs=True), h.capture(layers)
        finals, masks = [], []
        for b in batches:
            out, logits = _final(model(**b))
            finals.append(out)
            masks.append(b["attention_mask"].bool())
    tokens = int(sum(m.sum() for m in masks))
    print(f"{name}: {tokens} tokens, diagonal class\n")
    head = ["block", "choice", "cos(u,tᵘ)", "cos(u,r)", "pooled cos(u,tᵘ) / (u,r)", "cos(y,t)"]
    head += ["cos(y,r)", "ρ ‖r‖²/‖u‖²", "ρ ‖r‖²", "ρ ‖r‖²/‖x‖²"]
    if sizes:
        head = ["block", "tokens", "choice", "cos(u,tᵘ)", "cos(u,r)", "cos(y,t)"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for layer in layers:
        x = torch.cat([s[m] for s, m in zip(cap_in.calls[layer], masks, strict=True)]).double()
        y = torch.cat([s[m] for s, m in zip(cap_out.calls[layer], masks, strict=True)]).double()
        if sizes:
            by_tokens(layer, x, y, sizes)
            continue
        u = y - x
        for choice, (k, center, loo) in CHOICES.items():
            t = fit_tokenwise(x, y, fit="diag", k=k, center=center, leave_one_out=loo)
            met = layer_metrics(x, y, t)
            r = y - t
            rhos = ["–"] * 3
            if loo:
                with torch.no_grad():
                    change = _replace_run(model, batches, masks, finals, layer, t, logits)
                err = r.pow(2).sum(1)
                errors = (err / u.pow(2).sum(1), err, err / x.pow(2).sum(1))
                rhos = [f"{spearman(e, change):.2f}" for e in errors]
            cells = [
                f"{met['cos_u_t'].mean():.3f}",
                f"{met['cos_u_r'].mean():.3f}",
                f"{pooled(u, t - x):.3f} / {pooled(u, r):.3f}",
                f"{met['cos_y_t'].mean():.3f}",
                f"{met['cos_y_r'].mean():.3f}",
                *rhos,
            ]
            print(f"| {layer} | {choice} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
