"""Checkpoint I/O: lazy safe reading, atomic sharded writing, PEFT adapter dirs."""

from splice.io._dtypes import DTypeLike, dtype_name, is_floating, itemsize, to_torch
from splice.io._safetensors import TensorInfo
from splice.io._units import human_bytes, human_count, parse_size
from splice.io.atomic import atomic_dir
from splice.io.checkpoint import Checkpoint, open_checkpoint
from splice.io.writer import CheckpointWriter

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "DTypeLike",
    "TensorInfo",
    "atomic_dir",
    "dtype_name",
    "human_bytes",
    "human_count",
    "is_floating",
    "itemsize",
    "open_checkpoint",
    "parse_size",
    "to_torch",
]
