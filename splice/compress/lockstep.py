"""Lockstep capture: every calibration batch's forward runs once, paused at each watched layer
(spec other.md §4.9 a).

Capturing layer ``ℓ`` with a fresh forward (:func:`~splice.compress.capture.capture`) costs the
network up to ``ℓ``, so a pass over ``L`` layers in order costs about ``L/2`` full forwards
of the calibration set, on the quantized model and again on the float one (sequential
AdaQuant, BN re-estimation against the float model). Here each batch's forward runs in its own
thread and waits at a hook of every watched layer; :meth:`Lockstep.take` returns that layer's
inputs (``before``: the layer has not run yet, so a sequential caller quantizes it first) or
inputs and outputs (``after``) over all batches, and :meth:`Lockstep.release` lets the forwards
go on to the next watched layer: one forward per batch in all. One thread runs at a time (a
handoff, not parallelism). A paused forward holds its live tensors, about one layer's inputs
(which the cache holds anyway) plus a skip connection's.

A layer reached by no forward, or by forwards in another order than the caller's, gives
``None``: the caller captures it with fresh forwards instead. Only the first call of a layer
in a forward pauses (as :func:`capture` records only the first).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.compress.capture import Forward

__all__ = ["Lockstep"]

_local = threading.local()


class _Abort(Exception):
    """Raised in a paused forward by :meth:`Lockstep.close`."""


class _Worker:
    """One batch's forward in a thread, paused at hooks."""

    def __init__(self, owner: Lockstep, batch: Any) -> None:
        self.owner, self.batch = owner, batch
        self.go, self.paused = threading.Event(), threading.Event()
        self.at: str | None = None
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.done, self.error = False, None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        _local.worker = self
        try:
            with torch.no_grad():
                self.owner.forward(self.owner.model, self.batch)
        except _Abort:
            pass
        except BaseException as e:  # re-raised in the caller's thread
            self.error = e
        finally:
            self.done, self.at, self.x, self.y = True, None, None, None
            self.paused.set()

    def pause(self, name: str, x: Tensor, y: Tensor | None) -> None:
        """In the worker's thread: wait at ``name`` until resumed."""
        self.at, self.x, self.y = name, x, y
        self.paused.set()
        self.go.wait()
        self.go.clear()
        if self.owner.aborting:
            raise _Abort

    def resume(self) -> None:
        """In the caller's thread: run the forward to its next pause (or its end)."""
        self.at, self.x, self.y = None, None, None
        self.paused.clear()
        if self.thread.is_alive():
            self.go.set()
        else:
            self.thread.start()
        self.paused.wait()
        if self.error is not None:
            raise self.error


class Lockstep:
    """Forwards of ``model`` over ``batches`` that stop at the layers ``names``, ``before``
    each runs (its inputs) or ``after`` (inputs and outputs). Use as a context manager (or
    call :meth:`close`): it removes its hooks and ends the paused forwards."""

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        batches: Sequence[Any],
        forward: Forward,
        where: Literal["before", "after"] = "before",
    ) -> None:
        self.model, self.forward = model, forward
        self.released: set[str] = set()
        self.aborting = False
        self.workers = [_Worker(self, b) for b in batches]
        self.started = False
        self.handles = []
        for name in names:
            module = model.get_submodule(name)
            if where == "before":
                hook = module.register_forward_pre_hook(self._hook(name))
            else:
                hook = module.register_forward_hook(self._hook(name))
            self.handles.append(hook)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor | None = None) -> None:
            worker = getattr(_local, "worker", None)
            if worker is None or worker.owner is not self or name in self.released:
                return  # another thread's forward (a fresh capture), or a layer done
            worker.pause(name, args[0].detach(), None if out is None else out.detach())

        return hook

    def take(self, name: str) -> tuple[list[Tensor], list[Tensor]] | None:
        """``(inputs, outputs)`` of layer ``name``, one tensor per batch (``outputs`` empty
        ``before``), or None where some forward is not paused at ``name``."""
        if not self.started:
            self.started = True
            for w in self.workers:
                w.resume()
        for w in self.workers:
            while not w.done and w.at in self.released:
                w.resume()
        if not all(w.at == name for w in self.workers):
            return None
        xs = [w.x for w in self.workers]
        ys = [w.y for w in self.workers if w.y is not None]
        return xs, ys  # type: ignore[return-value]

    def release(self, name: str) -> None:
        """Layer ``name`` is done: forwards paused there go on at the next :meth:`take`."""
        self.released.add(name)

    def close(self) -> None:
        self.aborting = True
        for h in self.handles:
            h.remove()
        for w in self.workers:
            if w.thread.is_alive() and not w.done:
                w.error = None
                w.go.set()
                w.thread.join()

    def __enter__(self) -> Lockstep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
