"""MoS — Mixture of Shards (Wang et al., ICLR 2025), spec peft.md §2.

Every layer's LoRA factors are gathered from two pools per module type shared across layers,
𝒜 (N, d_in/l) and ℬ (N, d_out/l) with N = e·L·l shards. Layer ℓ reads r·l shards per pool
through fixed index maps: (r−p)·l drawn from the shared region by independent seeded
permutations for A and B (subset selection, pair dissociation) and p·l shards private to the
layer (shard privatisation); each rank vector is l concatenated shards (vector sharding).
The maps are buffers saved with the adapter. Trainable parameters = a rank-e LoRA:
Σ_types e·L·(d_in + d_out), whatever the active rank r.
"""

from __future__ import annotations

import pydantic
import torch
from torch import Tensor, nn

from splice.errors import SpliceError

from ._primitives import scaling, site_seed, static_random_index, uniform_parameter
from ._sites import Site
from .layer import METHODS, Adapter, Method, MethodConfig


class MoSConfig(MethodConfig):
    r: int = pydantic.Field(8, gt=0, description="active rank of each layer's LoRA")
    e: int = pydantic.Field(2, gt=0, description="parameter rank: pools hold a rank-e LoRA")
    p: int = pydantic.Field(0, ge=0, description="private rank per layer")
    l: int = pydantic.Field(4, gt=0, description="shards per rank vector")  # noqa: E741
    alpha: float = pydantic.Field(16.0, description="scale numerator: s = alpha/r")
    seed: int = pydantic.Field(0, ge=0, description="seed of the index maps")
    dropout: float = pydantic.Field(
        0.1, ge=0.0, lt=1.0, description="dropout on the input (every released script: 0.1)"
    )


class ShardPool(nn.Module):
    """The pools 𝒜 (N, d_in/l) ~ U(±1/√d_in) and ℬ (N, d_out/l) = 0 of one module type."""

    def __init__(self, n: int, d_in: int, d_out: int, l: int) -> None:  # noqa: E741
        super().__init__()
        self.A = uniform_parameter(n, d_in // l, fan_in=d_in)
        self.B = nn.Parameter(torch.zeros(n, d_out // l))


class MoSAdapter(Adapter):
    def __init__(
        self, site: Site, cfg: MoSConfig, pool: ShardPool, index_A: Tensor, index_B: Tensor
    ) -> None:
        super().__init__(site, scaling(cfg.alpha, cfg.r), cfg.dropout)
        self.r = cfg.r
        self.pool = pool
        self.register_buffer("index_A", index_A)
        self.register_buffer("index_B", index_B)

    def factors(self) -> tuple[Tensor, Tensor]:
        A = self.pool.A[self.index_A].reshape(self.r, self.site.d_in)
        B = self.pool.B[self.index_B].reshape(self.r, self.site.d_out).t()
        return B, A


def _groups(sites: list[Site]) -> dict[tuple, list[int]]:
    """Site positions per module type (leaf name and shape), in model order."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(sites):
        groups.setdefault((s.group, s.kind, s.d_in, s.d_out), []).append(i)
    return groups


def _check(cfg: MoSConfig, n_layers: int, site: Site) -> None:
    r, e, p, l = cfg.r, cfg.e, cfg.p, cfg.l  # noqa: E741
    problems = []
    if p > e or p > r:
        problems.append(f"p={p} must be ≤ e={e} and ≤ r={r}")
    elif p == e and r != e:
        problems.append(f"p = e = {e} (all private) needs r = e")
    elif r - p > (e - p) * n_layers:
        problems.append(
            f"(r−p)={r - p} shared vectors > (e−p)·L = {(e - p) * n_layers} in the pool"
        )
    if site.d_in % l or site.d_out % l:
        problems.append(f"d_in={site.d_in} and d_out={site.d_out} must be divisible by l={l}")
    if problems:
        raise SpliceError(
            f"MoS {'; '.join(problems)} (L={n_layers} layers of {site.group!r})",
            where=site.name,
            fix="lower r or p, raise e, or pick l dividing the layer dims",
        )


@METHODS.register("mos")
class MoS(Method):
    pretty_name = "MoS (Mixture of Shards)"
    reference_url = "https://arxiv.org/abs/2410.00938"
    family = "reparameterized"
    Config = MoSConfig

    def build(self, sites: list[Site], cfg: MoSConfig) -> list[Adapter]:
        r, e, p, l = cfg.r, cfg.e, cfg.p, cfg.l  # noqa: E741
        adapters: list[Adapter | None] = [None] * len(sites)
        for key, members in _groups(sites).items():
            L = len(members)
            _check(cfg, L, sites[members[0]])
            pool = ShardPool(e * L * l, key[2], key[3], l)
            shared = (e - p) * L * l
            for layer, i in enumerate(members):
                private = torch.arange(shared + layer * p * l, shared + (layer + 1) * p * l)
                maps = [
                    torch.cat(
                        [
                            static_random_index(
                                site_seed(cfg.seed, str(key), str(layer), role), shared, (r - p) * l
                            ),
                            private,
                        ]
                    )
                    for role in ("A", "B")
                ]
                adapters[i] = MoSAdapter(sites[i], cfg, pool, *maps)
        return adapters

    def num_parameters(self, sites: list[Site], cfg: MoSConfig) -> int:
        return sum(
            cfg.e * len(members) * (d_in + d_out)
            for (_, _, d_in, d_out), members in _groups(sites).items()
        )
