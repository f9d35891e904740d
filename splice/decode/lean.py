"""A lean CPU forward for Llama-style causal LMs, for speculative decoding (issue #29).

``LeanLM(model)`` runs the same network as ``transformers``' ``LlamaForCausalLM`` (the model's
own weights, norms and rotary tables) behind the :class:`~splice.decode.lm.CachedLM`
interface (``logits(ids, n)``, ``rollback``, ``calls``), without the per-call glue that makes
a 135M model's multi-token step slow on a CPU:

* every matrix is **pre-packed once** for oneDNN (``torch.ops.mkldnn``; q, k, v fused into
  one matrix, gate and up into another). With ``nn.Linear`` (MKL sgemm) SmolLM2's cached step
  took 1.6–1.8× as long for 4–5 tokens as for 1 (MKL leaves the memory-bound path at 2–5
  rows); the packed kernels read each weight once for any row count up to ``rows`` (default
  8), so verifying ``γ`` drafted tokens costs about one plain step. oneDNN's 1–3-row kernels
  were slower than its 4-row one on our CPU, so calls with fewer rows are padded to
  ``PAD_ROWS`` = 4 with zero rows: plain decoding takes the same fast path;
* the head runs on the last ``n`` positions only;
* the KV cache is one preallocated buffer per layer: appending writes in place and rolling
  back to the accepted length only moves a counter (no ``torch.cat`` per step).

``weights="int8"`` builds the drafter's variant: the same forward with every matrix (head
included) quantised per output channel, activations per call (fbgemm; as
:func:`~splice.decode.qdraft.int8_draft`), optionally only the first ``layers`` blocks.
``weights="bf16"`` packs bf16 copies for oneDNN (activations cast per call). Both only
propose: the policies keep the output the fp32 target's.

``kv_from=target`` makes a drafter of the same architecture read the **target's exact K/V**
for every position the target has already run (the prompt and each accepted token) and
compute its own only for the tokens it drafts beyond them, as QSpec shares one KV cache
between its low- and high-precision passes. An int8 drafter's prompt prefill quantises all
rows with one activation scale (set by outlier rows such as the first token's), so its own
K/V for the context is poor; on the target's K/V it agrees with the target more often (α
0.84 → 0.92 on chat prompts, docs/decode.md) and never prefills. Lossless either way: the
drafter only proposes.

Outputs equal the ``transformers`` forward up to float rounding (the kernels sum in another
order; tests/decode/test_lean.py); speculative and plain decoding through the same ``LeanLM``
target use the same kernels, so greedy speculative output equals greedy plain output.
A LeanLM holds its own packed copy of the matrices (fp32: as many bytes again as the model's;
int8: a quarter). Batch size 1, CPU, fp32 models; positions through the model's own rotary
module. [recon] (an engineering path of ours, not from a paper)
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splice.decode.lm import common_prefix
from splice.errors import SpliceError

__all__ = ["LeanLM", "batched_logits"]

WEIGHTS = ("fp32", "bf16", "int8")
PAD_ROWS = 4  # fp32/bf16 calls with fewer rows are padded with zero rows to this many


class LeanLM:
    """A Llama-style causal LM behind an in-place KV cache with O(1) rollback."""

    def __init__(
        self,
        model: nn.Module,
        name: str = "model",
        *,
        weights: str = "fp32",
        layers: int | None = None,
        rows: int = 8,
        kv_from: LeanLM | None = None,
    ) -> None:
        blocks = _check(model, weights, layers)
        cfg = model.config
        self.model, self.name, self.weights = model, name, weights
        self.ids: list[int] = []
        self.calls = 0
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = float(cfg.rms_norm_eps)
        pack = _packer(weights, rows)
        self.blocks = [_Block(b, pack) for b in blocks]
        self.embed = model.model.embed_tokens.weight.detach()
        self.norm = model.model.norm.weight.detach()
        self.head = pack(model.lm_head.weight.detach())
        self._rotary = model.model.rotary_emb
        self.kv_from, self._exact = _check_share(self, kv_from), 0
        self._cap = 0
        self._grow(256)

    def rollback(self, length: int) -> None:
        """Keep the cache of the first ``length`` tokens only (moves a counter)."""
        self.ids = self.ids[: max(length, 0)]

    @torch.inference_mode()
    def logits(self, ids: Sequence[int], n: int = 1) -> Tensor:
        """Next-token logits ``(n, V)`` after each of the last ``n`` prefixes of ``ids``."""
        return _forward([self], [ids], n)

    def fork(self, name: str) -> LeanLM:
        """A LeanLM on the same packed weights (no copy) with its own, empty KV cache: a
        second context of one model for :func:`batched_logits`."""
        new = copy.copy(self)
        new.name, new.ids, new.calls, new.kv_from, new._exact = name, [], 0, None, 0
        new._k, new._v = torch.zeros_like(self._k), torch.zeros_like(self._v)
        return new

    def _prepare(self, ids: Sequence[int], n: int) -> tuple[int, list[int]]:
        """Roll the cache back to what ``ids`` shares with it; (start, tokens to run)."""
        if not 1 <= n <= len(ids):
            raise ValueError(f"n={n} must be in [1, {len(ids)}]")
        keep = min(common_prefix(self.ids, ids), len(ids) - n)
        if len(ids) > self._cap:
            self._grow(2 * len(ids))
        if self.kv_from is not None:
            keep = self._share(ids, n, keep)
        self.rollback(keep)
        return len(self.ids), list(ids[len(self.ids) :])

    def _share(self, ids: Sequence[int], n: int, keep: int) -> int:
        """Copy the source's exact K/V of the prefix it shares with ``ids``; the new keep."""
        src = self.kv_from
        share = min(common_prefix(src.ids, ids), len(ids) - n)  # type: ignore[union-attr]
        done = min(self._exact, keep)  # copied earlier and still this prefix
        if share > done:
            L = len(self.blocks)
            self._k[:, :, done:share] = src._k[:L, :, done:share]  # type: ignore[union-attr]
            self._v[:, :, done:share] = src._v[:L, :, done:share]  # type: ignore[union-attr]
            self.ids = list(ids[:share]) if share > keep else self.ids
        self._exact = max(share, done)
        return max(keep, share)

    def _attend(self, i: int, qkv: Tensor, start: int) -> Tensor:
        """Block ``i``'s attention for rows ``qkv`` (this context's new positions from
        ``start``): RoPE, write K/V into the cache, attend causally; ``(rows, H·d)``."""
        n, H, KV, d = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        qk = qkv[:, : (H + KV) * d].view(n, H + KV, d)
        cos, sin = self._cos[start : start + n], self._sin[start : start + n]
        qk = qk * cos + torch.cat((-qk[..., d // 2 :], qk[..., : d // 2]), -1) * sin
        end = start + n
        self._k[i, :, start:end] = qk[:, H:].transpose(0, 1)
        self._v[i, :, start:end] = qkv[:, (H + KV) * d :].view(n, KV, d).transpose(0, 1)
        mask = None
        if n > 1:  # query j (position start+j) sees keys 0 .. start+j
            mask = torch.ones(n, end, dtype=torch.bool).tril(start)
        o = F.scaled_dot_product_attention(
            qk[:, :H].transpose(0, 1)[None],
            self._k[i, :, :end][None],
            self._v[i, :, :end][None],
            attn_mask=mask,
            enable_gqa=True,
        )
        return o[0].transpose(0, 1).reshape(n, H * d)

    def _grow(self, cap: int) -> None:
        """Room for ``cap`` positions: KV buffers and the rotary cos/sin tables."""
        shape = (len(self.blocks), self.kv_heads, cap, self.head_dim)
        k, v = torch.zeros(shape), torch.zeros(shape)
        if self._cap:
            k[:, :, : self._cap], v[:, :, : self._cap] = self._k, self._v
        self._k, self._v, self._cap = k, v, cap
        with torch.inference_mode():
            pos = torch.arange(cap)[None]
            cos, sin = self._rotary(self.embed[:1][None], pos)  # the model's own RoPE
        self._cos, self._sin = cos[0, :, None].float(), sin[0, :, None].float()


def batched_logits(lms: Sequence[LeanLM], seqs: Sequence[Sequence[int]]) -> Tensor:
    """Next-token logits ``(B, V)`` after ``seqs[b]``, each on ``lms[b]``'s own KV cache, in
    **one** forward: the new rows of all contexts are stacked for every matrix product (each
    packed weight is read once for all of them) and attention runs per context on its cache.
    ``lms`` must share one model's packed weights (:meth:`LeanLM.fork`). Equal to calling
    ``lms[b].logits(seqs[b], 1)`` one by one, up to float rounding (tests/decode)."""
    if len(lms) != len(seqs) or not lms:
        raise ValueError(f"need one sequence per LeanLM (>0), got {len(seqs)}/{len(lms)}")
    if any(lm.blocks is not lms[0].blocks for lm in lms) or len({id(lm) for lm in lms}) < len(lms):
        raise SpliceError("batched_logits needs distinct forks of one LeanLM (LeanLM.fork)")
    with torch.inference_mode():
        return _forward(lms, seqs, 1)


def _forward(lms: Sequence[LeanLM], seqs: Sequence[Sequence[int]], n: int) -> Tensor:
    """The stacked forward of :func:`batched_logits`; the last ``n`` rows of every context."""
    plans = [lm._prepare(ids, n) for lm, ids in zip(lms, seqs, strict=True)]
    one = lms[0]
    sizes = [len(new) for _, new in plans]
    h = one.embed[torch.tensor([t for _, new in plans for t in new])]
    for i, b in enumerate(one.blocks):
        qkv = b.qkv(_rms(h, b.ln1, one.eps)).split(sizes)
        o = [lm._attend(i, x, start) for lm, x, (start, _) in zip(lms, qkv, plans, strict=True)]
        h = h + b.o(torch.cat(o) if len(o) > 1 else o[0])
        gate, up = b.gate_up(_rms(h, b.ln2, one.eps)).chunk(2, -1)
        h = h + b.down(F.silu(gate) * up)
    ends = torch.tensor(sizes).cumsum(0)
    rows = torch.cat([torch.arange(e - n, e) for e in ends.tolist()])
    for lm, ids in zip(lms, seqs, strict=True):
        lm.calls += 1
        lm.ids = list(ids)
    return one.head(_rms(h[rows], one.norm, one.eps)).float()


class _Block:
    """One decoder block's packed matrices and norm weights."""

    def __init__(self, block: nn.Module, pack: Callable[[Tensor], Callable]) -> None:
        a, m = block.self_attn, block.mlp
        w = lambda lin: lin.weight.detach()  # noqa: E731
        self.qkv = pack(torch.cat([w(a.q_proj), w(a.k_proj), w(a.v_proj)]))
        self.o = pack(w(a.o_proj))
        self.gate_up = pack(torch.cat([w(m.gate_proj), w(m.up_proj)]))
        self.down = pack(w(m.down_proj))
        self.ln1 = block.input_layernorm.weight.detach()
        self.ln2 = block.post_attention_layernorm.weight.detach()


def _check_share(lm: LeanLM, src: LeanLM | None) -> LeanLM | None:
    if src is None:
        return None
    if not isinstance(src, LeanLM) or (src.kv_heads, src.head_dim) != (lm.kv_heads, lm.head_dim):
        raise SpliceError("kv_from must be a LeanLM of the same architecture (the target)")
    if len(src.blocks) < len(lm.blocks):
        raise SpliceError(f"kv_from has {len(src.blocks)} blocks, this model {len(lm.blocks)}")
    return src


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """``transformers``' LlamaRMSNorm in fp32."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _packer(weights: str, rows: int) -> Callable[[Tensor], Callable[[Tensor], Tensor]]:
    """``pack(W (out, in)) -> f(x (n, in)) = x Wᵀ`` for the chosen weight format."""
    if weights == "int8":
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        def int8(w: Tensor) -> Callable[[Tensor], Tensor]:
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w
            lin.qconfig = per_channel_dynamic_qconfig
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao's deprecation notes
                return DynamicLinear.from_float(lin)

        return int8
    mkldnn = torch.ops.mkldnn
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32

    def dense(w: Tensor) -> Callable[[Tensor], Tensor]:
        packed = mkldnn._reorder_linear_weight(w.to(dtype).contiguous(), rows)

        def f(x: Tensor) -> Tensor:
            n = x.shape[0]
            if n < PAD_ROWS:  # oneDNN's 1–3-row kernels are slower than its 4-row one
                x = F.pad(x, (0, 0, 0, PAD_ROWS - n))
            y = mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "")
            return y[:n].float()

        return f

    return dense


def _check(model: nn.Module, weights: str, layers: int | None) -> list[nn.Module]:
    """The blocks to run; refuses what the lean forward does not implement."""
    if weights not in WEIGHTS:
        raise SpliceError(f"weights={weights!r} is not one of {', '.join(WEIGHTS)}")
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    blocks = getattr(inner, "layers", None)
    if getattr(cfg, "model_type", None) != "llama" or blocks is None:
        raise SpliceError(
            f"the lean forward runs Llama-style models, not {type(model).__name__}",
            fix="use CachedLM(model) for other architectures",
        )
    odd = getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)
    if odd or getattr(cfg, "hidden_act", "silu") != "silu":
        raise SpliceError(
            "the lean forward needs bias-free attention/MLP with SiLU",
            fix="use CachedLM(model)",
        )
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise SpliceError(
            f"the lean forward takes an fp32 model on the CPU, not {p.dtype} on {p.device}",
            fix="use CachedLM(model) on an accelerator",
        )
    if weights != "int8" and not torch.backends.mkldnn.is_available():
        raise SpliceError("this torch build has no oneDNN (mkldnn)", fix="use CachedLM(model)")
    if layers is not None and not 1 <= layers <= len(blocks):
        raise SpliceError(
            f"layers={layers} is outside [1, {len(blocks)}]",
            fix=f"the model has {len(blocks)} blocks",
        )
    return list(blocks)[: layers or len(blocks)]
