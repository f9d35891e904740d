"""A causal LM behind one KV cache that follows the token sequence it is asked about.

``logits(ids, n)`` returns the next-token logits at the last ``n`` positions of ``ids``. The
cache keeps the longest prefix it shares with ``ids`` (rolled back to the accepted length when
a speculation was rejected, spec other.md §1.3 step 5) and runs only the rest, so a decoding
policy never has to manage caches itself. Nothing here updates the model's weights.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["CachedLM", "common_prefix"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class CachedLM:
    """A ``transformers`` causal LM (any module returning ``.logits`` and taking a cache)."""

    def __init__(self, model: nn.Module, name: str = "model") -> None:
        self.model = model.eval()
        self.name = name
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self.ids: list[int] = []  # the tokens whose keys/values the cache holds
        self.cache: object | None = None
        self.calls = 0  # forward passes, for tokens-per-call metrics

    def rollback(self, length: int) -> None:
        """Keep the cache of the first ``length`` tokens only."""
        if length >= len(self.ids):
            return
        if length == 0 or self.cache is None:
            self.cache, self.ids = None, []
            return
        self.cache.crop(length - len(self.ids))  # type: ignore[attr-defined]
        self.ids = self.ids[:length]

    @torch.inference_mode()
    def logits(self, ids: Sequence[int], n: int = 1) -> Tensor:
        """Next-token logits ``(n, V)`` after each of the last ``n`` prefixes of ``ids``."""
        if not 1 <= n <= len(ids):
            raise ValueError(f"n={n} must be in [1, {len(ids)}]")
        self.rollback(min(common_prefix(self.ids, ids), len(ids) - n))
        start = len(self.ids)
        if self.cache is None:
            from transformers import DynamicCache

            self.cache = DynamicCache()
        kwargs: dict[str, object] = {self._cache_kw: self.cache, "use_cache": True}
        if self._keep_kw:
            kwargs["logits_to_keep"] = n
        x = torch.tensor([list(ids[start:])], device=_device(self.model))
        out = self.model(input_ids=x, **kwargs)
        self.calls += 1
        self.ids = list(ids)
        return out.logits[0, -n:].float()

    @torch.inference_mode()
    def rollout(
        self,
        prefix: Sequence[int],
        firsts: Sequence[int],
        steps: int,
        pick: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """Continue ``prefix + [f]`` for every ``f`` in ``firsts`` as one batch, ``steps`` tokens.

        The prefix is run once (through this cache, which keeps it for the next call); a copy of
        its cache repeated per row serves the batch. ``pick(logits (rows, V)) -> (rows,)``
        chooses each next token. Returns the ``(rows, steps)`` continuation tokens.
        """
        self.logits(prefix, 1)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(firsts))  # type: ignore[attr-defined]
        kwargs: dict[str, object] = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1
        x = torch.tensor(list(firsts), device=_device(self.model))[:, None]
        out = []
        for _ in range(steps):
            logits = self.model(input_ids=x, **kwargs).logits[:, -1].float()
            self.calls += 1
            x = pick(logits).reshape(-1, 1).to(x.device)
            out.append(x)
        return torch.cat(out, 1).cpu() if out else torch.empty(len(firsts), 0, dtype=torch.long)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
