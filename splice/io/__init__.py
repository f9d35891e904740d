"""Checkpoint I/O: lazy safe reading, atomic sharded writing, PEFT adapter dirs."""

from splice.io._safetensors import TensorInfo
from splice.io._units import human_bytes, human_count, parse_size
from splice.io.atomic import atomic_dir
from splice.io.checkpoint import Checkpoint, open_checkpoint
from splice.io.writer import CheckpointWriter

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "TensorInfo",
    "atomic_dir",
    "human_bytes",
    "human_count",
    "open_checkpoint",
    "parse_size",
]
