"""Target matching (suffixes, regex, layer indices) and loud failures where peft is silent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from splice import adapters
from splice._names import layer_index
from splice.adapters import METHODS, adapter_layers, inject
from splice.errors import SpliceError

from .conftest import make_model


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            nn.ModuleDict(
                {"query": nn.Linear(4, 4), "value": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}
            )
            for _ in range(4)
        )
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("name", "index"),
    [("encoder.layer.3.attention.self.query", 3), ("transformer.h.11.attn.c_attn", 11),
     ("model.layers.0.mlp", 0), ("embed", None), ("block3.fc", None)],
)  # fmt: skip
def test_layer_index_parsed_from_module_names(name, index):
    assert layer_index(name) == index


def test_suffix_targets_and_layer_selection():
    model = inject(Encoder(), "lora", ["query", "value"], layers=[1, 3])
    assert sorted(adapter_layers(model)) == [
        f"encoder.layer.{i}.{m}" for i in (1, 3) for m in ("query", "value")
    ]


def test_regex_targets_match_full_names():
    model = inject(Encoder(), "lora", r"encoder\.layer\.[02]\.query")
    assert sorted(adapter_layers(model)) == ["encoder.layer.0.query", "encoder.layer.2.query"]


def test_target_matching_nothing_is_an_error_with_a_hint():
    with pytest.raises(SpliceError, match=r"'quey' matches no module.*did you mean \['query'\]"):
        inject(Encoder(), "lora", ["query", "quey"])


def test_matching_a_non_adaptable_module_is_an_error():
    with pytest.raises(SpliceError, match="LayerNorm, not an adaptable layer"):
        inject(Encoder(), "lora", ["query", "norm"])


def test_layers_selecting_nothing_is_an_error():
    with pytest.raises(SpliceError, match="leaves no module"):
        inject(Encoder(), "lora", ["query"], layers=[9])


def test_unknown_method_and_option_and_bad_value():
    with pytest.raises(SpliceError, match="did you mean 'lora'"):
        inject(Encoder(), "lorra", ["query"])
    with pytest.raises(SpliceError, match=r"unknown lora option 'alpah'.*did you mean 'alpha'"):
        inject(Encoder(), "lora", ["query"], alpah=3)
    with pytest.raises(SpliceError, match="option 'r'"):
        inject(Encoder(), "lora", ["query"], r=0)


def test_second_injection_is_refused():
    model = inject(Encoder(), "lora", ["query"])
    with pytest.raises(SpliceError, match="already has adapters"):
        inject(model, "nola", ["value"])


def test_modules_to_save_train_and_the_rest_is_frozen():
    model = inject(Encoder(), "lora", ["query"], modules_to_save=["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(n.startswith("head.") or ".adapter." in n for n in trainable)
    with pytest.raises(SpliceError, match="modules_to_save"):
        inject(Encoder(), "lora", ["query"], modules_to_save=["heads"])


def test_every_method_file_registers_its_own_name():
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert cls.__module__ == f"splice.adapters.{name}"
        assert cls.pretty_name and cls.reference_url.startswith("https://")
    assert {"ept", "lora", "mola", "mos", "nola"} <= set(METHODS.names())  # none lost
    infrastructure = {"files", "inject", "layer"}
    files = {p.stem for p in Path(adapters.__file__).parent.glob("[!_]*.py")} - infrastructure
    assert files == set(METHODS.names())  # every method file registers, and only those


def test_plain_torch_use_does_not_import_transformers():
    code = (
        "import sys, torch\n"
        "from splice.adapters import inject, merge_adapters\n"
        "m = inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), 'nola', ['0'], k=4, l=4)\n"
        "merge_adapters(m)\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_adapted_layer_exposes_base_weight_and_device():
    model, _ = make_model("linear")
    inject(model, "lora", ["proj"])
    assert model.layers[0]["proj"].adapter.lora_A.device == torch.device("cpu")
    assert model.layers[0]["proj"].weight is model.layers[0]["proj"].base_layer.weight
