"""Score a causal LM on a generation task: exact match of greedy answers, answer log-likelihood.

One batched pass per batch of prompts (left-padded, length-sorted): the prompts run once, their
KV cache is repeated for two or three row groups that then decode together step by step:

- ``free``: unconstrained greedy decoding (up to ``max_new`` tokens or the end token);
- ``label`` (tasks with a label set): greedy decoding constrained to the labels
  (:class:`splice.decode.constrained.AnswerTrie`: only label strings can come out);
- ``gold``: the reference answer fed token by token (teacher forcing), summing its
  log-probabilities — the held-out answer log-likelihood, end token included.

Exact match compares :func:`splice.data.llm_tasks.normalize`-d strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from splice.data.llm_tasks import GenData, GenSplit, normalize, render
from splice.decode.constrained import AnswerTrie
from splice.decode.lm import common_prefix

__all__ = ["Encoded", "encode", "prompt_pass", "score", "shared_prefix"]


@dataclass(frozen=True)
class Encoded:
    """A split as token ids: the prompts' common ``prefix`` (the instruction, run once per
    batch), each prompt's rest, and each answer followed by the end token."""

    prefix: list[int]
    prompts: list[list[int]]
    answers: list[list[int]]
    texts: list[str]  # the answers as strings
    trie: AnswerTrie | None  # the label set, for constrained decoding
    end: int

    def __len__(self) -> int:
        return len(self.texts)


def _end_id(tok: Any) -> int:
    end = tok.eos_token_id
    if end is None:
        raise ValueError("the tokenizer has no end-of-sequence token")
    return int(end)


def encode(tok: Any, data: GenData, split: str) -> Encoded:
    """Token ids of one split of ``data`` (``"train"``, ``"val"`` or ``"test"``)."""
    sp: GenSplit = getattr(data, split)
    end = _end_id(tok)
    instruction = data.task.instruction
    prompts = [
        tok(render(tok, instruction, x), add_special_tokens=False)["input_ids"] for x in sp.inputs
    ]
    ids = {a: tok(a, add_special_tokens=False)["input_ids"] for a in set(sp.answers)}
    trie = None
    if data.task.labels is not None:
        labels = [tok(a, add_special_tokens=False)["input_ids"] for a in data.task.labels]
        trie = AnswerTrie(labels, end)
    answers = [[*ids[a], end] for a in sp.answers]
    n = shared_prefix(prompts)
    return Encoded(prompts[0][:n], [p[n:] for p in prompts], answers, list(sp.answers), trie, end)


def shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``seqs`` that leaves each at least one token."""
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = min(n, common_prefix(seqs[0], s))
    return max(n, 0)


def prompt_pass(
    model: nn.Module, prefix: Sequence[int], rest: Sequence[Sequence[int]], pad: int, **kw: Any
) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """Run ``prefix`` once, repeat its cache for every row, then the rows' ``rest`` (left
    padded between prefix and rest; positions skip the padding). Returns the model output,
    the cache, the attention mask and each row's last position. Gradients flow through the
    shared prefix (training uses it too)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = _left_padded(rest, pad)
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache()
    n = len(prefix)
    if n:
        prefix_ids = torch.tensor([list(prefix)], device=device)
        model.get_decoder()(input_ids=prefix_ids, cache=cache, use_cache=True)
        cache.batch_repeat_interleave(len(rest))
    mask = torch.cat([mask.new_ones(len(rest), n), mask], 1)
    pos = (mask.cumsum(-1) - 1)[:, n:].clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, **kw
    )
    return out, cache, mask, pos[:, -1]


def _left_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(list(s))
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.inference_mode()
def _decode_batch(
    model: nn.Module, enc: Encoded, idx: Sequence[int], max_new: int, pad: int
) -> tuple[list[list[int]], list[list[int]] | None, list[float]]:
    """Free and constrained generations (token ids, end token dropped) and the gold answers'
    log-likelihood sums of the examples ``idx``."""
    device = next(model.parameters()).device
    kinds = ["free", "label", "gold"] if enc.trie is not None else ["free", "gold"]
    g = len(kinds)
    out, cache, mask, last = prompt_pass(
        model, enc.prefix, [enc.prompts[i] for i in idx], pad, logits_to_keep=1
    )
    cache.batch_repeat_interleave(g)  # row r belongs to example r // g, kind r % g
    logits = out.logits[:, -1].float().repeat_interleave(g, 0)
    mask, last = mask.repeat_interleave(g, 0), last.repeat_interleave(g)
    rows = len(idx) * g
    gen: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    loglik = [0.0] * len(idx)
    free_limit = max_new if enc.trie is None else min(max_new, enc.trie.depth + 2)
    steps = max(free_limit, *(len(enc.answers[i]) for i in idx))
    for t in range(steps):
        logp = torch.log_softmax(logits, -1)
        best = logp.argmax(-1).tolist()
        nxt = [pad] * rows
        for r in range(rows):
            if done[r]:
                continue
            b, kind = divmod(r, g)[0], kinds[r % g]
            if kind == "gold":
                gold = enc.answers[idx[b]]
                nxt[r] = gold[t]
                loglik[b] += float(logp[r, gold[t]])
                done[r] = t + 1 >= len(gold)
                continue
            if kind == "label":
                allowed = enc.trie.allowed(gen[r])  # type: ignore[union-attr]
                nxt[r] = allowed[int(logp[r, allowed].argmax())]
            else:
                nxt[r] = best[r]
            gen[r].append(nxt[r])
            done[r] = nxt[r] == enc.end or (kind == "free" and len(gen[r]) >= free_limit)
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
        last = last + 1
        out = model(
            input_ids=torch.tensor(nxt, device=device)[:, None],
            attention_mask=mask,
            position_ids=last[:, None],
            cache=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1].float()

    def strip(seq: list[int]) -> list[int]:
        return seq[: seq.index(enc.end)] if enc.end in seq else seq

    free = [strip(gen[b * g]) for b in range(len(idx))]
    label = [strip(gen[b * g + 1]) for b in range(len(idx))] if enc.trie is not None else None
    return free, label, loglik


def score(
    model: nn.Module,
    tok: Any,
    enc: Encoded,
    batch_size: int = 16,
    max_new: int = 8,
) -> dict[str, Any]:
    """``em`` (free greedy), ``em_label`` (constrained; None without a label set), ``loglik``
    (mean per-token answer log-likelihood, nats) and the first free answers (``samples``)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else enc.end
    order = sorted(range(len(enc)), key=lambda i: len(enc.prompts[i]))
    free: dict[int, str] = {}
    label: dict[int, str] = {}
    ll: dict[int, float] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        f, c, lik = _decode_batch(model, enc, idx, max_new, pad)
        for j, i in enumerate(idx):
            free[i] = tok.decode(f[j], skip_special_tokens=True)
            if c is not None:
                label[i] = tok.decode(c[j], skip_special_tokens=True)
            ll[i] = lik[j] / len(enc.answers[i])
    gold = [normalize(a) for a in enc.texts]
    n = len(enc)
    em = float(np.mean([normalize(free[i]) == gold[i] for i in range(n)]))
    em_label = float(np.mean([normalize(label[i]) == gold[i] for i in range(n)])) if label else None
    return {
        "em": em,
        "em_label": em_label,
        "loglik": float(np.mean([ll[i] for i in range(n)])),
        "samples": [[free[i], enc.texts[i]] for i in range(min(3, n))],
    }
