"""Prefix tuning without the MLP re-parametrisation (``prefix_nomlp``, spec peft.md §16): each
attention layer learns its ``P_k, P_v`` (l, kv_dim) directly — the form every ``prefix`` adapter
is saved in, and the form peft ``PREFIX_TUNING`` dirs load into. The mechanics are
:mod:`.prefix`'s. Trainable parameters: ``2·l·kv_dim`` per layer."""

from __future__ import annotations

import pydantic

from .layer import METHODS
from .prefix import PrefixConfig, PrefixTuning

__all__ = ["NoMLPConfig"]


class NoMLPConfig(PrefixConfig):
    reparam: bool = pydantic.Field(False, description="train through the MLP (prefix)")


@METHODS.register("prefix_nomlp")
class PrefixNoMLP(PrefixTuning):
    pretty_name = "Prefix tuning (no MLP)"
    Config = NoMLPConfig
