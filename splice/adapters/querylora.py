"""Queryable LoRA: routing over a shared memory of low-rank update atoms (Vaidya, Jerzak, Ho,
Bajaj; arXiv 2605.08423, 2026). **[recon]** — no code is public; spec peft.md §4 and its errata,
checked against the paper's abstract and summaries (docs/adapters.md, "Queryable LoRA").

Every adapted module keeps LoRA factors A_ℓ (r, d_in) uniform and B_ℓ (d_out, r) = 0. One memory
shared by all modules holds M atoms, each a key κ_m (d_k) and an r×r operator U_m. Layers are cut
into blocks of ``block`` consecutive layers; the first adapted module of block b to run in a
forward routes the whole block, per sample:

1. state z_b = A_ℓ x pooled over tokens (or spatial positions);
2. running summary s_b = depth attention of z_b over z_1 … z_{b−1} (0 for the first block);
3. query q_b = W_q [z_b ; s_b] (+ W_e e if an instruction embedding e is set);
4. logits ℓ_m = q_b·κ_m/√d_k + λ·log π_m(e) with the instruction prior π(e) = softmax(W_π e)
   (absent without an instruction, λ = ``prior_weight``);
5. convex weights w_b = softmax over the top-k logits (0 elsewhere);
6. R_b = Σ_m w_{b,m} U_m, and every module of the block adds Δ(x) = s·B_ℓ R_b A_ℓ x.

So ‖R_b‖ ≤ max_m ‖U_m‖ in any norm: the bounded update. ``identity=True`` uses I + R_b instead
(the spec's first reading; with one atom and U = 0 it is LoRA). Atoms start at I + N(0, 0.01²)
(identity=False), or N(0, 0.01²) (identity=True), so either starts close to LoRA. The
instruction embedding is set by :func:`set_instruction`. Input-dependent: not mergeable.
"""

from __future__ import annotations

import math

import pydantic
import torch
from torch import Tensor, nn

from splice.errors import SpliceError

from ._primitives import scaling, softmax_topk, uniform_parameter
from ._sites import Site
from .layer import METHODS, Adapter, Method, MethodConfig

__all__ = ["AtomMemory", "QueryableLoRAConfig", "set_instruction"]


class QueryableLoRAConfig(MethodConfig):
    r: int = pydantic.Field(8, gt=0, description="rank")
    alpha: float = pydantic.Field(16.0, description="scale numerator: s = alpha/r")
    atoms: int = pydantic.Field(4, gt=0, description="M, update atoms in the shared memory")
    top_k: int = pydantic.Field(2, gt=0, description="atoms mixed per block")
    block: int = pydantic.Field(2, gt=0, description="layers per routing block")
    key_dim: int = pydantic.Field(16, gt=0, description="d_k of queries and keys")
    identity: bool = pydantic.Field(False, description="use I + R_b (else R_b) in the bottleneck")
    instruction_dim: int = pydantic.Field(0, ge=0, description="d_e of instructions (0: none)")
    prior_weight: float = pydantic.Field(1.0, ge=0, description="λ on the log instruction prior")

    @pydantic.model_validator(mode="after")
    def _k_fits(self) -> QueryableLoRAConfig:
        if self.top_k > self.atoms:
            raise ValueError(f"top_k {self.top_k} exceeds atoms {self.atoms}")
        return self


class AtomMemory(nn.Module):
    """The shared atoms, keys, query/summary maps and instruction prior, plus the routing
    state of the forward in progress (per block: the weights and the modules that used them)."""

    def __init__(self, cfg: QueryableLoRAConfig) -> None:
        super().__init__()
        r, m, dk = cfg.r, cfg.atoms, cfg.key_dim
        self.cfg = cfg
        eye = torch.zeros(r, r) if cfg.identity else torch.eye(r)
        self.atoms = nn.Parameter(eye + 0.01 * torch.randn(m, r, r))
        self.keys = nn.Parameter(torch.randn(m, dk) / math.sqrt(dk))
        self.query = uniform_parameter(dk, 2 * r)
        self.summary = nn.Parameter(torch.eye(r))  # W_s of the depth-attention scores
        if cfg.instruction_dim:
            self.prior = uniform_parameter(m, cfg.instruction_dim)
            self.query_e = uniform_parameter(dk, cfg.instruction_dim)
        self.instruction: Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.routes: dict[int, tuple[Tensor, set[str]]] = {}
        self.states: list[Tensor] = []
        self.last_weights: Tensor | None = None  # the last block's routing weights (batch, M)

    def __getstate__(self) -> dict:
        # copies and pickles start a fresh forward (the routing state holds graph tensors)
        return {**super().__getstate__(), "routes": {}, "states": [], "last_weights": None}

    def logits(self, z: Tensor) -> Tensor:
        """Routing logits (batch, M) of block states ``z`` (batch, r), after ``self.states``."""
        if self.states:
            past = torch.stack(self.states, 1)  # (batch, b, r)
            score = torch.einsum("br,rs,bjs->bj", z, self.summary, past) / math.sqrt(z.shape[-1])
            s = torch.einsum("bj,bjr->br", score.softmax(-1), past)
        else:
            s = torch.zeros_like(z)
        q = torch.cat([z, s], -1) @ self.query.t()
        e = self.instruction
        if e is not None:
            e = e.to(q.dtype).expand(z.shape[0], -1)
            q = q + e @ self.query_e.t()
        out = q @ self.keys.t() / math.sqrt(self.keys.shape[1])
        if e is not None and self.cfg.prior_weight:
            out = out + self.cfg.prior_weight * (e @ self.prior.t()).log_softmax(-1)
        return out

    def route(self, block: int, site: str, h: Tensor, channel_dim: int) -> Tensor:
        """R_b (batch, r, r) for ``site`` in ``block``, given its low-rank code ``h``."""
        hit = self.routes.get(block)
        if hit is not None and site not in hit[1] and hit[0].shape[0] == h.shape[0]:
            hit[1].add(site)
            return hit[0]
        if hit is not None or (self.routes and max(self.routes) > block):
            self.reset()  # a new forward
        z = h.movedim(channel_dim, -1).reshape(h.shape[0], -1, h.shape[channel_dim]).mean(1)
        # in fp32 under autocast too: a bf16 logit may flip the top-k choice of a near tie
        with torch.autocast(h.device.type, enabled=False):
            w, _ = softmax_topk(self.logits(z.float()), self.cfg.top_k)
            r = torch.einsum("bm,mrs->brs", w, self.atoms)
        if self.cfg.identity:
            r = r + torch.eye(r.shape[-1], device=r.device, dtype=r.dtype)
        self.routes[block] = (r, {site})
        self.states.append(z.float())
        self.last_weights = w
        return r


class QueryableLoRAAdapter(Adapter):
    def __init__(self, site: Site, cfg: QueryableLoRAConfig, memory: AtomMemory) -> None:
        super().__init__(site, scaling(cfg.alpha, cfg.r), cfg.dropout)
        self.lora_A = uniform_parameter(cfg.r, site.d_in)
        self.lora_B = nn.Parameter(torch.zeros(site.d_out, cfg.r))
        self.memory = memory
        self.block = (site.layer or 0) // cfg.block

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.site.down(self.dropout(x), self.lora_A)
        cd = self.site.channel_dim % h.dim()
        r = self.memory.route(self.block, self.site.name, h, cd)
        hm = h.movedim(cd, -1)
        routed = torch.einsum("b...r,bsr->b...s", hm.float(), r).to(h.dtype).movedim(-1, cd)
        return self.site.up_add(y, routed.reshape(h.shape), self.lora_B, self.scale)

    def delta(self):
        raise SpliceError(
            "Queryable LoRA routes each input to its own atoms, so it has no single ΔW to merge",
            where=self.site.name,
            fix="keep the adapter unmerged (route per request)",
        )


def set_instruction(model: nn.Module, embedding: Tensor | None) -> None:
    """Condition the routing on an instruction embedding (d_e,) or (batch, d_e); None clears it."""
    memories = {id(m): m for m in model.modules() if isinstance(m, AtomMemory)}
    if not memories:
        raise SpliceError("model has no Queryable LoRA adapters")
    for memory in memories.values():
        d_e = memory.cfg.instruction_dim
        if embedding is not None and (d_e == 0 or embedding.shape[-1] != d_e):
            raise SpliceError(
                f"instruction embedding of width {embedding.shape[-1]}; the adapter takes {d_e}",
                fix="inject with instruction_dim=<width of your embeddings>",
            )
        memory.instruction = None if embedding is None else embedding.reshape(-1, d_e)


@METHODS.register("querylora")
class QueryableLoRA(Method):
    pretty_name = "Queryable LoRA [recon]"
    reference_url = "https://arxiv.org/abs/2605.08423"
    family = "hybrid"  # routed mixture of shared atoms inside per-layer LoRA
    Config = QueryableLoRAConfig
    kinds = frozenset({"linear", "conv1d_gpt2", "conv"})
    uses_all_parameters = False  # top-k: unrouted atoms get no gradient
    mergeable = False
    lowrank = False

    def build(self, sites: list[Site], cfg: QueryableLoRAConfig) -> list[Adapter]:
        memory = AtomMemory(cfg)
        return [QueryableLoRAAdapter(site, cfg, memory) for site in sites]

    def num_parameters(self, sites: list[Site], cfg: QueryableLoRAConfig) -> int:
        r, m, dk, de = cfg.r, cfg.atoms, cfg.key_dim, cfg.instruction_dim
        memory = m * r * r + m * dk + dk * 2 * r + r * r + (m + dk) * de
        return sum(r * (s.d_in + s.d_out) for s in sites) + memory
