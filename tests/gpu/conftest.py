"""The tiny HF model of tests/train/test_train.py, as a fixture for the CUDA training test."""

from tests.train.test_train import bert_dir  # noqa: F401
