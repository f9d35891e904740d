"""The ``--device cuda`` paths against the CPU ones (marker ``gpu``: ``./run.sh test-gpu``).

Deselected by default (CI has no GPU); run on a machine with a CUDA device, where every test
must pass — without one they fail, they do not skip. Each compares a CUDA run with the same run
on the CPU: merges (every registered method, from state dicts and from disk through the CLI,
with the memory plan's VRAM figure as a bound), adapters (forward, merge/unmerge, a training
step), ``splice train`` in fp32 and bf16, and a learned merge.
"""

from __future__ import annotations

import json

import pytest
import torch

from splice import adapters
from splice.merge import base as merge_base
from splice.merge import merge, merge_state_dicts, plan_merge
from tests.adapters.conftest import METHOD_CASES, make_model, perturb
from tests.merge._ckpt import finetune, save, tiny_llama
from tests.train.test_train import NEG, POS, run

pytestmark = pytest.mark.gpu
CUDA = "cuda"


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with ./run.sh test-gpu there)")


def _models(n: int = 3, hidden: int = 8):
    base = tiny_llama(0, hidden=hidden)
    return base, [finetune(base, s, scale=0.1) for s in range(n)]


METHOD_PARAMS = {  # non-default settings that make each method do real work
    "dare": {"p": 0.5},
    "ties": {"density": 0.4},
    "pcb": {},
    "slerp": {"t": 0.3},
}


# SVD-based methods keep the top entries of cores computed from singular vectors: in fp32,
# cuSOLVER's and LAPACK's vectors differ by ~1e-6, enough to swap an entry at the cut (seen on an
# H200: DC-Merge on 256×256 tensors differed by 1.5e-4 in 7 % of entries). They are compared in
# float64, where the two agree to ~1e-12.
FP64 = {"dc_merge", "do_merge"}


def _float64(sd: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


@pytest.mark.parametrize("method", sorted(merge_base.methods.names()))
def test_every_merge_method_on_cuda_equals_cpu(method):
    base, fts = _models(1 if method == "slerp" else 3)
    if method in FP64:
        base, fts = _float64(base), [_float64(ft) for ft in fts]
    params = METHOD_PARAMS.get(method, {})
    cpu = merge_state_dicts(method, fts, base=base, params=params, seed=3)
    gpu = merge_state_dicts(method, fts, base=base, params=params, seed=3, device=CUDA)
    assert cpu.keys() == gpu.keys()
    tol = dict(rtol=1e-9, atol=1e-11) if method in FP64 else dict(rtol=1e-5, atol=1e-6)
    for name, want in cpu.items():
        got = gpu[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.cpu(), want.cpu(), **tol)
    changed = [n for n, t in cpu.items() if t.is_floating_point() and not torch.equal(t, base[n])]
    assert changed, "the merge changed nothing: the comparison would be empty"


VRAM_RECIPES = {
    "task_arithmetic": {},
    "do_merge": {"rank": 16, "steps": 20},
    "ties": {"density": 0.5},
    "dare": {"p": 0.5, "consensus": "ties"},
    "dc_merge": {},
    "pcb": {"ratio": 0.1},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_radix_selection_on_cuda_every_float_dtype(dtype):
    from splice.merge.engine.stats import RadixSelect, kth_smallest

    x = torch.randn(300_001, generator=torch.Generator().manual_seed(0)).to(dtype)
    for k in (1, 1234, 300_001):
        want = torch.kthvalue(x.float(), k).values
        assert kth_smallest(x.to(CUDA), k).cpu().float() == want
        assert (
            kth_smallest(x.to(CUDA), k, magnitude=True).cpu().float()
            == torch.kthvalue(x.float().abs(), k).values
        )
        select = RadixSelect(k, dtype)
        while not select.done:
            for part in x.to(CUDA).split(100_000):
                select.observe(part)
            select.end_pass()
        assert select.value == float(want)


@pytest.mark.parametrize("hidden", [256, 1024])
@pytest.mark.parametrize("method", sorted(VRAM_RECIPES))
def test_disk_merge_on_cuda_matches_cpu_and_stays_inside_its_vram_plan(tmp_path, method, hidden):
    from splice.io import open_checkpoint

    base, fts = _models(3, hidden=hidden)
    save(base, tmp_path / "base", shard=4 * hidden * hidden + 1)
    for i, ft in enumerate(fts):
        save(ft, tmp_path / f"ft{i}", shard=4 * hidden * hidden + 1)
    recipe = {
        "method": method,
        "base": str(tmp_path / "base"),
        "models": [str(tmp_path / f"ft{i}") for i in range(3)],
        "params": VRAM_RECIPES[method],
    }
    vram = plan_merge(recipe, device=CUDA)["plan"]["peak_vram"]
    merge(recipe, tmp_path / "warm", device=CUDA, progress=False)  # kernels, cuBLAS workspace
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    merge(recipe, tmp_path / "gpu", device=CUDA, progress=False)
    used = torch.cuda.max_memory_allocated() - before
    print(f"\n{method} hidden {hidden}: planned VRAM {vram / 2**20:.2f} MiB, "
          f"used {used / 2**20:.2f} MiB ({used / vram:.2f} of the plan)")  # fmt: skip
    assert 0 < used <= vram
    ledger = json.loads((tmp_path / "gpu" / "splice-ledger.json").read_text())
    if method in FP64:  # compare float64 computations (fp32 outputs)
        merge(recipe, tmp_path / "gpu64", device=CUDA, progress=False, dtype="float64")
        gpu = open_checkpoint(tmp_path / "gpu64")
        cpu = open_checkpoint(merge(recipe, tmp_path / "cpu", progress=False, dtype="float64"))
    else:
        gpu = open_checkpoint(tmp_path / "gpu")
        cpu = open_checkpoint(merge(recipe, tmp_path / "cpu", progress=False))
    assert sorted(gpu) == sorted(cpu)
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-6)
    assert ledger["outputs"] and ledger["fidelity"]


def test_cli_merge_device_cuda(tmp_path):
    from typer.testing import CliRunner

    from splice.cli import app

    base, fts = _models(2)
    save(base, tmp_path / "base")
    for i, ft in enumerate(fts):
        save(ft, tmp_path / f"ft{i}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"method: task_arithmetic\nbase: {tmp_path / 'base'}\n"
        f"models: [{tmp_path / 'ft0'}, {tmp_path / 'ft1'}]\nparams: {{lambda: 0.5}}\n"
    )
    done = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--device", CUDA])
    assert done.exit_code == 0, done.output
    from splice.io import open_checkpoint

    out = open_checkpoint(tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    want = base[name] + 0.5 * sum(ft[name] - base[name] for ft in fts)
    torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_adapter_on_cuda_equals_cpu_and_merges_exactly(case):
    method, options = METHOD_CASES[case]
    options = {k: v for k, v in options.items() if k != "dropout"}
    model, x = make_model("linear")
    adapters.inject(model, method, ["proj"], **options)
    perturb(model)
    want = model(x)
    model.to(CUDA)
    got = model(x.to(CUDA))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    if method == "mola":  # routes per token: no single ΔW to merge
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters.merge_adapters(model)
    torch.testing.assert_close(model(x.to(CUDA)).cpu(), want, rtol=1e-4, atol=1e-4)
    adapters.unmerge_adapters(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("case", ["lora", "nola", "mos", "mola", "ept"])
def test_adapter_training_steps_on_cuda_reduce_the_loss(case):
    method, options = METHOD_CASES[case]
    model, x = make_model("linear")
    adapters.inject(model, method, ["proj"], **options)
    model.to(CUDA).train()
    x = x.to(CUDA)
    target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(5)).to(CUDA)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-2)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.mse_loss(model(x), target)
        if (extra := adapters.aux_loss(model)) is not None:
            loss = loss + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.device.type == torch.device(CUDA).type for p in model.parameters())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_splice_train_on_cuda(bert_dir, tmp_path, precision):
    rows = [f"the movie was {POS[i % 4]} {POS[(i + 1) % 4]},pos" for i in range(24)]
    rows += [f"the movie was {NEG[i % 4]} {NEG[(i + 1) % 4]},neg" for i in range(24)]
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    metrics = run(bert_dir, data, out, steps=30, device=CUDA, precision=precision)
    history = metrics["loss_history"]
    assert history[-1] < history[0]
    assert (out / "metrics.json").is_file()


def test_learned_merge_on_cuda_equals_cpu():
    from splice.merge.learned.adamerging import adamerging
    from tests.merge.learned._toys import deltas, heads, inputs, mlp

    runs = {}
    for device in ("cpu", CUDA):
        module = mlp().to(device)
        hs = {t: h.to(device) for t, h in heads().items()}
        x = {t: v.to(device) for t, v in inputs().items()}
        ds = {t: {n: v.to(device) for n, v in d.items()} for t, d in deltas(module).items()}
        runs[device] = adamerging(module, ds, x, heads=hs, steps=10, lr=0.05, device=device)
    torch.testing.assert_close(
        runs[CUDA].coefficients.cpu(), runs["cpu"].coefficients.cpu(), rtol=1e-6, atol=1e-8
    )
