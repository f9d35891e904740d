"""The tiny HF model of tests/test_train.py, as a fixture for the CUDA training test."""

from tests.test_train import bert_dir  # noqa: F401
