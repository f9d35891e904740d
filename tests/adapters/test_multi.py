"""Several named adapters on one model: mixed batches, weighted sets, delete, hotswap (every
method of the contract battery, so a new method is covered by its CONTRACT_CASES alone)."""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch

from splice.adapters import (
    METHODS,
    Rows,
    active_adapters,
    adapter_layers,
    adapter_names,
    add_adapter,
    delete_adapter,
    disable_adapters,
    hotswap_adapter,
    inject,
    load_adapter,
    merge_adapters,
    mixed_batch,
    save_adapter,
    set_active_adapters,
    unmerge_adapters,
)
from splice.errors import SpliceError

from .conftest import KINDS, METHOD_CASES, make_model, perturb
from .test_contract import CASES

# the virtual-token methods (prefix, prompt, MAM) hold one model-wide hook: one per model
SHARING = {c: v for c, v in METHOD_CASES.items() if METHODS.get(v[0]).shares_model}
LONE = sorted(c for c in METHOD_CASES if c not in SHARING)
MERGEABLE = sorted(c for c in SHARING if METHODS.get(METHOD_CASES[c][0]).mergeable)
ROW_NAMES = ["a", "base", "b", "b", "a", "base"]


def two_adapters(case: str, kind: str = "linear"):
    """A model with adapters "a" and "b" of ``case``, each moved off its init differently,
    and a batch of 6 rows."""
    method, cfg = METHOD_CASES[case]
    model, _ = make_model(kind)
    x = torch.cat([KINDS[kind][1]() for _ in range(3)])
    for seed, name in enumerate(["a", "b"], start=1):
        add_adapter(model, name, method, ["proj"], **cfg)
        perturb(model, seed=seed)  # only the newest adapter trains
    return model, x


def alone(model, x, adapters) -> torch.Tensor:
    """Each row on its own through the model with only its adapter(s) active."""
    outs = []
    for i, name in enumerate(adapters):
        set_active_adapters(model, [] if name == "base" else name)
        outs.append(model(x[i : i + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize(("case", "kind"), [(c, k) for c, k in CASES if c in SHARING])
def test_mixed_batch_equals_each_row_alone(case, kind):
    model, x = two_adapters(case, kind)
    with torch.no_grad():
        mixed = model(x, adapter_names=ROW_NAMES)
        with mixed_batch(model, ROW_NAMES):
            again = model(x)
        reference = alone(model, x, ROW_NAMES)
    assert torch.allclose(mixed, reference, atol=1e-5)
    assert torch.equal(again, mixed)
    assert not torch.allclose(reference[0], reference[1], atol=1e-4)  # the adapters act
    assert not torch.allclose(reference[2], alone(model, x[:3], ["a"] * 3)[2], atol=1e-4)


@pytest.mark.parametrize("case", sorted(SHARING))
def test_row_weights_equal_a_weighted_active_set_per_row(case):
    """Rows(weights=…) — per-sample adapter mixtures — equals each row alone under the
    weighted active set {a: w_a, b: w_b}; a row index tensor equals the names form."""
    model, x = two_adapters(case)
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [-1.0, 2.0], [0.3, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        with mixed_batch(model, Rows(["a", "b"], weights=w)):
            mixed = model(x)
        with mixed_batch(model, Rows(["b", "a", "base"], index=torch.tensor([1, 2, 0, 0, 1, 2]))):
            by_index = model(x)
        rows = []
        for i in range(len(x)):
            set_active_adapters(model, {"a": float(w[i, 0]), "b": float(w[i, 1])})
            rows.append(model(x[i : i + 1]))
        assert torch.allclose(mixed, torch.cat(rows), atol=1e-5)
        assert torch.allclose(by_index, alone(model, x, ROW_NAMES), atol=1e-5)


@pytest.mark.parametrize("case", MERGEABLE)
def test_weighted_set_merges_exactly_and_unmerges(case):
    model, x = two_adapters(case)
    base = {n: layer.weight.detach().clone() for n, layer in adapter_layers(model).items()}
    set_active_adapters(model, {"a": 0.5, "b": -1.5})
    assert active_adapters(model) == {"a": 0.5, "b": -1.5}
    with torch.no_grad():
        y = model(x)
        merge_adapters(model)
        assert torch.allclose(model(x), y, atol=1e-5)
        set_active_adapters(model, "b")  # re-merged with b's ΔW alone
        set_active_adapters(model, {"a": 0.5, "b": -1.5})
        assert torch.allclose(model(x), y, atol=1e-5)
        with pytest.raises(SpliceError, match="unmerged"):
            model(x, adapter_names=ROW_NAMES)
        unmerge_adapters(model)
    for n, layer in adapter_layers(model).items():
        assert torch.allclose(layer.weight, base[n], atol=1e-6)


def test_disable_gives_the_base_model_and_set_active_restores():
    model, x = make_model("linear")
    with torch.no_grad():
        y0 = model(x)
        add_adapter(model, "a", "lora", ["proj"], r=2)
        perturb(model)
        ya = model(x)
        disable_adapters(model)
        assert torch.equal(model(x), y0) and active_adapters(model) == {}
        set_active_adapters(model, "a")
        assert torch.equal(model(x), ya)


@pytest.mark.parametrize("case", sorted(SHARING))
def test_delete_frees_the_tensors_and_keeps_the_rest(case, tmp_path):
    model, x = two_adapters(case)
    gone = [
        weakref.ref(t)
        for layer in adapter_layers(model).values()
        for t in itertools.chain(layer.get("b").parameters(), layer.get("b").buffers())
    ]
    assert gone
    set_active_adapters(model, "a")
    with torch.no_grad():
        ya = model(x)
    delete_adapter(model, "b")
    gc.collect()
    assert all(r() is None for r in gone), "a deleted adapter's tensor is still referenced"
    assert adapter_names(model) == ["a"]
    with torch.no_grad():
        assert torch.equal(model(x), ya)
    with pytest.raises(SpliceError, match="'b', which is not loaded"):
        model(x, adapter_names=ROW_NAMES)
    delete_adapter(model, "a")
    assert not adapter_layers(model) and adapter_names(model) == []
    with torch.no_grad():
        assert torch.equal(model(x), make_model("linear")[0](x))


def test_adapters_on_different_layers_and_the_default_name():
    """An adapter that skips a layer leaves its rows untouched there; ``inject`` is "default"."""
    model, _ = make_model("linear")
    x = torch.randn(4, 5, 8)
    inject(model, "lora", ["proj"], r=2)
    perturb(model, seed=1)
    add_adapter(model, "first", "nola", r"layers\.0\.proj", k=4, l=4)
    perturb(model, seed=2)
    assert adapter_names(model) == ["default", "first"]
    assert set(adapter_layers(model)["layers.0.proj"].named_adapters()) == {"default", "first"}
    assert list(adapter_layers(model)["layers.1.proj"].named_adapters()) == ["default"]
    names = ["first", "default", "base", "first"]
    with torch.no_grad():
        assert torch.allclose(model(x, adapter_names=names), alone(model, x, names), atol=1e-5)


def test_named_load_save_and_the_new_adapter_trains(tmp_path):
    model, x = two_adapters("lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".extra.b." in n for n in trainable)  # "a" was frozen by the add
    save_adapter(model, tmp_path / "b", adapter_name="b")
    fresh, _ = make_model("linear")
    load_adapter(fresh, tmp_path / "b", adapter_name="mine")
    set_active_adapters(model, "b")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("case", sorted(SHARING))
def test_hotswap_leaves_outputs_equal_to_a_fresh_load(case, tmp_path):
    method, cfg = METHOD_CASES[case]
    for seed in (1, 2):
        model, x = make_model("linear")
        inject(model, method, ["proj"], **cfg)
        perturb(model, seed=seed)
        save_adapter(model, tmp_path / str(seed))
    served, _ = make_model("linear")
    load_adapter(served, tmp_path / "1", adapter_name="live")
    kept = [id(t) for t in served.parameters()]
    hotswap_adapter(served, "live", tmp_path / "2")
    assert [id(t) for t in served.parameters()] == kept  # in place: no module replaced
    fresh, _ = make_model("linear")
    load_adapter(fresh, tmp_path / "2")
    with torch.no_grad():
        assert torch.equal(served(x), fresh(x))


def test_hotswap_after_compile_does_not_recompile(tmp_path):
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    dirs = []
    for seed, alpha in ((1, 8), (2, 8), (3, 16)):
        model, x = make_model("linear")
        inject(model, "lora", ["proj"], r=4, alpha=alpha)
        perturb(model, seed=seed)
        dirs.append(tmp_path / str(seed))
        save_adapter(model, dirs[-1])
    served, _ = make_model("linear")
    load_adapter(served, dirs[0])
    torch._dynamo.reset()
    compiled = torch.compile(served, backend=counting_backend)
    with torch.no_grad():
        compiled(x)
        compiled(x)
        compiled_once = len(graphs)
        hotswap_adapter(served, "default", dirs[1])
        y = compiled(x)
    assert compiled_once >= 1 and len(graphs) == compiled_once, "hotswap recompiled"
    fresh, _ = make_model("linear")
    load_adapter(fresh, dirs[1])
    with torch.no_grad():
        assert torch.allclose(y, fresh(x), atol=1e-6)
        hotswap_adapter(served, "default", dirs[2])  # another alpha: a new constant, one graph
        y = compiled(x)
    assert len(graphs) == compiled_once + 1  # the counter does see recompiles
    fresh, _ = make_model("linear")
    load_adapter(fresh, dirs[2])
    with torch.no_grad():
        assert torch.allclose(y, fresh(x), atol=1e-6)
    model, _ = make_model("linear")
    inject(model, "lora", ["proj"], r=8)
    save_adapter(model, tmp_path / "r8")
    with pytest.raises(SpliceError, match=r"same shapes \(rank\)"):
        hotswap_adapter(served, "default", tmp_path / "r8")


def test_bad_input_is_a_one_line_error(tmp_path):
    model, x = two_adapters("nola")
    for names, match in [
        (["a", "c", "b", "b", "a", "a"], "names 'c', which is not loaded"),
        ("a", "a list of names"),
    ]:
        with pytest.raises(SpliceError, match=match) as e:
            model(x, adapter_names=names)
        assert "\n" not in str(e.value)
    with pytest.raises(SpliceError, match="6 rows routed but the layer sees a batch of 2"):
        model(x[:2], adapter_names=ROW_NAMES)
    with torch.no_grad():
        model(x)  # the keyword left nothing routed behind
    for name, match in [("a", "already loaded"), ("base", "reserved"), ("b.c", "plain name")]:
        with pytest.raises(SpliceError, match=match):
            add_adapter(model, name, "lora", ["proj"])
    with pytest.raises(SpliceError, match="modules_to_save"):
        add_adapter(model, "c", "lora", ["proj"], modules_to_save=["layers"])
    # an adapter trained on a base of other shapes (NOLA's tensors alone would fit)
    other = torch.nn.Sequential()
    other.layers = torch.nn.ModuleList(
        torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 16)}) for _ in range(3)
    )
    inject(other, "nola", ["proj"], **METHOD_CASES["nola"][1])
    save_adapter(other, tmp_path / "other")
    with pytest.raises(SpliceError, match=r"trained on a base whose layers.0.proj weight is \(16"):
        load_adapter(model, tmp_path / "other", adapter_name="c")
    assert adapter_names(model) == ["a", "b"]  # nothing left loaded


@pytest.mark.parametrize("case", LONE)
def test_a_virtual_token_method_refuses_to_share_the_model(case):
    method, cfg = METHOD_CASES[case]
    model, _ = make_model("attention")
    add_adapter(model, "a", method, ["proj"], **cfg)
    with pytest.raises(SpliceError, match="cannot share a model with other named adapters"):
        add_adapter(model, "b", "lora", ["query"], r=2)
    model, _ = make_model("attention")
    add_adapter(model, "a", "lora", ["query"], r=2)
    with pytest.raises(SpliceError, match="cannot share a model with other named adapters"):
        add_adapter(model, "b", method, ["proj"], **cfg)


def test_mixed_batch_under_inference_mode_equals_no_grad():
    """Inference tensors have no version counter; the shared sorted input must still work."""
    model, x = two_adapters("lora")
    with torch.no_grad():
        expected = model(x, adapter_names=ROW_NAMES)
    with torch.inference_mode():
        got = model(x.clone(), adapter_names=ROW_NAMES)  # an inference tensor reaches the layers
    assert torch.equal(got, expected)


def test_a_parallel_adapter_on_a_sublayer_refuses_to_share_but_a_serial_one_shares():
    """PA reads its sublayer's input through a hook that a mixed batch does not route."""
    model, _ = make_model("attention")
    add_adapter(model, "lora", "lora", ["query"], r=2)
    perturb(model, seed=1)
    with pytest.raises(SpliceError, match="reads its sublayer's input through a hook"):
        add_adapter(model, "pa", "parallel", ["query"], r=2, sublayer="ffn")
    add_adapter(model, "serial", "houlsby", ["query"], r=2, sublayer="ffn")
    perturb(model, seed=2)
    add_adapter(model, "serial2", "houlsby", ["query"], r=2, sublayer="ffn")  # a wrapped layer
    perturb(model, seed=3)
    x = KINDS["attention"][1]()
    x = torch.cat([x, x])
    names = ["serial", "serial2", "base", "lora"]  # rows 0/2 and 1/3 are the same input
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        reference = alone(model, x, names)
    assert torch.allclose(mixed, reference, atol=1e-5)
    assert not torch.allclose(reference[0], reference[2], atol=1e-4)  # serial acts
    assert not torch.allclose(reference[1], reference[3], atol=1e-4)  # serial2 ≠ lora


@pytest.mark.parametrize(("case", "calls"), [("ia3_ff", [2]), ("oft", [2, 2, 2]),
                                             ("lora", [6])])  # fmt: skip
def test_a_method_that_runs_the_base_itself_runs_it_once_per_row(case, calls):
    """IA³ on inputs (its fused function reads W, not the module) and OFT run the base layer
    on their own rows: no full-batch base output is computed beside them; the rows that get
    no adapter run the base layer alone (the batch sizes the base module sees)."""
    model, x = two_adapters(case)
    seen = []
    layer = model.layers[0]["proj"]
    layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        mixed = model(x, adapter_names=ROW_NAMES)
        assert sorted(seen) == calls
        assert torch.allclose(mixed, alone(model, x, ROW_NAMES), atol=1e-5)
