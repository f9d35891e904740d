"""``splice._schema``: pydantic errors as one-line :class:`SpliceError` messages."""

from __future__ import annotations

import pydantic
import pytest

from splice._schema import Strict, validate
from splice.errors import SpliceError


class Opts(Strict):
    steps: int = pydantic.Field(8, gt=0)
    mode: str = "a"


def _message(values: dict, **error: object) -> str:
    with pytest.raises(SpliceError) as info:
        validate(Opts, values, **error)
    return str(info.value)


def test_value_error_names_the_field_and_optionally_the_value_given():
    assert _message({"steps": 0}, prefix="opt ").startswith("opt steps: Input should be greater")
    shown = _message({"steps": 0}, prefix="opt ", show_input=True)
    assert shown.startswith("opt steps=0: Input should be greater than 0"), shown
    assert "\n" not in shown


def test_unknown_key_names_the_closest_known_one_and_never_shows_a_value():
    msg = _message({"stpes": 3}, known=["steps", "mode"], show_input=True)
    assert "unknown key 'stpes'" in msg and "steps" in msg and "=3" not in msg


def test_valid_values_pass_through_with_defaults_filled():
    assert validate(Opts, {"steps": 2}) == Opts(steps=2, mode="a")
