"""Read-buffer reuse during merges: never a buffer still referenced, and within its budget."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import splice.io._pool as pool_mod
from splice.io import CheckpointWriter, open_checkpoint
from splice.io._pool import MIN_BYTES, BufferPool, pooled_reads
from splice.merge import merge_state_dicts

N = MIN_BYTES  # the smallest pooled size


def test_a_buffer_is_reused_only_when_nothing_refers_to_it():
    pool = BufferPool()
    t = pool.get(N)
    ptr = t.data_ptr()
    view = t.view(torch.float32).reshape(256, -1)
    del t
    assert pool.get(N).data_ptr() != ptr  # the view keeps it
    del view
    assert pool.get(N).data_ptr() == ptr
    arr = pool.get(N).numpy()  # a numpy array over the same memory keeps it too
    ptr2 = arr.ctypes.data
    assert pool.get(N).data_ptr() != ptr2
    del arr
    assert pool.get(N).data_ptr() in (ptr, ptr2)


def test_only_the_exact_size_is_reused():
    pool = BufferPool(budget=10 * N)
    a = pool.get(2 * N)
    ptr = a.data_ptr()
    del a
    assert pool.get(N).data_ptr() != ptr
    assert pool.get(2 * N).data_ptr() == ptr
    assert (pool.reused, pool.allocated) == (1, 2)


@pytest.mark.parametrize("budget", [0, 3 * N, 8 * N])
def test_the_pool_grows_only_within_its_budget_or_the_live_buffers(budget):
    """What it holds changes only when it allocates, and then it is at most the budget or
    the buffers in use, whichever is more (so a merge's peak is what it would be without)."""
    rng = random.Random(budget)
    pool = BufferPool(budget)
    live: list[torch.Tensor] = []
    held = 0
    for _ in range(400):
        allocated = pool.allocated
        if live and rng.random() < 0.45:
            live.pop(rng.randrange(len(live)))
        else:
            live.append(pool.get(rng.choice([N, 2 * N, 3 * N])))
        before, held = held, sum(b.numel() for b in pool._bufs)
        if pool.allocated > allocated:
            assert held <= max(budget, sum(t.numel() for t in live))
        else:
            assert held == before
        assert {t.data_ptr() for t in live} <= {b.data_ptr() for b in pool._bufs}
        assert len({t.data_ptr() for t in live}) == len(live)  # no buffer handed out twice
    assert pool.reused > 50


def test_reads_into_reused_buffers_are_exact_and_earlier_tensors_untouched(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(512, 512, generator=g) for i in range(6)}  # 1 MiB each
    with CheckpointWriter(tmp_path / "c") as w:
        for k, v in tensors.items():
            w.write(k, v)
    ckpt = open_checkpoint(tmp_path / "c")
    with pooled_reads(budget=4 * N) as pool:
        assert pool is not None
        kept = ckpt["w0"]
        for k in list(tensors) * 3:
            assert torch.equal(ckpt[k], tensors[k])  # each dies at once: its buffer is reused
        assert torch.equal(kept, tensors["w0"])
        assert pool.reused >= 15
    assert pool_mod._active is None


def test_merge_outputs_kept_by_the_caller_are_never_overwritten(tmp_path, monkeypatch):
    """Linear merges in place into the first input's read buffer and merge_state_dicts keeps
    the outputs: later reads must not land in those buffers."""
    stats = []
    monkeypatch.setattr(BufferPool, "clear", lambda self: stats.append(self.reused))
    g = torch.Generator().manual_seed(1)
    paths = []
    for m in range(3):
        with CheckpointWriter(tmp_path / f"m{m}") as w:
            for i in range(5):
                w.write(f"layers.{i}.weight", torch.randn(512, 512, generator=g))
        paths.append(tmp_path / f"m{m}")
    out = merge_state_dicts("linear", [open_checkpoint(p) for p in paths])
    loaded = [load_file(p / "model.safetensors") for p in paths]
    for name, value in out.items():
        expected = sum(sd[name].double() for sd in loaded) / 3
        np.testing.assert_allclose(value.double().numpy(), expected.numpy(), atol=1e-6)
    assert stats and stats[0] > 0  # buffers of the other two inputs were reused
