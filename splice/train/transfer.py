"""Cross-scale parametric knowledge transfer, end to end (issue #27 item 3; spec other.md §5):
``splice convert transfer TEACHER STUDENT --method laten|postpkt``.

One run: load a teacher and a smaller student of one family (same vocabulary, else a one-line
error), split the texts by document into *extract* (locating: attribution on the first,
sensitivity on all), *align* (training) and *held-out* (perplexity) parts, measure the
student (and teacher) perplexity, transfer, measure again, and save the student with the
transfer merged into its weights (:meth:`splice.convert.laten.LaTen.merge`,
:func:`splice.convert.postpkt.merge_postpkt`) plus ``metrics.json``.

- ``laten``: the teacher's top-N layers pair with the student's N; one hypernetwork per
  module type trains through the frozen student's LM loss + λ·magnitude penalty.
- ``postpkt``: the teacher's sensitivity-ranked slices, rank-r SVD → LoRA on the frozen
  student, the LoRA fine-tuned on the LM loss, then merged.

Both train through :func:`splice.train.loop.fit` (AdamW, wd 0.05, β = (0.9, 0.95), clip 1).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch

from splice._schema import Strict
from splice.errors import SpliceError

__all__ = ["TransferConfig", "perplexity", "split_texts", "transfer"]

DEFAULT_LR = {"laten": 3e-4, "postpkt": 1e-4}
TARGETS = ("mlp.up_proj", "mlp.down_proj", "self_attn.o_proj")


class TransferConfig(Strict):
    """Everything one transfer run depends on; written to ``metrics.json``."""

    teacher: str = pydantic.Field(description="'smollm2' or a causal-LM dir")
    student: str = pydantic.Field(description="a smaller causal-LM dir of the same family")
    out: Path = pydantic.Field(description="where the transferred student is saved")
    method: Literal["laten", "postpkt"] = "laten"
    data: str = pydantic.Field(
        "glosses", description="'glosses' (WordNet noun glosses) or a .jsonl/.csv text file"
    )
    extract: int = pydantic.Field(8, gt=0, description="documents that locate the knowledge")
    align: int = pydantic.Field(16, gt=0, description="documents the transfer trains on")
    heldout: int = pydantic.Field(64, gt=0, description="documents perplexity is measured on")
    steps: int = pydantic.Field(16, ge=0, description="optimizer steps")
    batch_size: int = pydantic.Field(1, gt=0)
    lr: float | None = pydantic.Field(None, description="default: laten 3e-4, postpkt 1e-4")
    rate: float = pydantic.Field(0.1, gt=0, le=1, description="LaTen τ: share of neurons/dims")
    penalty: float = pydantic.Field(1000.0, ge=0, description="LaTen λ (magnitude penalty)")
    rank: int = pydantic.Field(16, gt=0, description="PostPKT LoRA rank")
    max_length: int = pydantic.Field(48, gt=1, description="tokens per document (truncated)")
    seed: int = 1
    teacher_perplexity: bool = pydantic.Field(True, description="also measure the teacher")
    force: bool = False


def split_texts(
    texts: list[str], extract: int, align: int, heldout: int, seed: int = 1
) -> tuple[list[str], list[str], list[str]]:
    """Disjoint ``(extract, align, held-out)`` documents of a seeded shuffle of ``texts``."""
    need = extract + align + heldout
    if len(texts) < need:
        raise SpliceError(
            f"{len(texts)} documents; extract {extract} + align {align} + held-out {heldout} "
            f"needs {need}",
            fix="pass more text or smaller --extract/--align/--heldout",
        )
    order = list(texts)
    random.Random(seed).shuffle(order)
    a, b = extract, extract + align
    return order[:a], order[a:b], order[b:need]


def read_texts(data: str) -> list[str]:
    """The documents of ``data``: WordNet noun glosses, or a file's ``text`` column."""
    if data == "glosses":
        from splice.data.tasks import wordnet_supersense

        return wordnet_supersense.read()[0]
    from splice.train.data import read_file

    return read_file(Path(data)).texts


def _pad_id(tok: Any) -> int:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad or 0)


def batches_of(tok: Any, texts: list[str], max_length: int, size: int) -> list[dict]:
    """Right-padded causal-LM batches (labels −100 on padding) of ``size`` documents."""
    from splice.train.batches import collate

    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    return [collate(list(range(i, min(i + size, len(ids)))), ids, None, _pad_id(tok))
            for i in range(0, len(ids), size)]  # fmt: skip


@torch.no_grad()
def perplexity(model: Any, tok: Any, texts: list[str], max_length: int = 48) -> float:
    """Token-weighted perplexity of ``model`` on ``texts`` (each truncated to ``max_length``)."""
    from contextlib import nullcontext

    from splice.train.hf import evaluate

    batches = batches_of(tok, texts, max_length, 8)
    return evaluate(model, batches, "causal-lm", nullcontext)["perplexity"]


def _train(params: list, loss_of, steps: int, lr: float) -> list[float]:
    from splice.train.loop import TrainStep, fit

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    return fit(TrainStep(lambda i: (loss_of(i), 1), opt, grad_clip=1.0), steps).history


def transfer(cfg: TransferConfig, log=print) -> dict[str, Any]:
    """Run one transfer (see the module docstring); returns the metrics it also writes."""
    from splice.convert.laten import check_same_tokenizer
    from splice.data.causal_lm import load_causal_lm
    from splice.io.atomic import atomic_dir

    if cfg.out.exists() and not cfg.force:
        raise SpliceError("the output exists", where=str(cfg.out), fix="pass --force or a new out")
    start = time.perf_counter()
    teacher, t_tok = load_causal_lm(cfg.teacher)
    student, s_tok = load_causal_lm(cfg.student)
    check_same_tokenizer(t_tok, s_tok)
    extract, align, test = split_texts(read_texts(cfg.data), cfg.extract, cfg.align,
                                       cfg.heldout, cfg.seed)  # fmt: skip
    metrics: dict[str, Any] = {"config": cfg.model_dump(mode="json")}
    if cfg.teacher_perplexity:
        metrics["teacher_perplexity"] = perplexity(teacher, t_tok, test, cfg.max_length)
    metrics["before_perplexity"] = perplexity(student, s_tok, test, cfg.max_length)
    log(f"{len(extract)} extract / {len(align)} align / {len(test)} held-out documents; "
        f"student perplexity {metrics['before_perplexity']:.2f}")  # fmt: skip
    batches = batches_of(s_tok, align, cfg.max_length, cfg.batch_size)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method]
    run = _laten if cfg.method == "laten" else _postpkt
    history = run(cfg, teacher, student, s_tok, extract, batches, lr)
    metrics["after_perplexity"] = perplexity(student, s_tok, test, cfg.max_length)
    metrics |= {"losses": history, "seconds": round(time.perf_counter() - start, 2)}
    with atomic_dir(cfg.out) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        s_tok.save_pretrained(tmp)
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _locate(teacher: Any, student: Any, tok: Any, text: str):
    """Attribution of both models on one document: its last token is the target."""
    from splice.convert.attribution import attribute

    ids = tok(text)["input_ids"]
    if len(ids) < 2:
        raise SpliceError(f"the first extract document has {len(ids)} token(s); need 2")
    probe, target = torch.tensor(ids[:-1]), ids[-1]
    return attribute(teacher, probe, target), attribute(student, probe, target)


def _laten(cfg, teacher, student, tok, extract, batches, lr) -> list[float]:
    from splice.convert.laten import LaTen

    t_scores, s_scores = _locate(teacher, student, tok, extract[0])
    laten = LaTen(teacher, student, t_scores, s_scores, rate=cfg.rate)
    laten.attach(student)
    loss = lambda i: laten.loss(student, batches[i % len(batches)], cfg.penalty)  # noqa: E731
    history = _train(list(laten.hyper.parameters()), loss, cfg.steps, lr)
    laten.merge(student)
    return history


def _postpkt(cfg, teacher, student, tok, extract, batches, lr) -> list[float]:
    from splice.convert.attribution import sensitivity, top_layers
    from splice.convert.postpkt import inject_postpkt, merge_postpkt

    t_scores, _ = _locate(teacher, student, tok, extract[0])
    n_t, n_s = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    names = [f"model.layers.{i}.{p}.weight" for i in range(n_t) for p in TARGETS]
    docs = batches_of(tok, extract, cfg.max_length, 1)
    scores = sensitivity(teacher, lambda m, b: m(**b).loss, docs, names)
    pairs = list(zip(top_layers(t_scores, n_s), range(n_s), strict=True))
    inject_postpkt(teacher, student, scores, pairs, TARGETS, rank=cfg.rank)
    lora = [p for p in student.parameters() if p.requires_grad]
    student.train()
    history = _train(lora, lambda i: student(**batches[i % len(batches)]).loss, cfg.steps, lr)
    student.eval()
    merge_postpkt(student)
    student.requires_grad_(True)
    return history
