"""``splice analyze safety``: the NLL probe and the ASA layer sweep on a chat model (§7)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from splice.analysis.asa import asa_sweep, generate, lexicon_judge
from splice.analysis.inputs import chat_ids, load_model
from splice.analysis.nll_probe import nll_probe
from splice.analysis.prompt_set import BENIGN, HARMFUL
from splice.analysis.report import Progress, markdown_table, no_progress, plot_layers
from splice.probe import Hooks, check_layers

__all__ = ["run_safety"]


def run_safety(
    model_spec: str,
    layers: list[int] | None,
    *,
    prompts: Sequence[str] | None = None,
    max_prompts: int = 12,
    new_tokens: int = 32,
    direction: str = "random",
    seed: int = 42,
    asa: bool = True,
    progress: Progress = no_progress,
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``(data, markdown, figures)``: ΔNLL per layer (mean over prompts) and, with ``asa``,
    MASR / PASR / LASR judged by the lexicon judge."""
    model, tok, name = load_model(model_spec, causal=True)
    n = Hooks(model).n
    layers = list(range(n)) if layers is None else check_layers(layers, n)
    texts = list(prompts or HARMFUL)[:max_prompts]
    ids = [chat_ids(tok, t) for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tick = progress("responses + NLL probe", len(ids) * (len(layers) + 1))
    nll: dict[int, dict[str, float]] = {layer: {} for layer in layers}
    rows = []
    for p in ids:
        resp = generate(model, p, new_tokens, pad_token_id=pad)
        tick()
        for layer, r in nll_probe(model, p, resp, layers, seed=seed).items():
            rows.append(r)
            for key, v in r.items():
                nll[layer][key] = nll[layer].get(key, 0.0) + v / len(ids)
            tick()
    raised = sum(nll[layer]["delta_mean"] > 0 for layer in layers)
    data: dict[str, Any] = {
        "settings": {
            "model": name,
            "prompts": len(ids),
            "new_tokens": new_tokens,
            "direction": direction,
            "seed": seed,
            "judge": "lexicon",
        },
        "nll": nll,
        "layers_where_nll_rises": raised,
    }
    md = (
        f"# Latent-perturbation safety: {name}\n\n{len(ids)} prompts "
        f"({'ours' if prompts is None else 'from --prompts'}), greedy {new_tokens} new tokens, "
        f"random statistics-matched δ (seed {seed}).\n\n## NLL probe (response tokens)\n\n"
        f"ΔNLL > 0 at {raised} of {len(layers)} layers.\n\n"
    )
    md += markdown_table(
        ["layer", "clean mean NLL", "perturbed mean NLL", "Δ mean", "Δ sum"],
        [
            [layer, r["clean_mean"], r["nll_mean"], r["delta_mean"], r["delta_sum"]]
            for layer, r in nll.items()
        ],
    )
    panels = {
        "ΔNLL of the own response (mean/token)": {
            "Δ mean NLL": [nll[layer]["delta_mean"] for layer in layers]
        }
    }
    if asa:
        tick = progress("ASA sweep", len(ids) * len(layers))
        sweep = asa_sweep(
            model,
            ids,
            layers,
            lambda t: tok.decode(t, skip_special_tokens=True),
            texts=texts,
            judge=lexicon_judge,
            direction=direction,
            benign=[chat_ids(tok, b) for b in BENIGN[: len(ids)]],
            max_new_tokens=new_tokens,
            seed=seed,
            pad_token_id=pad,
            on_step=tick,
        )
        data["asa"] = sweep
        md += (
            f"\n## ASA ({direction}), lexicon judge\n\nMASR {sweep['masr']:.3f}, PASR "
            f"{sweep['pasr']:.3f}; unsteered unsafe rate {sweep['clean_unsafe_rate']:.3f}. "
            "The judge is a refusal-phrase lexicon, not the paper's LLM judge: read these "
            "as a proxy.\n\n"
        )
        md += markdown_table(["layer", "LASR"], list(sweep["lasr"].items()))
        panels["LASR (lexicon judge)"] = {"LASR": list(sweep["lasr"].values())}
    figures = {"safety.png": plot_layers(layers, panels, f"{name}: latent perturbations")}
    return data, md, figures
