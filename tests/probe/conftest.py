"""Module-scoped tiny models for the probe tests."""

from __future__ import annotations

import pytest

from tests.probe._models import tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()
