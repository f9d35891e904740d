"""mergekit's tokenizer surgery in a recipe: ``tokenizer_source:`` and the ``tokenizer:`` block.

``tokenizer_source: base`` keeps the base's vocabulary (splice's ``vocab: base``);
``union`` builds the union of every input's vocabulary, and a model path takes that model's
tokenizer. The ``tokenizer:`` block adds per-token sources (``{source: <model>}`` copies the
token's row from that model, ``{source: {kind: model_token, model, token | token_id}}`` from
another token, ``{source: {kind: zero}}`` a zero row; ``force: true`` overrides a row the
merge would make) and ``pad_to_multiple_of``. Tokens are matched **by string** (the
tokenizers' vocabularies are read); :mod:`splice.merge.engine.vocab` re-indexes every
embedding and head row to the output vocabulary before the merge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError, model_validator

from splice._schema import Strict
from splice.errors import SpliceError
from splice.merge.recipe.where import Where

__all__ = ["TokenSource", "TokenizerSpec", "parse_tokenizer"]


class _ModelToken(Strict):
    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _one(self) -> _ModelToken:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of token and token_id")
        return self


class _Zero(Strict):
    kind: Literal["zero"]


class _Token(Strict):
    source: _ModelToken | _Zero | str | None = None
    force: bool = False


class _Block(Strict):
    source: str = "union"
    tokens: dict[str, _Token] | None = None
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class TokenSource:
    """Where one output token's embedding rows come from."""

    kind: Literal["model_token", "zero", "default"]
    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False
    where: str = ""


@dataclass
class TokenizerSpec:
    """The output vocabulary (``source``), per-token row sources and row padding."""

    source: str
    """``"base"``, ``"union"`` or a model path."""
    tokens: dict[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    where: str = ""


def parse_tokenizer(source: str | None, block: Any, where: Where) -> TokenizerSpec | None:
    """The recipe's tokenizer settings; None when the recipe has neither key."""
    if source is not None and block is not None:
        raise SpliceError(
            "tokenizer_source: and tokenizer: are exclusive",
            where=where("tokenizer"),
            fix="put the source in the block: tokenizer: {source: ...}",
        )
    if block is None:
        return None if source is None else TokenizerSpec(source, where=where("tokenizer_source"))
    try:
        b = _Block.model_validate(block)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if "[" not in str(x) and x != "kind")
        raise SpliceError(
            f"tokenizer.{loc}: {err['msg']}",
            where=where("tokenizer", *err["loc"][:2]),
            fix="tokens: {<token>: {source: <model> | {kind: model_token, model, token} | "
            "{kind: zero}, force: bool}}",
        ) from None
    if b.pad_to_multiple_of is not None and b.pad_to_multiple_of < 1:
        raise SpliceError(
            f"pad_to_multiple_of: {b.pad_to_multiple_of} must be >= 1",
            where=where("tokenizer", "pad_to_multiple_of"),
        )
    tokens = {}
    for tok, t in (b.tokens or {}).items():
        w = where("tokenizer", "tokens", tok)
        s = t.source
        if s is None:
            tokens[tok] = TokenSource("default", force=t.force, where=w)
        elif isinstance(s, str):
            tokens[tok] = TokenSource("model_token", s, tok, force=t.force, where=w)
        elif isinstance(s, _Zero):
            tokens[tok] = TokenSource("zero", force=t.force, where=w)
        else:
            tokens[tok] = TokenSource("model_token", s.model, s.token, s.token_id, t.force, w)
    return TokenizerSpec(b.source, tokens, b.pad_to_multiple_of, where("tokenizer"))
