"""The tensor ledger, ``splice-ledger.json`` in every merge output (DESIGN.md "What users keep
asking the peers for" §3; mergekit's silent tensor losses, USERS.md Part A row 4).

For every input tensor: *merged* (method, resolved parameters, block, layer), *copied* (from
which input, why) or *dropped* (why); plus the recipe, seed, splice version, options, the
architecture found, vocab and fidelity reports, and SHA-256 of every input and output file.
``coverage`` counts, per input, how many of its stored tensors the ledger accounts for: it is
100 % or the merge failed. The ledger is deterministic (no times, no host names), so the same
recipe and inputs give the same bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice.errors import SpliceError
from splice.io._hash import DigestCache, FollowHasher, hash_files

if TYPE_CHECKING:
    from splice.merge.engine import Checked, MergeJob, Source, TensorTask

__all__ = [
    "FORMAT",
    "LEDGER_NAME",
    "StreamHasher",
    "build_ledger",
    "hash_files",
    "hash_in_background",
    "raw_names",
    "unhashed",
]

LEDGER_NAME = "splice-ledger.json"
FORMAT = "splice.ledger/1"


def unhashed(paths: Iterable[Path]) -> dict[str, str | None]:
    """The ledger entry of files listed without checksums (``--no-checksums``)."""
    return dict.fromkeys(p.name for p in paths)


def hash_in_background(groups: Mapping[str, list[Path]]) -> Future[dict[str, dict[str, str]]]:
    """Hash every group's files in one thread while the merge runs: ``{group: {name: sha}}``.

    The inputs are read by the merge anyway (page cache); one thread and a 1 MB buffer keep
    the memory plan's fixed overhead small.
    """

    def run() -> dict[str, dict[str, str]]:
        return {
            key: {Path(k).name: v for k, v in sorted(hash_files(paths).items())}
            for key, paths in groups.items()
        }

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splice-hash")
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


class StreamHasher:
    """SHA-256 of input checkpoint files, following the merge's reads.

    Every tensor the engine reads (``feed``, the engine's ``on_read``) lets a worker thread
    hash its file up to that point, from the page cache the read just filled
    (:class:`~splice.io._hash.FollowHasher`): the merge never waits for a hash and does not
    read its inputs from disk twice. A file read out of order, or not completely, is hashed
    from disk at the end; the digest is the same either way. ``MergeJob.check_unchanged``
    confirms afterwards that no input changed during the merge. A file whose digest ``cache``
    (:class:`~splice.io._hash.DigestCache`) still trusts is not hashed at all, and the digests
    computed here are remembered in it.
    """

    def __init__(self, sources: Iterable[Source], cache: DigestCache | None = None) -> None:
        self._follow = FollowHasher()
        self._cache = cache
        self._started = time.time_ns()
        self._before: dict[Path, list[int] | None] = {}
        self._known: dict[Path, str] = {}
        for src in sources:
            files = input_files(src)
            for path in files if cache is not None else ():
                if (digest := cache.get(path)) is not None:
                    self._known[path] = digest
                else:
                    self._before[path] = cache.stamp(path)
            infos = getattr(src.weights, "infos", None)
            if infos is None or not any(src.weights is c for c in src.checkpoints):
                continue
            starts: dict[Path, int] = {}
            for info in infos():
                if info.file not in self._known:
                    starts[info.file] = min(starts.get(info.file, info.offset), info.offset)
            for path, start in starts.items():
                self._follow.track(path, ready=start)  # the header: hashed at once

    def feed(self, info: Any, raw: Any) -> None:
        """One tensor as read from disk (the bytes at ``info.offset`` of ``info.file``)."""
        self._follow.advance(info.file, info.offset, info.nbytes)

    def digests(self, paths: Iterable[Path]) -> dict[str, str]:
        """``{file name: sha256}`` for ``paths``, from the cache, else from the stream where it
        covered the file, else read from disk."""
        rest: list[Path] = []
        found: dict[Path, str] = {}
        for p in paths:
            digest = self._known.get(p) or self._follow.digest(p, p.stat().st_size)
            if digest is None:
                rest.append(p)
            else:
                found[p] = digest
        self._follow.close()
        found.update({Path(k): v for k, v in hash_files(rest).items()})
        if self._cache is not None:
            for p, digest in found.items():
                if p in self._before:
                    self._cache.put(p, self._before[p], self._started, digest)
            self._cache.save()
        return dict(sorted((p.name, d) for p, d in found.items()))


def input_files(src: Source) -> list[Path]:
    """The files an input is read from: weights, and its config or adapter config."""
    files: set[Path] = set()
    for ckpt in src.checkpoints:
        files.update(ckpt.files)
        if ckpt.dir is not None:
            for name in ("config.json", "adapter_config.json"):
                if (ckpt.dir / name).is_file():
                    files.add(ckpt.dir / name)
    return sorted(files)


def raw_names(ckpt: Any) -> dict[str, list[str]]:
    """``tensor name in the base -> names stored in the file`` for adapters and delta files.

    A PEFT LoRA's ``…q_proj.lora_A.weight`` and ``…lora_B.weight`` both map to
    ``…q_proj.weight``; a splice delta file's ``name::B`` and ``name::A`` to ``name``.
    """
    from splice.io.peft import peft_target_name

    out: dict[str, list[str]] = {}
    for name in ckpt.names():
        peft = ckpt.format == "peft"
        target = peft_target_name(name)[0] if peft else name.split("::", 1)[0]
        out.setdefault(target, []).append(name)
    return out


def _dump(params: Any) -> dict[str, Any]:
    return params.model_dump(by_alias=True, mode="json") if params is not None else {}


def _inputs_of(job: MergeJob, task: TensorTask) -> dict[str, Any]:
    """Per input label: the stored name(s) read for this output tensor, or None (base value)."""
    out: dict[str, Any] = {}
    if job.base is not None:
        out[job.base.label] = task.base_read or task.name
    for i, src in enumerate(job.models):
        read = task.name if task.reads is None else task.reads[i]
        names = [read] if read is not None and read in (src.weights or {}) else []
        names += (src.raw or {}).get(task.name, [])  # an adapter's or a delta file's names
        out[src.label] = names[0] if len(names) == 1 else (names or None)
    return out


def build_ledger(
    *,
    job: MergeJob,
    checked: Checked,
    recipe: Mapping[str, Any],
    method: str,
    stats: Mapping[str, Any],
    digests: Mapping[str, Mapping[str, str | None]],
    outputs: Mapping[str, str | None],
    fidelity: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ledger as a JSON-ready dict (module docstring).

    ``digests``: per input label, ``{file name: sha256}`` of its files (inputs without files,
    such as the zero base of an adapter merge, are left out); ``outputs``: ``{file name:
    sha256}``. Digests are None everywhere when checksums were turned off.

    Raises:
        SpliceError: an input tensor the ledger cannot account for (an engine bug: nothing
            may be lost silently).
    """
    from splice import __version__
    from splice.merge.engine.executor import COPIED_DIFFER

    sources = job.sources()
    differ: dict[str, list[str]] = dict(stats.get(COPIED_DIFFER, {}))
    param_sets: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    tensors = []
    for task in checked.tasks:
        entry: dict[str, Any] = {"name": task.name, "block": task.block}
        if task.layer is not None:
            entry["layer"] = task.layer
        read = _inputs_of(job, task)
        if task.merge:
            ps = {
                "params": _dump(task.params),
                "model_params": [_dump(p) for p in task.model_params or []],
            }
            key = repr(ps)
            if key not in index:
                index[key] = len(param_sets)
                param_sets.append(ps)
            entry.update(action="merged", param_set=index[key])
        else:
            src = sources[task.copy_from]
            why = "integer buffer, equal in every input that stores it"
            if task.dtype.is_floating_point:
                why = "missing in some inputs (--allow-missing)"
            elif task.name in differ:
                why = f"integer buffer; differs in {', '.join(differ[task.name])} (--allow-missing)"
            entry.update(action="copied", **{"from": src.label}, reason=why)
        entry["inputs"] = read
        if task.name in checked.notes:
            entry["notes"] = checked.notes[task.name]
        tensors.append(entry)
    dropped = [{"input": d.source, "name": d.name, "reason": d.reason} for d in checked.dropped]
    ledger: dict[str, Any] = {
        "format": FORMAT,
        "splice_version": __version__,
        "method": method,
        "seed": job.seed,
        "recipe": dict(recipe),
        "options": {
            "allow_missing": job.allow_missing,
            "vocab": job.vocab,
            "dtype": str(job.dtype).removeprefix("torch.") if job.dtype else None,
            "out_dtype": str(job.out_dtype).removeprefix("torch.") if job.out_dtype else None,
            "transforms": [{"name": t.name, **_dump(p)} for t, p in job.transforms],
        },
        "inputs": [
            {
                "label": s.label,
                "role": "base" if s is job.base else "adapter" if s.weights is None else "model",
                "path": s.label,
                "files": dict(digests[s.label]),
            }
            for s in sources
            if s.label in digests
        ],
        "architecture": checked.arch.summary(),
        "param_sets": param_sets,
        "tensors": tensors,
        "dropped": dropped,
        "coverage": coverage(job, tensors, dropped),
        "vocab": checked.vocab,
        "fidelity": fidelity,
        "outputs": dict(outputs),
        "checksums": "sha256" if any(outputs.values()) else None,
    }
    if extra:
        ledger.update(extra)
    return ledger


def coverage(
    job: MergeJob, tensors: list[dict[str, Any]], dropped: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per input: stored tensors, and how many the ledger says were merged/copied/dropped.

    Raises:
        SpliceError: some stored tensor is accounted for nowhere.
    """
    out: dict[str, Any] = {}
    for src in job.sources():
        stored = set(_stored_names(src))
        seen: dict[str, str] = {}
        for entry in tensors:
            names = entry["inputs"].get(src.label)
            for n in [names] if isinstance(names, str) else names or []:
                seen.setdefault(n, entry["action"])
        for d in dropped:
            if d["input"] == src.label:
                seen.setdefault(d["name"], "dropped")
        lost = sorted(stored - set(seen))
        if lost:
            raise SpliceError(
                f"{len(lost)} input tensor(s) are in no output and not recorded as dropped, "
                f"e.g. {lost[0]!r}",
                where=src.label,
                fix="this is a splice bug; please report it with the recipe",
            )
        counts = {
            a: sum(1 for n in stored if seen[n] == a) for a in ("merged", "copied", "dropped")
        }
        out[src.label] = {"tensors": len(stored), **counts}
    return out


def _stored_names(src: Source) -> list[str]:
    return [*(src.weights or []), *(n for names in (src.raw or {}).values() for n in names)]
