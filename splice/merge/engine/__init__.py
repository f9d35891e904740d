"""The merge engine: a job's data types (:mod:`.job`), its preflight (:mod:`.preflight`), the
streaming executor (:mod:`.executor`), the memory plan (:mod:`.memory`), architecture and
vocab handling (:mod:`.arch`, :mod:`.vocab`) and streaming statistics (:mod:`.stats`)."""

from splice.merge.engine.executor import execute
from splice.merge.engine.job import (
    Checked,
    Dropped,
    MergeJob,
    MergeOptions,
    Resolver,
    Sink,
    Source,
    TensorTask,
    layer_indices,
)
from splice.merge.engine.preflight import check, plan

__all__ = [
    "Checked",
    "Dropped",
    "MergeJob",
    "MergeOptions",
    "Resolver",
    "Sink",
    "Source",
    "TensorTask",
    "check",
    "execute",
    "layer_indices",
    "plan",
]
