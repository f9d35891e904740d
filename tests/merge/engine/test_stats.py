"""Exact streaming order statistics (radix selection over float bits) vs torch.kthvalue."""

from __future__ import annotations

import pytest
import torch

import splice.merge.engine.stats as stats
from splice.merge.engine.stats import RadixSelect, kth_largest, kth_largest_each, kth_smallest
from splice.merge.methods.ties import MagnitudeThresholds


def _cases(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    yield torch.randn(1, generator=g).to(dtype)
    yield torch.randn(3001, generator=g).to(dtype)
    yield (torch.randn(2000, generator=g) * 2).round().to(dtype)  # heavy ties, zeros
    x = torch.randn(1500, generator=g)
    x[:300], x[300:500] = 0.0, -0.0
    yield x.to(dtype)
    yield -torch.rand(999, generator=g).to(dtype)  # all negative
    yield torch.full((64,), 3.5).to(dtype)  # one value
    yield (torch.randn(777, generator=g) * 1e-30).to(dtype)  # denormals in float32


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(stats, "CHUNK", 1000)


@pytest.mark.parametrize("gather", [stats.GATHER, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kth_smallest_equals_kthvalue(dtype, gather, small_chunks, monkeypatch):
    """Also with a bin too large to gather (``gather=4``): narrowed digit by digit."""
    monkeypatch.setattr(stats, "GATHER", gather)
    for x in _cases(dtype):
        ref_x = x.double()
        for k in {1, x.numel(), (x.numel() + 1) // 2, max(1, x.numel() // 7)}:
            want = torch.kthvalue(ref_x, k).values.item()
            assert kth_smallest(x, k).item() == want
            assert (
                kth_smallest(x, k, magnitude=True).item() == torch.kthvalue(ref_x.abs(), k).values
            )
            assert kth_largest(x, k).item() == torch.kthvalue(ref_x, x.numel() - k + 1).values


@pytest.mark.parametrize("magnitude", [False, True])
def test_parallel_selection_equals_one_at_a_time(magnitude, small_chunks):
    threads = torch.get_num_threads()
    xs = list(_cases(torch.float32))
    ks = [max(1, x.numel() // 3) for x in xs]
    got = kth_largest_each(xs, ks, magnitude=magnitude)
    assert [g.item() for g in got] == [
        kth_largest(x, k, magnitude=magnitude).item() for x, k in zip(xs, ks, strict=True)
    ]
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="out of range"):
        kth_largest_each(xs[:2], [1, 10**6])


def test_parallel_thresholds_match_the_serial_ones():
    from splice.merge.methods._sparsify import magnitude_threshold, magnitude_thresholds

    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(5000, generator=g) for _ in range(4)]
    densities = [0.0, 0.2, 1.0, 0.5]
    assert magnitude_thresholds(deltas, densities) == [
        magnitude_threshold(d, p) for d, p in zip(deltas, densities, strict=True)
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("magnitude", [False, True])
def test_streaming_select_equals_kthvalue_of_the_concatenation(dtype, magnitude, small_chunks):
    parts = list(_cases(dtype))
    whole = torch.cat([p.double() for p in parts])
    whole = whole.abs() if magnitude else whole
    n = whole.numel()
    for k in (1, 2, n // 3, n // 2, n - 1, n):
        sel = RadixSelect(k, dtype, magnitude=magnitude)
        passes = 0
        while True:
            passes += 1
            for p in reversed(parts) if passes % 2 else parts:  # any order, every pass
                sel.observe(p)
            if sel.end_pass():
                break
        assert passes == {torch.float64: 4, torch.float32: 2}.get(dtype, 1)
        assert sel.value == torch.kthvalue(whole, k).values.item()


def test_rank_may_depend_on_the_stream_length():
    x = torch.randn(1000)
    sel = RadixSelect(lambda n: n - 100 + 1, magnitude=True)  # the 100th largest |x|
    while True:
        sel.observe(x[:400])
        sel.observe(x[400:])
        if sel.end_pass():
            break
    assert sel.count == 1000
    assert sel.value == torch.topk(x.abs(), 100).values[-1].item()


def test_out_of_range_rank_is_an_error():
    with pytest.raises(ValueError):
        kth_smallest(torch.zeros(3), 4)
    sel = RadixSelect(5)
    sel.observe(torch.zeros(3))
    with pytest.raises(ValueError):
        sel.end_pass()


def test_ties_global_thresholds_cover_the_whole_model():
    g = torch.Generator().manual_seed(1)
    base = {
        n: torch.randn(s, generator=g) for n, s in [("a", (30, 7)), ("b", (11,)), ("c", (5, 5))]
    }
    models = [{n: t + torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(2)]
    stat = MagnitudeThresholds([0.2, 1.0])
    while True:
        for n in base:
            stat.observe(n, base[n], [m[n] for m in models], None)
        if stat.end_pass():
            break
    values, _ = stat.result()
    tau = torch.cat([(models[0][n] - base[n]).flatten() for n in base]).abs()
    keep = int(0.2 * tau.numel())
    assert values[0] == torch.topk(tau, keep).values[-1].item()
    assert values[1] == 0.0


def test_selection_touches_uint16_only_through_views_and_copies():
    """CUDA has no bitwise or comparison kernels for uint16 (float64 TIES/DC-Merge selection
    failed on an H200 with ``"bitwise_and_cuda" not implemented for 'UInt16'``): digits are
    viewed as uint16 and copied to int32 before any arithmetic. Checked on the CPU by watching
    every torch call that receives a uint16 tensor."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_flatten

    seen: set[str] = set()

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            flat, _ = tree_flatten((args, kwargs or {}))
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.uint16 for a in flat):
                seen.add(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    x = torch.randn(3001, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with Watch():
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            y = x.to(dtype)
            for magnitude in (False, True):
                kth_smallest(y, 17, magnitude=magnitude)
                select = RadixSelect(17, dtype, magnitude=magnitude)
                while not select.done:
                    select.observe(y)
                    select.end_pass()
    assert seen and seen <= {"view", "__getitem__", "copy_", "numel"}, seen


def _peak_growth(fn) -> int:
    """Bytes of resident memory ``fn()`` adds at its peak: ``VmHWM`` after resetting it to the
    current resident set through ``/proc/self/clear_refs`` (Linux)."""

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selection_memory_does_not_grow_with_ties(dtype):
    """Issue #21 item 15: a tensor whose entries all tie (a task vector a fine-tune left
    untouched, τ = 0) put every entry into the selected bin, which was then gathered, copied
    by ``abs`` and sorted by ``kthvalue`` (int64 indices): 5× the tensor per selection, run
    in parallel for every model. The selection now stays within a few chunks of scratch."""
    n = 1 << 23  # 32 MiB in float32
    x = torch.empty(n, dtype=dtype).fill_(0.0)
    x[:5] = torch.tensor([3.0, -2.0, 1.0, -0.5, 0.25], dtype=dtype)
    kth_largest_each([x[:3000]] * 3, [1, 2, 3], magnitude=True)  # threads, code paged in
    got: list[torch.Tensor] = []
    for magnitude in (False, True):
        growth = _peak_growth(lambda m=magnitude: got.append(kth_largest(x, 20, magnitude=m)))
        assert got.pop().item() == 0.0
        assert growth < 16 << 20, (magnitude, growth / 2**20)
    assert kth_largest(x, 2, magnitude=True).item() == 2.0
    growth = _peak_growth(lambda: got.extend(kth_largest_each([x, x, x], [1, 3, 9])))
    assert [g.item() for g in got] == [3.0, 0.25, 0.0]
    assert growth < 24 << 20, growth / 2**20
