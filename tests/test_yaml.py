"""The strict recipe YAML loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splice._yaml import load_yaml
from splice.errors import SpliceError

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def test_plain_yaml_loads() -> None:
    assert load_yaml("method: ties\nparams: {density: 0.2}\nmodels: [a, b]\n") == {
        "method": "ties",
        "params": {"density": 0.2},
        "models": ["a", "b"],
    }


def test_a_few_aliases_are_fine() -> None:
    assert load_yaml("p: &p {w: 1}\nq: *p\n") == {"p": {"w": 1}, "q": {"w": 1}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("method: ties\nmethod: dare\n", "duplicate key 'method'"),
        ("params: {density: 1, density: 2}\n", "duplicate key 'density'"),
        ("m: !!python/object/apply:os.system [touch x]\n", "could not determine a constructor"),
        ("m: !!python/name:os.system\n", "could not determine a constructor"),
        ("m: [\n", "not valid YAML"),
        ("? [a]\n: 1\n", "mapping keys must be scalars"),
        (BOMB, "aliases"),
    ],
)
def test_refused(text: str, message: str) -> None:
    with pytest.raises(SpliceError, match=message) as info:
        load_yaml(text)
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(SpliceError, match="not UTF-8"):
        load_yaml(p)
    with pytest.raises(SpliceError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_text_raises_only_splice_error(text: str) -> None:
    try:
        load_yaml(text)
    except SpliceError as e:
        assert "\n" not in str(e)
