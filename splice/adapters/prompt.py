"""Prompt tuning (Lester et al., 2021) — ``tokens`` learned input embeddings put before every
sequence, through the same :class:`splice.adapters._attention.InputHook` as prefix tuning
(its embedding-input side). Init ``"random"`` (N(0, 1), as peft), ``"vocab"`` (embeddings of
random vocabulary tokens) or ``"text"``: the embeddings of ``init_text`` tokenised with the
``tokenizer`` dir, repeated to ``tokens`` (peft's ``TEXT`` init). The adapter sits on the
backbone's input embedding; with ``keep_virtual=False`` (default) the backbone's outputs drop
the virtual positions again, so hidden states and logits line up with the input tokens (peft
returns them, ``tokens`` longer). peft ``PROMPT_TUNING`` dirs load and are written
(``prompt_embeddings`` (l, d)). Trainable parameters: ``tokens · d``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pydantic
import torch
from torch import Tensor, nn

from splice.errors import SpliceError

from ._attention import HookedAdapter, InputHook, backbones_near
from ._sites import make_site
from .layer import METHODS, Adapter, Method, MethodConfig

__all__ = ["PromptAdapter", "PromptConfig", "PromptMethod", "load_peft_prompt"]


class PromptConfig(MethodConfig):
    tokens: int = pydantic.Field(16, gt=0, description="virtual tokens l")
    init: Literal["random", "vocab", "text"] = "random"
    init_text: str | None = pydantic.Field(None, description="init='text': the text")
    tokenizer: str | None = pydantic.Field(None, description="init='text': a tokenizer dir")
    keep_virtual: bool = pydantic.Field(False, description="keep the virtual positions' outputs")


class PromptAdapter(HookedAdapter):
    """The virtual tokens' embeddings ``prompt`` (l, d); the embedding's output is unchanged."""

    changes = "a prompt adds input positions"

    def __init__(self, site: Any, cfg: PromptConfig, weight: Tensor | None) -> None:
        super().__init__(site)
        self.prompt = nn.Parameter(_init(cfg, weight, site.d_out))

    def embeddings(self) -> Tensor:
        return self.prompt


def _init(cfg: PromptConfig, weight: Tensor | None, d: int) -> Tensor:
    """The initial (l, d) prompt (from the vocabulary ``weight`` (V, d) unless random)."""
    if cfg.init == "random":
        return torch.randn(cfg.tokens, d)
    if weight is None:
        raise SpliceError(f"init={cfg.init!r} needs the model's input embedding")
    vocab = weight.shape[0]
    if cfg.init == "vocab":
        return weight[torch.randint(0, vocab, (cfg.tokens,))].detach().float().clone()
    if not cfg.init_text or not cfg.tokenizer:
        raise SpliceError("init='text' needs init_text and tokenizer", fix="pass both options")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(cfg.tokenizer)(cfg.init_text, add_special_tokens=False)
    ids = list(ids["input_ids"])
    if not ids:
        raise SpliceError(f"init_text {cfg.init_text!r} has no tokens")
    ids = (ids * (cfg.tokens // len(ids) + 1))[: cfg.tokens]
    return weight[torch.tensor(ids)].detach().float().clone()


class PromptMethod(Method):
    """Sites: the input embedding of each backbone holding a matched module."""

    shares_model = False

    pretty_name = "Prompt tuning"
    reference_url = "https://arxiv.org/abs/2104.08691"
    family = "additive"
    Config = PromptConfig
    kinds = frozenset({"attention"})  # a transformer backbone's (its site: the input embedding)
    mergeable = False
    lowrank = False
    identity_at_init = False

    def __init__(self) -> None:
        self.backbones: dict[str, str] = {}  # embedding site → backbone
        self.weights: dict[str, Tensor] = {}  # embedding site → its vocabulary (init)

    def find(self, model: nn.Module, targets, layers, cfg) -> list[tuple[str, nn.Module, Any]]:
        from .parallel import _matched

        found, names = [], {}
        matched = [name for name, _, _ in _matched(model, targets)]
        for backbone, module in backbones_near(model, matched):
            embedding = module.get_input_embeddings()
            names[next(n for n, m in model.named_modules() if m is embedding)] = backbone
        for full in names:
            module = model.get_submodule(full)
            site = make_site(full, module, None, "prompt")
            self.weights[full] = module.weight
            if site is None or site.kind != "embedding":
                raise SpliceError("the input embedding is not an nn.Embedding", where=full)
            found.append((full, module, site))
        self.backbones = names
        return found

    def build(self, sites, cfg: PromptConfig) -> list[Adapter]:
        return [self.adapter(site, cfg) for site in sites]

    def adapter(self, site, cfg) -> PromptAdapter:
        return PromptAdapter(site, cfg, self.weights.get(site.name))

    def attached(self, model: nn.Module, adapters: list[Adapter], cfg: PromptConfig) -> None:
        for a in adapters:
            backbone = model.get_submodule(self.backbones[a.site.name])
            a.hook = InputHook(backbone, cfg.tokens, prompt=_prompt_fn(a),
                               strip=not cfg.keep_virtual)  # fmt: skip

    def num_parameters(self, sites, cfg: PromptConfig) -> int:
        return sum(cfg.tokens * s.d_out for s in sites)

    def peft_files(self, model, base):
        return peft_prompt_files(model, base)


def _prompt_fn(adapter: PromptAdapter):
    def prompt(batch: int) -> Tensor:
        p = adapter.embeddings()
        return p.unsqueeze(0).expand(batch, -1, -1)

    return prompt


@METHODS.register("prompt")
class Prompt(PromptMethod):
    pass


# PEFT PROMPT_TUNING dirs -----------------------------------------------------------------------


def _prompt_adapters(model: nn.Module) -> list[PromptAdapter]:
    from .inject import adapter_layers

    return [lay.adapter for lay in adapter_layers(model).values()
            if isinstance(lay.adapter, PromptAdapter)]  # fmt: skip


def peft_prompt_files(model: nn.Module, base: dict[str, Any]) -> tuple[dict, dict[str, Tensor]]:
    """``adapter_config.json`` and ``{"prompt_embeddings": (l, d)}`` of a prompt model."""
    from .prefix import _task_type

    adapters = _prompt_adapters(model)
    if len(adapters) != 1:
        raise SpliceError("peft prompt dirs hold one transformers model's prompt")
    with torch.no_grad():
        emb = adapters[0].embeddings().detach().float().contiguous()
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": _task_type(model),
        "base_model_name_or_path": base.get("base_model"),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": emb.shape[0],
        "token_dim": emb.shape[1],
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",
    }
    if base.get("model_class"):
        config["auto_mapping"] = {"base_model_class": base["model_class"]}
    return config, {"prompt_embeddings": emb}


def load_peft_prompt(model: nn.Module, path: Path) -> nn.Module:
    """Inject ``prompt`` into ``model`` and fill it from a peft ``PROMPT_TUNING`` (or, once
    materialised, ``P_TUNING``) dir.

    Raises:
        SpliceError: an encoder-decoder dir, or a width that differs from the model's.
    """
    from safetensors.torch import load_file

    from .inject import inject

    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise SpliceError("encoder-decoder prompts are not supported", where=str(path))
    emb = load_file(str(path / "adapter_model.safetensors"))["prompt_embeddings"]
    inject(model, "prompt", ".*", tokens=int(cfg["num_virtual_tokens"]))
    (adapter,) = _prompt_adapters(model)
    if emb.shape != adapter.prompt.shape:
        raise SpliceError(
            f"peft prompt {tuple(emb.shape)} ≠ the model's {tuple(adapter.prompt.shape)}",
            where=str(path),
            fix="load it into the base model it was trained on",
        )
    with torch.no_grad():
        adapter.prompt.copy_(emb)
    return model
