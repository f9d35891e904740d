"""``splice analyze geometry``: the §6 study on a model and a prose sample, as a report."""

from __future__ import annotations

from typing import Any

from splice.analysis.geometry import FitClass
from splice.analysis.inputs import load_model, prose, token_batches
from splice.analysis.layer_geometry import geometry_study
from splice.analysis.report import Progress, markdown_table, no_progress, plot_layers
from splice.probe import Hooks, check_layers

__all__ = ["run_geometry"]


def run_geometry(
    model_spec: str,
    layers: list[int] | None,
    *,
    fit: FitClass = "diag",
    k: int = 64,
    ridge: float = 1e-3,
    rank: int = 8,
    target: str = "transition",
    center: bool = False,
    texts: int = 32,
    max_len: int = 64,
    batch_size: int = 8,
    progress: Progress = no_progress,
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``(data, markdown, figures)`` of the geometry study; ``layers=None`` means all blocks."""
    model, tok, name = load_model(model_spec)
    n = Hooks(model).n
    layers = list(range(n)) if layers is None else check_layers(layers, n)
    batches = token_batches(tok, prose(texts), max_len=max_len, batch_size=batch_size)
    tick = progress("geometry", len(layers))
    rep = geometry_study(
        model,
        batches,
        layers,
        fit=fit,
        k=k,
        ridge=ridge,
        rank=rank,
        target=target,
        center=center,
        on_layer=lambda layer: tick(),
    )
    settings = {
        "model": name,
        "fit": fit,
        "k": k,
        "ridge": ridge,
        "rank": rank,
        "target": target,
        "center": center,
        "texts": texts,
        "max_len": max_len,
    }
    data = {"settings": settings, **rep}
    rows = [
        [
            layer,
            r["cos_u_t"]["mean"],
            r["cos_u_r"]["mean"],
            r["angle_u_r"]["mean"],
            r["proj_t"]["mean"],
            r["proj_r"]["mean"],
            r["energy"],
            r["output_change"]["mean"],
            r["rho"],
        ]
        for layer, r in rep["layers"].items()
    ]
    head = [
        "layer",
        "cos(u,tᵘ)",
        "cos(u,r)",
        "∠(u,r)°",
        "π(tᵘ)",
        "π(r)",
        "energy e",
        "output change",
        "ρ(error, change)",
    ]
    mean = lambda key: sum(r[key]["mean"] for r in rep["layers"].values()) / len(layers)  # noqa: E731
    md = (
        f"# Layer-update geometry: {name}\n\n"
        f"{rep['tokens']} tokens from {texts} standard-library paragraphs (≤ {max_len} tokens), "
        f"fit `{fit}`, k={k}, ridge={ridge}, target `{target}`; output change = "
        f"{rep['output_change']}.\n\n"
        f"Mean over layers: cos(u, tᵘ) = {mean('cos_u_t'):.3f}, cos(u, r) = "
        f"{mean('cos_u_r'):.3f}; ρ across layers = {rep['rho_across']}.\n\n"
        + markdown_table(head, rows)
    )
    lay = list(rep["layers"])
    figures = {
        "geometry.png": plot_layers(
            lay,
            {
                "alignment (mean cos)": {
                    "cos(u, tᵘ)": [r["cos_u_t"]["mean"] for r in rep["layers"].values()],
                    "cos(u, r)": [r["cos_u_r"]["mean"] for r in rep["layers"].values()],
                },
                "approximation energy e": {"e": [r["energy"] for r in rep["layers"].values()]},
                "Spearman ρ(error, output change)": {
                    "ρ": [r["rho"] for r in rep["layers"].values()]
                },
            },
            f"{name}: tokenwise ({fit}) vs residual",
        ),
    }
    return data, md, figures
