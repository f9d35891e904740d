"""The spill of float layer outputs: what a fresh capture gives, bit for bit, from one forward
per batch; a layer called twice is recorded once; the files go with it."""

from __future__ import annotations

import torch
from torch import nn

from splice.compress import capture
from splice.compress.spill import Spill


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(self.a(x)).to(torch.bfloat16))  # b's outputs are bfloat16


def run(model, batch):
    return model(batch)


def test_spilled_outputs_equal_a_fresh_capture_and_are_removed(tmp_path):
    torch.manual_seed(0)
    net = Twice()
    batches = [torch.randn(n, 4) for n in (3, 5)]
    with Spill(["a", "b"], tmp_path) as spill:
        results = spill.run(net, batches, run)
        assert all(torch.equal(r, net(b)) for r, b in zip(results, batches, strict=True))
        for name in ("a", "b"):
            _, expected = capture(net, name, batches, run, inputs=False)  # the first call of a
            got = spill.outputs(name)
            assert [t.dtype for t in got] == [t.dtype for t in expected]
            assert got[0].dtype == (torch.bfloat16 if name == "b" else torch.float32)
            assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
        assert len(list(tmp_path.iterdir())) == 1
    assert list(tmp_path.iterdir()) == []
