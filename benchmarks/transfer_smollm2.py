"""Cross-scale parametric knowledge transfer on SmolLM2 (issue #27 item 3, spec other.md §5):
held-out perplexity of the student before, after PostPKT, after LaTen, and the teacher.

Teacher: SmolLM2-135M-Instruct (30 layers). Student: a smaller model of the same family
and tokenizer — by default the 10-layer depth-pruned SmolLM2 uptrained by
``benchmarks/recursive_smollm2.py`` (``--student``). The task is WordNet noun glosses:
``--extract`` documents locate (attribution on one of them, sensitivity on all), ``--align``
documents train LaTen's hypernetworks (student frozen, λ = 1000 magnitude penalty) and
PostPKT's LoRA (rank 16), each for ``--steps`` steps of batch 1 through
:func:`splice.train.loop.fit`; ``--heldout`` other glosses are evaluated.

    python benchmarks/transfer_smollm2.py --student /tmp/rrt/up/pruned/model
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch


def glosses(n_extract: int, n_align: int, n_test: int) -> tuple[list[str], list[str], list[str]]:
    from splice.data.tasks import wordnet_supersense

    texts, _, _ = wordnet_supersense.read()
    random.Random(1).shuffle(texts)
    a, b = n_extract, n_extract + n_align
    return texts[:a], texts[a:b], texts[b : b + n_test]


def perplexity(model, tok, texts: list[str], max_length: int) -> float:
    from splice.train.batches import collate
    from splice.train.hf import evaluate

    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    batches = [collate(list(range(i, min(i + 8, len(ids)))), ids, None, tok.pad_token_id or 2)
               for i in range(0, len(ids), 8)]  # fmt: skip
    return evaluate(model, batches, "causal-lm", lambda: torch.autocast("cpu", enabled=False))[
        "perplexity"
    ]


def batch_of(tok, text: str, max_length: int) -> dict[str, torch.Tensor]:
    ids = torch.tensor([tok(text, truncation=True, max_length=max_length)["input_ids"]])
    return {"input_ids": ids, "labels": ids}


def train(params, loss_of, steps: int, lr: float) -> list[float]:
    from splice.train.loop import TrainStep, fit

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    return fit(TrainStep(lambda i: (loss_of(i), 1), opt, grad_clip=1.0), steps).history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--extract", type=int, default=8)
    parser.add_argument("--align", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--rate", type=float, default=0.1)
    args = parser.parse_args()
    from splice.convert.attribution import attribute, sensitivity, top_layers
    from splice.convert.laten import LaTen, check_same_tokenizer
    from splice.convert.postpkt import inject_postpkt
    from splice.data.causal_lm import load_causal_lm

    teacher, t_tok = load_causal_lm(args.teacher)
    student, s_tok = load_causal_lm(args.student)
    check_same_tokenizer(t_tok, s_tok)
    extract, align, test = glosses(args.extract, args.align, args.heldout)
    print(f"glosses: {len(extract)} extract, {len(align)} align/train, {len(test)} held out; "
          f"{args.steps} steps of batch 1, ≤{args.max_length} tokens", flush=True)  # fmt: skip
    rows = {"teacher": perplexity(teacher, t_tok, test, args.max_length)}
    rows["student"] = perplexity(student, s_tok, test, args.max_length)
    print(f"  teacher {rows['teacher']:.2f}, student {rows['student']:.2f}", flush=True)

    # Locate on one extraction example: its last token is the target, the rest the input
    probe = s_tok(extract[0])["input_ids"]
    ids, target = torch.tensor(probe[:-1]), probe[-1]
    t_scores, s_scores = attribute(teacher, ids, target), attribute(student, ids, target)
    batches = [batch_of(s_tok, t, args.max_length) for t in align]

    start = time.perf_counter()
    laten = LaTen(teacher, student, t_scores, s_scores, rate=args.rate)
    laten.attach(student)
    train(laten.hyper.parameters(), lambda i: laten.loss(student, batches[i % len(batches)]),
          args.steps, 3e-4)  # fmt: skip
    laten.merge(student)
    rows["student + LaTen"] = perplexity(student, s_tok, test, args.max_length)
    print(f"  LaTen: {rows['student + LaTen']:.2f} ({time.perf_counter() - start:.0f} s)")

    student, _ = load_causal_lm(args.student)  # PostPKT starts from the plain student
    start = time.perf_counter()
    names = [f"model.layers.{i}.{p}.weight" for i in range(teacher.config.num_hidden_layers)
             for p in ("mlp.up_proj", "mlp.down_proj", "self_attn.o_proj")]  # fmt: skip
    scores = sensitivity(teacher, lambda m, b: m(**b).loss,
                         [batch_of(t_tok, t, args.max_length) for t in extract], names)  # fmt: skip
    pairs = list(zip(top_layers(t_scores, student.config.num_hidden_layers),
                     range(student.config.num_hidden_layers), strict=True))  # fmt: skip
    inject_postpkt(teacher, student, scores, pairs, rank=16)
    lora = [p for p in student.parameters() if p.requires_grad]
    student.train()
    train(lora, lambda i: student(**batches[i % len(batches)]).loss, args.steps, 1e-4)
    rows["student + PostPKT"] = perplexity(student, s_tok, test, args.max_length)
    print(f"  PostPKT: {rows['student + PostPKT']:.2f} ({time.perf_counter() - start:.0f} s)")

    order = ["student", "student + PostPKT", "student + LaTen", "teacher"]
    print("\n| model | held-out gloss perplexity |\n| --- | ---: |")
    for name in order:
        print(f"| {name} | {rows[name]:.2f} |")


if __name__ == "__main__":
    main()
