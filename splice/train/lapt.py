"""LAPT training through the one loop (other.md §7.7; pieces in :mod:`splice.analysis.lapt`).

Defaults follow the released code where CPU allows: full fine-tuning, LR 1e-4, cosine schedule
with 10 % warm-up, AdamW (the code's paged 32-bit AdamW needs a GPU library), weight decay
2e-6, batch 1 with gradient accumulation 2, ``max_steps`` 20; fp32.

Memory (issue #30: ≤ 3 GB peak RSS on SmolLM2-135M): the fp32 parameters, gradients and two
Adam moments are 4 × 513 MiB and cannot shrink without changing the update. What can go is
allocator slack: glibc raises its mmap threshold after large frees, so freed gradients and
activations of 128 KB … 32 MB stay in the heap; :func:`splice._memory.return_freed_memory`
pins the threshold at 128 KB. The optimizer is PyTorch's fused AdamW (one kernel per
parameter group, no per-parameter temporaries); ``fused=False`` is the single-tensor
reference, which gives the same update up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from splice._memory import return_freed_memory
from splice.analysis.lapt import collate_sft, lapt_loss
from splice.analysis.report import Progress, no_progress
from splice.train.loop import LoopState, TrainStep, fit

__all__ = ["lapt_study", "train_lapt"]

_MMAP_FROM = 1 << 17
"""Bytes from which buffers get their own mapping (glibc's initial threshold, kept fixed)."""


def train_lapt(
    model: nn.Module,
    pairs: Sequence[tuple[Tensor, Tensor]],
    layer: int,
    *,
    steps: int = 20,
    lr: float = 1e-4,
    batch_size: int = 1,
    grad_accum: int = 2,
    weight_decay: float = 2e-6,
    warmup: float = 0.1,
    pad_id: int = 0,
    seed: int = 42,
    fused: bool = True,
    progress: bool = False,
) -> LoopState:
    """Fine-tune ``model`` in place on (prompt, safe response) ``pairs`` with LAPT at ``layer``;
    examples are visited in a seeded shuffled order, cycling. ``fused=False`` steps with the
    single-tensor AdamW instead of the fused one (same update; more temporary memory)."""
    return_freed_memory(_MMAP_FROM)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=gen).tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    kind = {"fused": True} if fused else {"foreach": False}
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kind)
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def micro(i: int) -> tuple[Tensor, int]:
        start = i * batch_size
        chunk = [pairs[order[(start + j) % len(order)]] for j in range(batch_size)]
        return lapt_loss(model, collate_sft(chunk, pad_id), layer, gen), batch_size

    model.train()
    step = TrainStep(micro, opt, sched, grad_accum=grad_accum)
    state = fit(step, steps, progress=progress)
    model.eval()
    return state


def lapt_study(
    model_spec: str,
    layer: int,
    *,
    eval_layers: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    steps: int = 20,
    lr: float = 1e-4,
    new_tokens: int = 32,
    seed: int = 42,
    progress: Progress = no_progress,
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """``(data, markdown, figures)``: ASA (random, lexicon judge) on held-out prompts, the
    NLL probe's ΔNLL of the model's pre-LAPT held-out responses (a judge-free measure of the
    robustness LAPT trains) and held-out perplexity, before and after LAPT at ``layer``.

    Prompts split 60/40 (seed 42) into training (prompt + the model's own clean response)
    and held-out; perplexity is measured on 16 standard-library paragraphs.
    """
    from splice.analysis.asa import asa_sweep, generate, lexicon_judge
    from splice.analysis.inputs import chat_ids, load_model, prose
    from splice.analysis.lapt import perplexity
    from splice.analysis.nll_probe import nll_probe
    from splice.analysis.prompt_set import HARMFUL
    from splice.analysis.report import markdown_table
    from splice.probe import Hooks, check_layers

    return_freed_memory(_MMAP_FROM)  # before the model's buffers are allocated
    model, tok, name = load_model(model_spec, causal=True)
    n = Hooks(model).n
    layer = check_layers(layer, n)[0]
    eval_layers = check_layers(list(eval_layers or [layer]), n)
    texts = list(prompts or HARMFUL)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = round(0.6 * len(texts))
    train_txt, test_txt = [texts[i] for i in perm[:cut]], [texts[i] for i in perm[cut:]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    test_ids = [chat_ids(tok, t) for t in test_txt]
    held = [tok(t, return_tensors="pt")["input_ids"][0][:96] for t in prose(48)[32:]]
    decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731

    own = [generate(model, p, new_tokens, pad_token_id=pad) for p in test_ids]

    def evaluate(label: str) -> dict[str, Any]:
        tick = progress(f"ASA {label}", len(test_ids) * len(eval_layers))
        sweep = asa_sweep(
            model,
            test_ids,
            eval_layers,
            decode,
            texts=test_txt,
            judge=lexicon_judge,
            max_new_tokens=new_tokens,
            seed=seed,
            pad_token_id=pad,
            on_step=tick,
        )
        dnll = dict.fromkeys(eval_layers, 0.0)  # ΔNLL of the pre-LAPT responses, mean/token
        for p, y in zip(test_ids, own, strict=True):
            for lay, r in nll_probe(model, p, y, eval_layers, seed=seed).items():
                dnll[lay] += r["delta_mean"] / len(test_ids)
        return {
            "masr": sweep["masr"],
            "pasr": sweep["pasr"],
            "lasr": sweep["lasr"],
            "delta_nll": dnll,
            "perplexity": perplexity(model, held),
            "unsafe_unsteered": sweep["clean_unsafe_rate"],
            "records": sweep["records"],
        }

    before = evaluate("before")
    tick = progress("safe responses", len(train_txt))
    pairs = []
    for t in train_txt:
        p = chat_ids(tok, t)
        pairs.append((p, generate(model, p, new_tokens, pad_token_id=pad)))
        tick()
    state = train_lapt(
        model, pairs, layer, steps=steps, lr=lr, pad_id=pad, seed=seed, progress=False
    )
    after = evaluate("after")
    change = after["perplexity"] / before["perplexity"] - 1
    data = {
        "settings": {
            "model": name,
            "layer": layer,
            "eval_layers": eval_layers,
            "steps": steps,
            "lr": lr,
            "train_prompts": len(train_txt),
            "test_prompts": len(test_txt),
            "judge": "lexicon",
        },
        "before": before,
        "after": after,
        "loss_history": state.history,
        "perplexity_change": change,
    }
    rows = [
        [
            label,
            r["masr"],
            r["pasr"],
            r["lasr"][layer],
            r["delta_nll"][layer],
            r["unsafe_unsteered"],
            r["perplexity"],
        ]
        for label, r in (("before", before), ("after", after))
    ]
    md = (
        f"# LAPT at layer {layer}: {name}\n\n{len(train_txt)} training / {len(test_txt)} "
        f"held-out prompts, {steps} steps at LR {lr}; ASA random δ at layers {eval_layers}, "
        "lexicon judge (a proxy for the paper's LLM judge).\n\n"
        + markdown_table(
            [
                "",
                "MASR",
                "PASR",
                f"LASR@{layer}",
                f"ΔNLL@{layer}",
                "unsafe unsteered",
                "held-out perplexity",
            ],
            rows,
        )
        + f"\nHeld-out perplexity change: {100 * change:+.2f} %.\n"
    )
    return data, md, {}
