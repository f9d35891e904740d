"""Adapter inputs keyed by the base's tensor names (a step of the preflight).

An adapter trained on a task-head class (``bert.encoder.…``, what ``splice train`` and peft
write for ``BertForSequenceClassification``) merged into a base saved as the bare model
(``encoder.…``, MiniLM's checkpoint), or the reverse: every LoRA target is renamed across the
one wrapper prefix that maps them all (:func:`splice.deltas.wrapper.wrapper_map`, as
``transformers`` does between the two classes), and the ledger notes each rename. A module the
adapter saves whole (``modules_to_save``) that the base lacks, such as the new task head, is
dropped under ``allow_missing`` (listed in the ledger) and an error otherwise.
"""

from __future__ import annotations

from collections.abc import Collection

from splice.deltas.wrapper import wrapper_map
from splice.errors import SpliceError
from splice.merge.engine.job import Checked, Dropped, MergeJob, Source

__all__ = ["fit_adapter_names"]


def fit_adapter_names(job: MergeJob, ref: Source, names: Collection[str], out: Checked) -> None:
    """Rename every model input's deltas and saved modules to ``names`` (the reference's).

    Renames go to ``out.notes``, dropped task heads to ``out.dropped``; the inputs' ``deltas``,
    ``overrides`` and ``raw`` are re-keyed in place (a second call changes nothing).

    Raises:
        SpliceError: a LoRA target that no wrapper prefix maps to a base name; a saved module
            the base lacks, without ``allow_missing``.
    """
    names = set(names)
    model_type = (ref.config or {}).get("model_type")
    for src in job.models:
        wrapper = wrapper_map(list(src.deltas), names, model_type)
        lost = next((n for n in src.deltas if n not in names and wrapper is None), None)
        if lost is not None:
            raise SpliceError(
                f"adapter targets {lost!r}, which is not in the base {ref.label}, nor under a "
                "task-head wrapper prefix (such as 'bert.' or 'model.')",
                where=src.label,
                fix=f"use the base model the adapter was trained on{_named_base(src)}",
            )
        if wrapper is not None:
            rename = {n: wrapper.to_base(n, names) for n in (*src.deltas, *src.overrides)}
            for old, new in rename.items():
                if old != new:
                    why = f"{wrapper.describe()} to match {ref.label}"
                    out.note(new, f"{src.label} names it {old!r} ({why})")
            _rename(src, rename)
        heads = [n for n in src.overrides if n not in names]
        if heads and not job.allow_missing:
            raise SpliceError(
                f"the adapter saves {heads[0]!r} whole (modules_to_save, e.g. a new task "
                f"head), and the base {ref.label} has no such tensor",
                where=src.label,
                fix="pass --allow-missing (allow_missing=True) to merge without it (the "
                "ledger lists it as dropped), or use a base that has this module",
            )
        for n in heads:
            for raw in (src.raw or {}).get(n, [n]):
                out.dropped.append(
                    Dropped(src.label, raw, f"{n} is not in {ref.label} (--allow-missing)")
                )


def _rename(src: Source, rename: dict[str, str]) -> None:
    src.deltas = {rename[n]: d for n, d in src.deltas.items()}
    src.overrides = {rename[n]: t for n, t in src.overrides.items()}
    if src.raw is not None:
        src.raw = {rename.get(n, n): stored for n, stored in src.raw.items()}


def _named_base(src: Source) -> str:
    config = src.checkpoints[-1].config if src.checkpoints else None
    named = (config or {}).get("base_model_name_or_path")
    return f" (its adapter_config.json names {named})" if named else ""
