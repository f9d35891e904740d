"""The continual-method protocol: what a training driver asks of Share, iGSP and the baselines.

A method adapts one frozen backbone across a sequence of tasks. The driver
(:mod:`splice.train.continual`) owns data, heads, optimisers and the one training loop; per
task it asks the method for its training *phases* (the parameters each phase trains, an
optional penalty added to the loss, a hook run after it), then calls :meth:`end_task`
(Share's merge, a per-task snapshot) and, before evaluating task ``j``, :meth:`use_task`.
:meth:`state` / :meth:`load_state` round-trip everything a later task or a resumed run
needs; :meth:`stored` counts what must be kept to serve every task seen so far.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from splice._registry import Registry
from splice._schema import Strict
from splice.adapters._sites import Site
from splice.adapters.inject import attach, find_sites
from splice.adapters.layer import Adapter

__all__ = ["CONTINUAL", "ContinualMethod", "Phase", "Stored", "wrap"]

CONTINUAL: Registry[type[ContinualMethod]] = Registry("continual method", "splice.continual")


@dataclass
class Phase:
    """One stretch of a task's training: ``fraction`` of its steps on ``params``.

    ``penalty`` (if any) is added to each micro-batch's loss after the forward; ``after``
    runs when the phase's steps are done (iGSP prunes there)."""

    name: str
    fraction: float
    params: list[nn.Parameter]
    penalty: Callable[[], Tensor | None] | None = None
    after: Callable[[], None] | None = None


@dataclass(frozen=True)
class Stored:
    """What a method keeps to serve every task seen so far (task heads excluded)."""

    params: int
    bytes: int
    detail: dict[str, int] = field(default_factory=dict)


def count(tensors: Sequence[Tensor], detail: dict[str, int] | None = None) -> Stored:
    """Parameters and bytes of ``tensors`` (each counted once)."""
    unique = {id(t): t for t in tensors}.values()
    return Stored(
        sum(t.numel() for t in unique),
        sum(t.numel() * t.element_size() for t in unique),
        dict(detail or {}),
    )


def wrap(
    model: nn.Module, name: str, targets: Sequence[str] | str, build: Callable[[Site], Adapter]
) -> dict[str, Adapter]:
    """Wrap the layers of ``model`` matched by ``targets`` with ``build(site)``; the base is
    frozen. Returns the adapters by module name."""
    found = find_sites(model, targets)
    adapters = [build(site) for _, _, site in found]
    attach(model, found, adapters, name, targets=targets)
    return {n: a for (n, _, _), a in zip(found, adapters, strict=True)}


class ContinualMethod:
    """A registered continual method (subclasses set ``pretty_name``, ``reference_url`` and
    ``Config``, and implement every method below)."""

    pretty_name: ClassVar[str]
    reference_url: ClassVar[str]
    Config: ClassVar[type[Strict]]
    default_lr: ClassVar[float] = 1e-3  # AdamW learning rate of the method's parameters

    def __init__(self, cfg: Strict) -> None:
        self.cfg = cfg
        self.tasks: list[str] = []  # finished tasks, in order
        self.adapters: dict[str, Adapter] = {}  # by module name, filled by :meth:`attach`

    def train_mode(self, on: bool) -> None:
        """Put the adapters (not the frozen backbone) in training or evaluation mode."""
        for ad in self.adapters.values():
            ad.train(on)

    def attach(self, model: nn.Module, targets: Sequence[str] | str) -> None:
        """Inject the method's adapters into ``model`` (in place)."""
        raise NotImplementedError

    def start_task(self, task: str) -> list[Phase]:
        """Prepare training on ``task``; returns its phases (fractions summing to 1)."""
        raise NotImplementedError

    def end_task(self, task: str) -> None:
        """Fold the trained task into the method's stored state."""
        self.tasks.append(task)

    def use_task(self, task: str) -> None:
        """Set the adapters to serve ``task`` (a no-op for task-agnostic methods)."""

    def state(self) -> dict[str, Tensor]:
        """Every tensor a later task or a resumed run needs (names encode the structure)."""
        raise NotImplementedError

    def load_state(self, state: dict[str, Tensor], tasks: Sequence[str]) -> None:
        """Restore :meth:`state` taken after ``tasks``."""
        raise NotImplementedError

    def stored(self) -> Stored:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """Method-specific numbers for the run's record (kept experts, basis size, ...)."""
        return {}
