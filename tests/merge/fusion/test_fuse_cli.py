"""``splice fuse``: checkpoint files in, the fused model out, as the library fuses them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from splice.merge.fusion.ot_fusion import ot_fuse
from tests.cli._run import run_cli

ARCH = """
import torch
from torch import nn


def mlp(tensors):
    width = tensors["0.weight"].shape[0]
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 3))


def deep():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
"""


def _mlp(seed: int, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 3))  # fmt: skip


def _save(model: nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "arch.py").write_text(ARCH)
    x = torch.randn(64, 6)
    save_file({"inputs": x}, str(tmp_path / "x.safetensors"))
    return tmp_path, x


def test_fuse_equals_the_library_and_widths_differ(files, monkeypatch, capsys):
    d, x = files
    a, b = _mlp(0), _mlp(1, width=24)
    args = [_save(a, d / "a.safetensors"), _save(b, d / "b.safetensors")]
    args += [
        "--arch",
        f"{d}/arch.py:mlp",
        "--data",
        str(d / "x.safetensors"),
        "--out",
        str(d / "o"),
    ]
    code, out, err = run_cli(monkeypatch, capsys, "fuse", *args)
    assert code == 0, err
    assert "2 models fused" in out
    got = load_file(str(d / "o" / "model.safetensors"))
    ref = ot_fuse([a.eval(), b.eval()], x, solver="emd").model.state_dict()
    assert set(got) == set(ref) and got["0.weight"].shape == (16, 6)
    for n, v in ref.items():
        torch.testing.assert_close(got[n], v)
    assert (d / "o" / "splice-fuse.json").is_file()


def test_fusing_a_permuted_copy_returns_the_original(files, monkeypatch, capsys):
    d, _ = files
    a = _mlp(3)
    b = _mlp(3)
    p1, p2 = torch.randperm(16), torch.randperm(16)
    with torch.no_grad():  # permute both hidden layers' neurons: the same function
        b[0].weight.copy_(a[0].weight[p1])
        b[0].bias.copy_(a[0].bias[p1])
        b[2].weight.copy_(a[2].weight[p2][:, p1])
        b[2].bias.copy_(a[2].bias[p2])
        b[4].weight.copy_(a[4].weight[:, p2])
    args = [_save(a, d / "a.safetensors"), _save(b, d / "b.safetensors"), "--arch"]
    args += [f"{d}/arch.py:mlp", "--data", str(d / "x.safetensors"), "--out", str(d / "o")]
    assert run_cli(monkeypatch, capsys, "fuse", *args)[0] == 0
    got = load_file(str(d / "o" / "model.safetensors"))
    for n, v in a.state_dict().items():
        torch.testing.assert_close(got[n], v, atol=1e-5, rtol=0)


def test_bad_input_one_line_errors(files, monkeypatch, capsys):
    d, _ = files
    a = _save(_mlp(0), d / "a.safetensors")
    torch.manual_seed(0)
    shallow = _save(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), d / "s.safetensors")
    out = ["--out", str(d / "o")]
    code, _, err = run_cli(monkeypatch, capsys, "fuse", a, a, "--arch", "nocolon", *out)
    assert code == 2 and "module:factory" in err
    code, _, err = run_cli(monkeypatch, capsys, "fuse", a, shallow, "--arch",
                           f"{d}/arch.py:mlp", *out)  # fmt: skip
    assert code == 1 and "does not fit" in err and err.count("\n") == 1
    # different depth: each file fits its own factory, the fusion refuses them
    (d / "two.py").write_text(ARCH + "\n\ndef any_depth(t):\n    return mlp(t) if '4.weight' in t"
                              " else deep()\n")  # fmt: skip
    code, _, err = run_cli(monkeypatch, capsys, "fuse", a, shallow, "--arch",
                           f"{d}/two.py:any_depth", *out)  # fmt: skip
    assert code == 1 and "depth" in err and err.count("\n") == 1
    code, _, err = run_cli(monkeypatch, capsys, "fuse", a, a, "--arch", f"{d}/none.py:f", *out)
    assert code == 1 and "cannot import" in err
    code, _, err = run_cli(monkeypatch, capsys, "fuse", a, "--arch", f"{d}/arch.py:mlp", *out)
    assert code == 2
