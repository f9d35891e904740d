"""Tiny models, one per adaptable layer kind, and the method table of the contract battery."""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
from torch import nn

from splice.adapters import METHODS

N_LAYERS = 3


@functools.cache
def _method_cases() -> dict[str, tuple[str, dict[str, Any]]]:
    """case → (method, options), gathered from ``CONTRACT_CASES`` in each registered method's
    own test file ``test_<method>.py``: a new method joins the battery from its test file."""
    cases: dict[str, tuple[str, dict[str, Any]]] = {}
    for method in METHODS.names():
        module = importlib.import_module(f"{__package__}.test_{method}")
        own = getattr(module, "CONTRACT_CASES", None)
        assert own, f"{module.__file__} must declare CONTRACT_CASES for the contract battery"
        for case, options in own.items():
            assert case not in cases, f"contract case {case!r} declared twice"
            cases[case] = (method, options)
    return cases


def __getattr__(name: str) -> Any:
    # METHOD_CASES is built on first use: the method test files import this module
    if name == "METHOD_CASES":
        return _method_cases()
    raise AttributeError(name)


def _conv1d_gpt2(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(nf, nx)


class _TinyBert(nn.Module):
    """A one-layer random BERT encoder returning its last hidden state: attention sites."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=12, max_position_embeddings=16, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)  # fmt: skip
        self.bert = BertModel(cfg, add_pooling_layer=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids).last_hidden_state


# kind → (layer factory, input factory); d_in ≠ d_out everywhere to catch transposes
KINDS = {
    "linear": (lambda: nn.Linear(8, 12), lambda: torch.randn(2, 5, 8)),
    "conv1d_gpt2": (lambda: _conv1d_gpt2(8, 12), lambda: torch.randn(2, 5, 8)),
    "embedding": (lambda: nn.Embedding(20, 8, padding_idx=0), lambda: torch.randint(0, 20, (2, 5))),
    "conv1x1": (lambda: nn.Conv2d(4, 6, 1), lambda: torch.randn(2, 4, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 6, 6)),
}
KINDS["attention"] = (_TinyBert, lambda: torch.randint(0, 20, (2, 5)))
SITE_KIND = {"conv1x1": "conv", "conv3x3": "conv"}


class Stack(nn.Module):
    """``layers.{i}.proj`` for i < N_LAYERS, all of one kind, outputs summed (plus a head)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        make = KINDS[kind][0]
        self.layers = nn.ModuleList(nn.ModuleDict({"proj": make()}) for _ in range(N_LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer["proj"](x).tanh() for layer in self.layers)


def make_model(kind: str, seed: int = 0) -> tuple[Stack, torch.Tensor]:
    torch.manual_seed(seed)
    model = Stack(kind).eval()
    return model, KINDS[kind][1]()


def perturb(model: nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Move every trainable parameter off its init so ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
