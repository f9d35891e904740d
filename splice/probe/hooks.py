"""Capture, add to, or replace the output of named blocks — in prefill and cached decoding.

:class:`Hooks` is a context manager over one model; every hook it registers is removed when
the ``with`` block ends, also on an exception, so no hook outlives its analysis::

    with Hooks(model) as h:
        states = h.capture([3, 7])              # block outputs, per forward call
        h.add(5, delta, positions="last")       # steer block 5's output at the last position
        model(**batch)
    states[7]                                   # [B, T, d]: hidden_states[8] of the run

Positions are *absolute* token indices (the same index in a full forward and in cached
decoding): a block that receives ``position_ids`` (every Hugging Face decoder) is read from
them, otherwise a call's positions are ``0 … T-1``, which is exact without a KV cache
(encoders, training). ``"last"`` is the last position of every forward call: the last prompt
token in prefill and each new token while decoding (other.md §7.2's ASA convention).
Operations on one block run in the order they were added: a capture added after an ``add``
sees the perturbed output. A capture of the last block is its raw output: Hugging Face
decoders report ``hidden_states[-1]`` after the final norm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from splice.probe.blocks import blocks, check_layers

__all__ = ["Capture", "Hooks", "Positions", "Replace", "select"]

Positions = Literal["all", "last"] | Sequence[int] | Tensor
"""``"all"``, ``"last"``, absolute indices, or a bool mask ``[B, L]`` over absolute positions."""

Replace = Callable[[Tensor, Tensor], Tensor]
"""``(hidden [B, T, d], positions [B, T]) → new hidden [B, T, d]``."""


class Capture:
    """Block outputs recorded by :meth:`Hooks.capture`: ``cap[layer]`` is every call's output
    concatenated along the sequence (a prefill and its decoding steps form one sequence)."""

    def __init__(self, layers: list[int]) -> None:
        self.calls: dict[int, list[Tensor]] = {layer: [] for layer in layers}

    def __getitem__(self, layer: int) -> Tensor:
        calls = self.calls[layer]
        if not calls:
            raise KeyError(f"block {layer} has not run since the capture began")
        return calls[0] if len(calls) == 1 else torch.cat(calls, dim=1)

    def clear(self) -> None:
        """Forget what was recorded (between independent forward passes)."""
        for calls in self.calls.values():
            calls.clear()


def select(positions: Positions, pos: Tensor) -> Tensor:
    """The bool mask ``[B, T]`` of the call positions ``pos`` that ``positions`` names."""
    if isinstance(positions, str):
        if positions == "all":
            return torch.ones_like(pos, dtype=torch.bool)
        if positions == "last":
            mask = torch.zeros_like(pos, dtype=torch.bool)
            mask[:, -1] = True
            return mask
        raise ValueError(f"positions {positions!r}: use 'all', 'last', indices or a bool mask")
    wanted = torch.as_tensor(positions, device=pos.device)
    if wanted.dtype == torch.bool:  # [B, L] over absolute positions
        inside = pos < wanted.shape[1]
        picked = wanted.expand(pos.shape[0], -1).gather(1, pos.clamp(max=wanted.shape[1] - 1))
        return picked & inside
    return torch.isin(pos, wanted.long())


class Hooks:
    """Hooks on the blocks of ``model`` (see the module docstring); use as a context manager."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks = blocks(model)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def active(self) -> int:
        """How many hooks this manager holds now."""
        return len(self._handles)

    def remove(self) -> None:
        """Remove every hook this manager registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def capture(
        self, layers: int | Sequence[int], *, detach: bool = True, inputs: bool = False
    ) -> Capture:
        """Record the outputs of ``layers`` (their hidden-state inputs when ``inputs``: block
        ``ℓ``'s input is ``hidden_states[ℓ]``) on every forward call, detached unless told."""
        layers = check_layers(list(layers) if not isinstance(layers, int) else layers, self.n)
        cap = Capture(layers)
        for layer in layers:

            def record(hidden: Tensor, pos: Tensor, layer: int = layer) -> Tensor:
                cap.calls[layer].append(hidden.detach() if detach else hidden)
                return hidden

            if inputs:
                self._handles.append(
                    self.blocks[layer].register_forward_pre_hook(
                        _on_input(record), with_kwargs=True
                    )
                )
            else:
                self._hook(layer, record)
        return cap

    def add(self, layer: int, delta: Tensor, *, positions: Positions = "last") -> None:
        """Add ``delta`` to block ``layer``'s output at ``positions``.

        ``delta`` is ``[d]`` (one vector), ``[B, d]`` (one per row) or ``[B, L, d]`` (one per
        absolute position). A ``delta`` that requires grad receives the gradient of the
        block output at those positions.
        """

        def shift(hidden: Tensor, pos: Tensor) -> Tensor:
            vec = delta.to(hidden.dtype)
            if vec.dim() == 3:
                index = pos.clamp(max=vec.shape[1] - 1).unsqueeze(-1).expand(-1, -1, vec.shape[2])
                vec = vec.expand(pos.shape[0], -1, -1).gather(1, index)
            elif vec.dim() == 2:
                vec = vec.unsqueeze(1)
            mask = select(positions, pos).unsqueeze(-1)
            return hidden + vec * mask.to(hidden.dtype)

        self._hook(check_layers(layer, self.n)[0], shift)

    def replace(self, layer: int, fn: Replace) -> None:
        """Replace block ``layer``'s output by ``fn(hidden, positions)``; the model continues
        from the returned tensor (other.md §6.4's replace-and-continue)."""
        self._hook(check_layers(layer, self.n)[0], fn)

    @property
    def n(self) -> int:
        """The number of blocks."""
        return len(self.blocks)

    def _hook(self, layer: int, fn: Replace) -> None:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> Any:
            hidden = out[0] if isinstance(out, tuple) else out
            pos = _positions(kwargs.get("position_ids"), hidden)
            new = fn(hidden, pos)
            if new is hidden:
                return None
            return (new, *out[1:]) if isinstance(out, tuple) else new

        self._handles.append(self.blocks[layer].register_forward_hook(hook, with_kwargs=True))


def _on_input(fn: Replace) -> Callable[..., None]:
    """A forward pre-hook that shows ``fn`` the block's hidden-state input."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        fn(hidden, _positions(kwargs.get("position_ids"), hidden))

    return hook


def _positions(position_ids: Tensor | None, hidden: Tensor) -> Tensor:
    """Absolute positions ``[B, T]`` of this call (``position_ids`` when the block gets them)."""
    batch, length = hidden.shape[:2]
    if isinstance(position_ids, Tensor) and position_ids.shape[-1] == length:
        return position_ids.reshape(-1, length).expand(batch, -1).to(hidden.device)
    return torch.arange(length, device=hidden.device).expand(batch, -1)
