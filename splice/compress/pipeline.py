"""The two post-training quantization pipelines (spec other.md §4.7).

* **light**: min/max quantization (per-channel weights, per-tensor inputs) → per-layer
  sensitivity → integer program → BN re-estimation.
* **advanced**: AdaQuant at every bit option → sensitivity → integer program → BN
  re-estimation → bias tuning (KL to the FP logits).

With a fixed ``bits`` there is no program: every layer gets ``bits`` (the first and last at
``ends_bits``), and advanced runs AdaQuant layer by layer, sequentially by default (inputs
re-captured from the partly quantized model on every batch). With a ``size`` target, the
variants of each layer are made in parallel mode (independent of the other layers' bits) and
the program picks one per layer. The caller supplies the data (``batches`` and a ``forward``),
the output loss, and ``steps``: the training loop that runs an optimisation problem.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from splice._memory import one_arena, return_freed_memory
from splice.compress.adaquant import adaquant_problem, init_input_range, layer_mse
from splice.compress.allocate import allocate, bops_cost, size_cost
from splice.compress.batchnorm import reestimate_bn
from splice.compress.bias import bias_parameters, bias_problem, kl_to_target
from splice.compress.capture import Forward, capture, execution_order
from splice.compress.config import LayerReport, QuantizeConfig, QuantizeReport
from splice.compress.lockstep import Lockstep
from splice.compress.profile import sensitivity
from splice.compress.qlayer import QuantLayer, quantizable, wrap
from splice.compress.resume import Checkpoint
from splice.compress.size import model_bits
from splice.compress.spill import Spill
from splice.errors import SpliceError

__all__ = [
    "LayerReport", "QuantizeConfig", "QuantizeReport", "QuantizeStopped", "Steps", "quantize",
    "quantize_sizes",
]  # fmt: skip

Steps = Callable[[Callable[[int], tuple[Tensor, int]], torch.optim.Optimizer, int], Sequence[float]]
"""Runs ``n`` optimizer steps of a problem (``splice.train.minimise``)."""
OutputLoss = Callable[[Tensor, Tensor], Tensor]


class QuantizeStopped(Exception):
    """Raised by :func:`quantize` / :func:`quantize_sizes` when their ``should_stop`` says so,
    after a layer (kept in the checkpoint, if one is given) and before the next."""


class _Run:
    """One quantization run's shared state: the FP reference, the model, the data."""

    def __init__(self, model, batches, forward, loss_fn, steps, cfg, progress, should_stop):
        return_freed_memory()  # a layer's cache is freed for the next one's: give it back
        one_arena()  # the paused forwards' threads take turns: one arena, not one each
        self.fp = model.eval().requires_grad_(False)
        self.q = copy.deepcopy(self.fp)
        self.batches, self.forward, self.loss_fn = list(batches), forward, loss_fn
        self.steps, self.cfg, self.say = steps, cfg, progress or (lambda msg: None)
        self.should_stop: Callable[[], bool] | None = should_stop
        names = quantizable(self.fp, cfg.exclude)
        if not names:
            raise SpliceError(
                "the model has no quantizable layer (Linear, Conv1d, Conv2d, Embedding)",
                fix="pass a model with such layers, or shorten the exclude list",
            )
        self.order = _order(self.fp, names, self.batches[0], forward)
        # sequential fixed bits: the float layers' outputs go to disk in the targets' pass
        data = cfg.a_bits is not None or (cfg.pipeline == "advanced" and cfg.adaquant.iters > 0)
        seq = cfg.bits is not None and cfg.mode == "sequential" and data
        self.spill = Spill(self.order, cfg.spill_dir) if seq else None
        with torch.no_grad():
            self.targets = (
                self.spill.run(self.fp, self.batches, forward)
                if self.spill
                else [forward(self.fp, b).detach() for b in self.batches]
            )
        self.profile_set = list(range(min(cfg.profile_batches, len(self.batches))))

    def layer_done(self, i: int, n: int) -> None:
        """After layer ``i`` of ``n`` (and its checkpoint): stop if ``should_stop`` says so."""
        if self.should_stop is not None and self.should_stop():
            raise QuantizeStopped(f"stopped after layer {i + 1}/{n}")

    def fixed_bits(self, i: int, bits: int) -> int:
        cfg = self.cfg
        return cfg.ends_bits if cfg.ends_bits and i in (0, len(self.order) - 1) else bits

    @torch.no_grad()
    def loss(self, model: nn.Module, subset: Sequence[int] | None = None) -> float:
        idx = range(len(self.batches)) if subset is None else subset
        losses = [
            float(self.loss_fn(self.forward(model, self.batches[i]), self.targets[i])) for i in idx
        ]
        return sum(losses) / len(losses)

    def activations(
        self, name: str, fp_steps: Lockstep | None, q_steps: Lockstep | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The layer's inputs and its FP outputs. Parallel: both from the float forwards
        paused at the layer (``fp_steps``). Sequential: inputs from the quantized forwards
        paused before it (``q_steps``), outputs from the spill. Fresh forwards where the
        paused ones are not at the layer."""
        if q_steps is None:
            got = None if fp_steps is None else fp_steps.take(name)
            return got or capture(self.fp, name, self.batches, self.forward)
        at = q_steps.take(name)
        xs = at[0] if at else capture(self.q, name, self.batches, self.forward, outputs=False)[0]
        ys = [] if self.spill is None else self.spill.outputs(name)
        if len(ys) != len(xs):
            ys = capture(self.fp, name, self.batches, self.forward, inputs=False)[1]
        return xs, ys

    def calibrate(
        self,
        layer: QuantLayer,
        name: str,
        steps: tuple[Lockstep | None, Lockstep | None],
        report: LayerReport,
        memo: dict[str, Any] | None = None,
    ) -> None:
        """Min/max init, then AdaQuant for the advanced pipeline; fills the layer's report.
        A weights-only layer of the light pipeline needs no data (nor its MSE measured).
        ``steps``: the paused FP forwards (parallel) or quantized ones (sequential)
        (:meth:`activations`); ``memo`` keeps the activations for the layer's next variant."""
        start = time.perf_counter()
        if layer.aq is None and not (self.cfg.pipeline == "advanced" and self.cfg.adaquant.iters):
            layer.requires_grad_(False)  # weights only, rounded to nearest: no data needed
            report.seconds += time.perf_counter() - start
            return
        memo = {} if memo is None else memo
        if "xy" not in memo:
            memo["xy"] = self.activations(name, *steps)
        xs, ys = memo["xy"]
        init_input_range(layer, xs)
        relu = name in self.cfg.relu
        report.mse_before = layer_mse(layer, xs, ys, relu)
        if self.cfg.pipeline == "advanced" and self.cfg.adaquant.iters:
            loss, opt = adaquant_problem(layer, xs, ys, self.cfg.adaquant, relu)
            self.steps(loss, opt, self.cfg.adaquant.iters)
            report.mse_after = layer_mse(layer, xs, ys, relu)
        layer.requires_grad_(False)
        report.seconds += time.perf_counter() - start


def _order(model: nn.Module, names: list[str], batch: Any, forward: Forward) -> list[str]:
    try:
        order = execution_order(model, names, batch, forward)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpliceError(
            f"the calibration data does not fit the model: {first}",
            fix="pass calibration batches of the modality and shape the model takes",
        ) from None
    return order + [n for n in names if n not in order]


def quantize(
    model: nn.Module,
    batches: Sequence[Any],
    forward: Forward,
    steps: Steps,
    cfg: QuantizeConfig,
    *,
    loss_fn: OutputLoss = kl_to_target,
    progress: Callable[[str], None] | None = None,
    checkpoint: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[nn.Module, QuantizeReport]:
    """A quantized copy of ``model`` (fake-quant :class:`QuantLayer`s; ``model`` is untouched)
    and its report. ``forward(model, batch)`` gives the output ``loss_fn(output, fp_output)``
    compares (KL of logits by default). ``checkpoint``: a directory where each calibrated
    layer (and a size target's sensitivity table) is kept as it is made, and loaded from by
    a later call with the same config and data (:mod:`splice.compress.resume`): a stopped
    run goes on where it stopped, with the same result; ``seconds`` then counts every call's.
    ``should_stop``: asked after each layer (after its checkpoint is written, the last layer
    included); True raises :class:`QuantizeStopped` (to keep to a time budget, then go on)."""
    start = time.perf_counter()
    run = _Run(model, batches, forward, loss_fn, steps, cfg, progress, should_stop)
    report = QuantizeReport()
    ckpt = _checkpoint(run, checkpoint)
    if cfg.bits is not None:
        _fixed(run, report, ckpt)
    else:
        _pick(run, _profile(run, report, cfg.size, ckpt), cfg.size)
    return _finish(run, report, start - (ckpt.prior if ckpt else 0.0))


def quantize_sizes(
    model: nn.Module,
    batches: Sequence[Any],
    forward: Forward,
    steps: Steps,
    cfg: QuantizeConfig,
    sizes: Sequence[float],
    *,
    loss_fn: OutputLoss = kl_to_target,
    progress: Callable[[str], None] | None = None,
    checkpoint: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[float, nn.Module, QuantizeReport]]:
    """:func:`quantize` at each size target of ``sizes`` (``cfg.size`` is ignored), sharing
    one set of per-layer variants and one sensitivity table: only the integer program, BN
    re-estimation and bias tuning run per size. Yields ``(size, model, report)``; a report's
    ``seconds`` counts the shared part once per size (what a single run would cost).
    ``checkpoint``: as in :func:`quantize` (each layer's variants and the table); the shared
    part's seconds then count every call's; ``should_stop`` as in :func:`quantize` (asked
    after each layer's variants)."""
    start = time.perf_counter()
    run = _Run(model, batches, forward, loss_fn, steps, cfg, progress, should_stop)
    shared = QuantizeReport()
    ckpt = _checkpoint(run, checkpoint)
    profile = _profile(run, shared, min(sizes), ckpt)
    base = run.q
    shared_s = ckpt.seconds if ckpt else time.perf_counter() - start
    for size in sizes:
        begin = time.perf_counter() - shared_s
        run.q = copy.deepcopy(base)
        _pick(run, profile, size)
        yield size, *_finish(run, copy.deepcopy(shared), begin)


def _checkpoint(run: _Run, path: str | Path | None) -> Checkpoint | None:
    if path is None:
        return None
    what = {"config": run.cfg.model_dump(mode="json", exclude={"size"}), "layers": run.order}
    return Checkpoint(path, {**what, "batches": len(run.batches)})


def _finish(run: _Run, report: QuantizeReport, start: float) -> tuple[nn.Module, QuantizeReport]:
    """BN re-estimation, bias tuning, the losses and the sizes of ``run.q``."""
    cfg, forward, steps = run.cfg, run.forward, run.steps
    report.loss["quantized"] = run.loss(run.q)
    run.say(f"calibration loss after quantization: {report.loss['quantized']:.5g}")
    if cfg.bn and reestimate_bn(run.q, run.batches, forward, run.fp):
        report.loss["bn"] = run.loss(run.q)
        run.say(f"batch-norm re-estimated: loss {report.loss['bn']:.5g}")
    last = run.order[-1]
    if cfg.pipeline == "advanced" and cfg.bias_steps and bias_parameters(run.q, [last]):
        loss, opt = bias_problem(
            run.q, run.batches, run.targets, forward, exclude=[last], lr=cfg.bias_lr
        )
        steps(loss, opt, cfg.bias_steps)
        report.loss["bias"] = run.loss(run.q)
        run.say(f"biases tuned: loss {report.loss['bias']:.5g}")
    run.q.requires_grad_(False).eval()
    for rep in report.layers:
        rep.bits = run.q.get_submodule(rep.name).w_bits
    report.fp32_bits, report.bits = (
        32 * sum(p.numel() for p in run.fp.parameters()),
        model_bits(run.q),
    )
    report.seconds = time.perf_counter() - start
    return run.q, report


def _fixed(run: _Run, report: QuantizeReport, ckpt: Checkpoint | None = None) -> None:
    cfg, n = run.cfg, len(run.order)
    layers = [wrap(run.q, name, run.fixed_bits(i, cfg.bits), cfg.a_bits) for i, name in
              enumerate(run.order)]  # fmt: skip
    seq = cfg.mode == "sequential"
    fp_steps = None if seq else Lockstep(run.fp, run.order, run.batches, run.forward, "after")
    q_steps = Lockstep(run.q, run.order, run.batches, run.forward) if seq else None
    try:
        for i, (name, layer) in enumerate(zip(run.order, layers, strict=True)):
            saved = ckpt.layer(i, name) if ckpt else None
            if saved is None:
                rep = LayerReport(name, layer.w_bits, layer.a_bits, layer.base.weight.numel())
                run.calibrate(layer, name, (fp_steps, q_steps), rep)
                if ckpt:
                    ckpt.save_layer(i, name, {layer.w_bits: layer.state()}, rep)
            else:  # the paused forwards run it as it was calibrated
                layer.load_state(saved[0][layer.w_bits])
                layer.requires_grad_(False)
                rep = LayerReport(**saved[1])
            for steps in (fp_steps, q_steps):
                if steps is not None:
                    steps.release(name)
            report.layers.append(rep)
            mse = "" if rep.mse_before is None else f" mse {rep.mse_before:.3g}"
            mse += "" if rep.mse_after is None else f" → {rep.mse_after:.3g}"
            run.say(f"[{i + 1}/{n}] {name} W{layer.w_bits}:{mse} ({rep.seconds:.1f} s"
                    f"{', saved before' if saved else ''})")  # fmt: skip
            run.layer_done(i, n)
    finally:
        for closing in (fp_steps, q_steps, run.spill):
            if closing is not None:
                closing.close()


@dataclass
class _Profile:
    """The shared part of a size-targeted run: each layer's variants and the ΔL table."""

    variants: dict[str, dict[int, dict]]
    free: list[str]
    options: list[int]
    table: np.ndarray


def _profile(
    run: _Run, report: QuantizeReport, size: float, ckpt: Checkpoint | None = None
) -> _Profile:
    cfg, n = run.cfg, len(run.order)
    options = sorted({*cfg.options, cfg.base_bits})
    variants: dict[str, dict[int, dict]] = {}
    pins = {name: run.fixed_bits(i, -1) for i, name in enumerate(run.order)}
    fixed = {name: bits for name, bits in pins.items() if bits != -1}
    free = [name for name in run.order if name not in fixed]
    for name in run.order:
        wrap(run.q, name, fixed.get(name, cfg.base_bits), cfg.a_bits)
    _program(run, free, fixed, options, np.zeros((len(free), len(options))), size)  # reachable?
    with Lockstep(run.fp, run.order, run.batches, run.forward, "after") as fp_steps:
        for i, name in enumerate(run.order):
            choices = [fixed[name]] if name in fixed else options
            saved = ckpt.layer(i, name) if ckpt else None
            if saved is None:
                rep = _variants(run, name, choices, fp_steps, variants)
                if ckpt:
                    ckpt.save_layer(i, name, variants[name], rep)
            else:
                variants[name], rep = saved[0], LayerReport(**saved[1])
            fp_steps.release(name)
            report.layers.append(rep)
            run.say(f"[{i + 1}/{n}] {name}: variants W{'/W'.join(map(str, choices))} "
                    f"({rep.seconds:.1f} s{', saved before' if saved else ''})")  # fmt: skip
            run.layer_done(i, n)
    for name, bits in fixed.items():
        run.q.get_submodule(name).load_state(variants[name][bits])
    table = np.zeros((0, len(options)))
    if free:
        saved_table = ckpt.table() if ckpt else None
        if saved_table is None:
            table, base = sensitivity(
                run.q, {k: variants[k] for k in free}, options, cfg.base_bits,
                lambda m: run.loss(m, run.profile_set),
                lambda i, name: run.say(f"sensitivity [{i + 1}/{len(free)}] {name}"),
            )  # fmt: skip
            if ckpt:
                ckpt.save_table(table, base)
        else:
            table, base = saved_table
        report.loss["base"] = base
    return _Profile(variants, free, options, table)


def _variants(
    run: _Run, name: str, choices: list[int], fp_steps: Lockstep, out: dict[str, dict[int, dict]]
) -> LayerReport:
    """Layer ``name`` calibrated at each of ``choices`` from the same start (into ``out``)."""
    layer = run.q.get_submodule(name)
    rep = LayerReport(name, choices[0], layer.a_bits, layer.base.weight.numel())
    original, memo = layer.state(), {}
    for bits in choices:
        layer.load_state(original)
        layer.set_bits(bits)
        run.calibrate(layer, name, (fp_steps, None), rep, memo)
        out.setdefault(name, {})[bits] = layer.state()
    return rep


def _pick(run: _Run, prof: _Profile, size: float) -> None:
    """Loads the program's choice at ``size`` into ``run.q``."""
    fixed = {n: run.q.get_submodule(n).w_bits for n in run.order if n not in prof.free}
    choice = _program(run, prof.free, fixed, prof.options, prof.table, size)
    for name in prof.free:
        bits = prof.options[choice[name]]
        run.q.get_submodule(name).load_state(prof.variants[name][bits])


def _program(
    run: _Run,
    free: list[str],
    fixed: dict[str, int],
    options: list[int],
    table: np.ndarray,
    size: float,
) -> dict[str, int]:
    """Option index per free layer, within the size (or BOPs) budget ``size``."""
    cfg = run.cfg
    layers = {name: run.q.get_submodule(name) for name in run.order}
    if cfg.cost == "size":
        total = 32 * sum(p.numel() for p in run.fp.parameters())
        budget = size * total - model_bits(run.q, exclude_weights=True)
        budget -= sum(layers[n].base.weight.numel() * b for n, b in fixed.items())
        cost = size_cost([layers[n].base.weight.numel() for n in free], options)
        scale, unit = total, " of the FP32 size"
    else:
        macs = _macs(run, free + list(fixed))
        total = sum(macs.values()) * 32 * 32
        budget = size * total - sum(macs[n] * b * (cfg.a_bits or 32) for n, b in fixed.items())
        cost = bops_cost([macs[n] for n in free], options, cfg.a_bits)
        scale, unit = total, " of the FP32 BOPs"
    if not free:
        return {}
    try:
        pick = allocate(table, cost, budget)
    except SpliceError:
        least = (cost.min(1).sum() + (scale * size - budget)) / scale
        raise SpliceError(
            f"size {size} is below the smallest reachable {least:.4f}{unit} with bits {options}",
            fix=f"use a size ≥ {least:.4f} or add smaller bit options",
        ) from None
    return dict(zip(free, (int(k) for k in pick), strict=True))


@torch.no_grad()
def _macs(run: _Run, names: list[str]) -> dict[str, int]:
    """Multiply-accumulates per sample of each layer on the first calibration batch."""
    out = {}
    for name in names:
        layer = run.fp.get_submodule(name)
        _, ys = capture(run.fp, name, run.batches[:1], run.forward, inputs=False)
        y = ys[0]
        # an output element costs one weight row (C_in/groups·k for a conv); a lookup none
        per_out = 0 if isinstance(layer, nn.Embedding) else layer.weight[0].numel()
        out[name] = int(y.numel() // y.shape[0] * per_out)
    return out
