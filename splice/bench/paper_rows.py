"""The paper protocol's rows that are not one merged dense model, and its transductive rows.

- **EMR-Merging** (:mod:`splice.merge.fusion.emr`): one unified task vector plus a packed mask
  and a rescaler per task; each task is evaluated with *its* rebuilt model. Extra storage: the
  masks and rescalers, counted in float32-parameter equivalents.
- **WEMoE** (:mod:`splice.merge.fusion.wemoe`): the feed-forward blocks become routed mixtures
  of the task vectors; routers trained by cross-entropy on the validation labels (inductive)
  or by the paper's entropy on the unlabeled *test* inputs (transductive). Extra parameters:
  the routers and the stored task vectors; evaluation time relative to the dense model.
- **Transductive learned merges** (AdaMerging, Concrete): the method's own objective on the
  unlabeled test inputs (the papers' test-time adaptation), never their labels.

Each function returns ``(accuracy per task, extras, seconds)``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from splice.bench.finetune import apply_deltas
from splice.bench.suite import Suite, _accuracy, _features

__all__ = ["FFN_PATTERNS", "emr_row", "task_vectors", "transductive_row", "wemoe_row"]

# The feed-forward blocks WEMoE routes, per backbone: BERT's two halves (``intermediate`` and
# the layer-level ``output``; ``attention.output`` does not match). EfficientNet has none.
FFN_PATTERNS = {"text": r"layer\.\d+\.(intermediate|output)$", "image": r"(^|\.)(mlp|ffn)$"}

Row = tuple[dict[str, float], dict[str, Any], float]


def task_vectors(suite: Suite) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """The base tensors the fine-tunes changed and each task's dense ``τ_t`` over them."""
    names = sorted({n for r in suite.runs.values() for n in r.deltas})
    state = suite.encoder.module.state_dict()
    base = {n: state[n] for n in names}
    taus = {}
    for t, run in suite.runs.items():
        own = {**base, **apply_deltas(base, run.deltas)}
        taus[t] = {n: (own[n].double() - base[n].double()).to(base[n].dtype) for n in names}
    return base, taus


def _module_acc(suite: Suite, module: torch.nn.Module, task: str) -> float:
    feats = _features(suite.encoder, suite.test[task], None, suite.batch_size, module)
    return _accuracy(suite.runs[task].head, feats, suite.data[task].test.y)


def emr_row(suite: Suite, repair_bn: bool = False) -> Row:
    """EMR-Merging: each task scored with its rebuilt model ``θ₀ + λ_t·M_t ⊙ τ_uni``; with
    ``repair_bn``, that model's batch norm repaired to its task's fine-tune
    (:mod:`splice.bench.bn_repair`; a backbone without batch norm is refused)."""
    from splice.bench.bn_repair import NO_BN, BNRepair, has_batchnorm
    from splice.errors import SpliceError
    from splice.merge.fusion.emr import emr_merge

    if repair_bn and not has_batchnorm(suite.encoder.module):
        raise SpliceError(NO_BN)
    base, taus = task_vectors(suite)
    start = time.perf_counter()
    emr = emr_merge(taus)
    merge_s = time.perf_counter() - start
    repair = None
    if repair_bn:  # each task's fine-tune is its model's reference
        own = {t: {n: base[n] + tau[n] for n in base} for t, tau in taus.items()}
        repair = BNRepair(suite, own)
    acc = {}
    for t in suite.data:
        weights = emr.weights(base, t)
        acc[t] = suite.acc(repair(weights, t) if repair else weights, tasks=[t])[t]
    params = emr.extra_params()
    if repair is not None:  # each task's model keeps its own BN running mean and variance
        params += len(acc) * repair.buffer_count()
    return acc, {"extra_params": params, "eval_time_x": 1.0}, merge_s


def wemoe_row(
    suite: Suite,
    objective: str,
    *,
    steps: int,
    lr: float,
    batch_size: int = 16,
    init_lambda: float = 0.3,
    seed: int = 0,
) -> Row:
    """WEMoE with routers trained by ``objective``: ``"ce"`` on the validation labels or
    ``"entropy"`` on the unlabeled test inputs (transductive).

    Raises:
        SpliceError: the backbone has no feed-forward blocks to route.
    """
    from splice.merge.fusion.wemoe import cost, upcycle
    from splice.train.wemoe import train_routers

    enc = suite.encoder
    _, taus = task_vectors(suite)
    pattern = FFN_PATTERNS.get(enc.modality, FFN_PATTERNS["image"])
    start = time.perf_counter()
    moe = upcycle(enc.module, taus, init_lambda=init_lambda, pattern=pattern)
    moe.eval()
    split = "val" if objective == "ce" else "test"
    sets = suite.val if split == "val" else suite.test
    tasks = list(suite.data)
    offsets = dict(zip(tasks, np.cumsum([0] + [len(sets[t]) for t in tasks]), strict=False))
    inputs = {t: torch.arange(offsets[t], offsets[t] + len(sets[t])) for t in tasks}
    device = next(enc.module.parameters()).device

    def forward(module: torch.nn.Module, idx: Tensor) -> Tensor:
        task = max((t for t in tasks if offsets[t] <= int(idx[0])), key=offsets.__getitem__)
        local = idx.numpy() - offsets[task]
        return enc.features(sets[task].batch(local, device), module=module)

    labels = None
    if objective == "ce":
        labels = {t: torch.as_tensor(suite.data[t].val.y, dtype=torch.long) for t in tasks}
    losses = train_routers(
        moe,
        inputs,
        {t: suite.runs[t].head for t in tasks},
        labels=labels,
        objective=objective,  # type: ignore[arg-type]
        forward=forward,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
    )
    merge_s = time.perf_counter() - start
    t0 = time.perf_counter()
    with torch.inference_mode():
        acc = {t: _module_acc(suite, moe, t) for t in tasks}
    routed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for t in tasks:
            _features(enc, suite.test[t], None, suite.batch_size)
    dense_s = time.perf_counter() - t0
    extra = {
        "extra_params": cost(moe)["extra"],
        "eval_time_x": routed_s / max(dense_s, 1e-9),
        "loss": [losses[0], losses[-1]] if losses else [],
    }
    return acc, extra, merge_s


def transductive_row(suite: Suite, spec: Any, seed: int) -> Row:
    """A learned merge fitted on the unlabeled *test* inputs (its own objective)."""
    from splice.bench.rows import learn

    weights, secs = learn(suite, spec, seed, split="test")
    return suite.acc(weights), {}, secs
