"""RDP layer selection (spec §11): known breakpoints, collinear and ε → 0 limits, thresholds
equal to RDP at every ε, the K budget, the layer mapping and the calibration trajectory."""

from __future__ import annotations

import pytest
import torch

from splice.errors import SpliceError
from splice.select import rdp


def polyline():
    """Two corners: at index 3 (right then up) and at index 6 (up then diagonal)."""
    pts = [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (3, 3), (4, 4), (5, 5)]
    return torch.tensor(pts, dtype=torch.float32)


def rdp_reference(points, eps):
    """Textbook recursive RDP, written independently of the threshold form."""
    pts = points.double()

    def dist(p, a, b):
        ab = b - a
        if ab.norm() == 0:
            return (p - a).norm()
        t = ((p - a) @ ab) / (ab @ ab)
        return (p - a - t * ab).norm()

    def rec(i, j):
        if j - i < 2:
            return [i, j]
        d = [dist(pts[k], pts[i], pts[j]) for k in range(i + 1, j)]
        m = max(range(len(d)), key=lambda k: d[k])
        if d[m] > eps:
            return rec(i, i + 1 + m)[:-1] + rec(i + 1 + m, j)
        return [i, j]

    return rec(0, len(pts) - 1)


def test_known_breakpoints_are_kept():
    assert rdp.rdp(polyline(), eps=0.1) == [0, 3, 6, 8]


def test_collinear_points_keep_only_the_endpoints_and_eps_zero_keeps_every_corner():
    line = torch.linspace(0, 1, 7)[:, None] * torch.tensor([[1.0, 2.0, -1.0]])
    assert rdp.rdp(line, eps=1e-6) == [0, 6]
    g = torch.Generator().manual_seed(0)
    walk = torch.randn(10, 5, generator=g).cumsum(0)
    assert rdp.rdp(walk, eps=0.0) == list(range(10))


@pytest.mark.parametrize("eps", [0.0, 0.3, 0.7, 1.0, 1.5, 2.5, 4.0])
def test_thresholds_reproduce_recursive_rdp_at_every_eps(eps):
    g = torch.Generator().manual_seed(1)
    walk = torch.randn(14, 4, generator=g).cumsum(0)
    assert rdp.rdp(walk, eps) == rdp_reference(walk, eps)


def test_layer_budget_takes_the_k_highest_thresholds_and_maps_points_to_layers():
    pts = polyline()  # 9 points: p_0 … p_8, a model with L = 8 layers
    out = rdp.select_layers(pts, k=2)
    assert out["layers"] == [2, 5]  # producer: p_3 → layer 2, p_6 → layer 5
    assert rdp.rdp(pts, out["eps"]) == [0, 3, 6, 8]  # the reported ε keeps exactly those
    assert rdp.select_layers(pts, k=2, mapping="consumer")["layers"] == [3, 6]
    assert rdp.select_layers(pts, k=3, endpoints=True)["layers"] == [2, 5, 7]  # p_8 → layer 7
    assert rdp.select_layers(pts, eps=0.1)["layers"] == [2, 5]


@pytest.mark.parametrize("k", [0, 8, 9])
def test_layer_budget_outside_the_range_is_refused(k):
    with pytest.raises(SpliceError, match=rf"layer budget K={k} is outside 1\.\.7"):
        rdp.select_layers(polyline(), k=k)


class HiddenStates(torch.nn.Module):
    """Returns fixed per-token states, as an HF model with output_hidden_states=True."""

    def __init__(self, states):
        super().__init__()
        self.states = states

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        return type("Out", (), {"hidden_states": tuple(self.states[:, input_ids[:, 0]])})()


def test_trajectory_pools_valid_tokens_then_examples():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 4, 5, 2, generator=g)  # (L+1, example id, tokens, d)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    batch = {"input_ids": torch.tensor([[0], [2]]), "attention_mask": mask}
    model = HiddenStates(states)
    mean = rdp.trajectory(model, [batch])
    expected = (states[:, 0, :2].mean(1) + states[:, 2].mean(1)) / 2
    assert torch.allclose(mean, expected)
    last = rdp.trajectory(model, [batch], pooling="last")
    assert torch.allclose(last, (states[:, 0, 1] + states[:, 2, 4]) / 2)
    with pytest.raises(SpliceError, match="calibration data has no rows"):
        rdp.trajectory(model, [])


def test_chosen_layers_train_save_and_reload_to_the_same_outputs(tmp_path):
    import transformers

    from splice.adapters import adapter_layers, load_adapter, save_adapter
    from splice.select import run

    def base():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(
            vocab_size=30, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, num_labels=2,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(cfg).eval()

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 30, (8, 6), generator=g)
    y = torch.arange(8) % 2
    model = base()
    sel = run.run(
        "rdp", run.options("rdp", {"calibration": 2}), model, 2,
        loss=lambda i: None, inputs=lambda i: {"input_ids": x[4 * i : 4 * i + 4]},
        adapter=("lora", ["query", "value"], {"r": 2}), modules_to_save=["classifier"],
    )  # fmt: skip
    chosen = sel.info["layers"]
    assert len(chosen) == 2 and set(chosen) <= {0, 1, 2, 3}
    adapted = {int(n.split(".")[3]) for n in adapter_layers(model)}  # bert.encoder.layer.{i}
    assert adapted == set(chosen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(input_ids=x).logits, y).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        out = model(input_ids=x).logits
    save_adapter(model, tmp_path / "rdp")
    again = load_adapter(base(), tmp_path / "rdp")
    assert {int(n.split(".")[3]) for n in adapter_layers(again)} == set(chosen)
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, out)
        assert not torch.equal(base()(input_ids=x).logits, out)  # the adapter changed them
