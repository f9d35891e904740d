"""Writing a merged model: an HF model dir with the merged shards, the reference's config
(with what the merge changed), its tokenizer files and the ledger, renamed into place only on
success."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from splice.io import CheckpointWriter
from splice.io._hash import DigestCache, hash_files
from splice.io.writer import AUX_FILES
from splice.merge.engine import Checked, MergeJob, MergeOptions, Source, execute
from splice.merge.output.fidelity import OutputCheck
from splice.merge.output.ledger import (
    LEDGER_NAME,
    StreamHasher,
    build_ledger,
    input_files,
    unhashed,
)
from splice.merge.recipe import Recipe, recipe_json

__all__ = ["output_config", "write_model"]


def write_model(
    recipe: Recipe, job: MergeJob, checked: Checked, out: Path, opts: MergeOptions
) -> Path:
    """Merge ``checked.tasks`` into an HF model dir at ``out``, atomically, with its ledger.

    Raises:
        SpliceError: NaN/Inf in an input or the output, an input changed on disk during the
            merge, ``out`` exists without ``opts.force``.
    """
    from splice import __version__

    checksums = opts.checksums
    tasks = checked.tasks
    meta = {
        "splice.version": __version__,
        "splice.method": recipe.method,
        "splice.seed": str(job.seed),
        "splice.recipe": recipe_json(recipe),
    }
    ref = job.base or job.models[0]
    ref_dir = getattr(ref.weights, "dir", None)
    files_from = _tokenizer_dir(job, checked) or ref_dir
    inputs = recipe.input_paths()
    hasher = StreamHasher(job.sources(), DigestCache.default()) if checksums else None
    job.on_read = hasher.feed if hasher is not None else None
    check_output = OutputCheck()
    with CheckpointWriter(
        out,
        max_shard_size=opts.max_shard_size,
        force=opts.force,
        copy_files_from=files_from,
        metadata=meta,
        protect=inputs,
        layout=[
            (t.name, t.shape, (job.out_dtype or t.dtype) if t.merge else t.dtype) for t in tasks
        ],
        checksums=checksums,
    ) as writer:
        stats = execute(job, tasks, writer, progress=bool(opts.progress), on_output=check_output)
        added: dict[str, bytes] = {}
        config = output_config(job, checked, ref)
        if config is not None:
            added["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
        if files_from is not None and ref_dir is not None and files_from != ref_dir:
            gen = Path(ref_dir) / "generation_config.json"
            if gen.is_file():
                added["generation_config.json"] = gen.read_bytes()
        if job.tokens is not None:  # tokenizer surgery: the output tokenizer's files
            added.update(job.tokens.tokenizer_files)
        for name, content in added.items():
            writer.add_file(name, content)
        job.check_unchanged()
        outputs = _output_hashes(writer, files_from, added, checksums)
        digests = {
            s.label: hasher.digests(input_files(s))
            if hasher is not None
            else unhashed(input_files(s))
            for s in job.sources()
        }
        ledger = build_ledger(
            job=job,
            checked=checked,
            recipe=recipe.source,
            method=recipe.method,
            stats=stats,
            digests=digests,
            outputs=outputs,
            fidelity=check_output.summary(),
        )
        writer.add_file(LEDGER_NAME, json.dumps(ledger, indent=1) + "\n")
    return out


def _tokenizer_dir(job: MergeJob, checked: Checked) -> Path | None:
    """Under a vocab policy, the dir of the input whose rows were kept (its tokenizer)."""
    if checked.vocab is None:
        return None
    label = checked.vocab["tokenizer_from"]
    src = next(s for s in job.sources() if s.label == label)
    return getattr(src.weights, "dir", None)


def output_config(job: MergeJob, checked: Checked, ref: Source) -> dict[str, Any] | None:
    """The reference's config.json with what the merge changed: dtype, vocab size, ties."""
    if ref.config is None:
        return None
    config = dict(ref.config)
    if job.out_dtype is not None:
        config["torch_dtype"] = str(job.out_dtype).removeprefix("torch.")
    if checked.vocab is not None:
        config["vocab_size"] = checked.vocab["vocab_size"]
    if checked.untied:
        config["tie_word_embeddings"] = False
    rewritten = getattr(ref.weights, "rewrites_config", False)  # layer slices
    return config if config != ref.config or checked.vocab is not None or rewritten else None


def _output_hashes(
    writer: Any, files_from: Path | None, added: Mapping[str, bytes], checksums: bool = True
) -> dict[str, str | None]:
    """SHA-256 of every output file but the ledger, before the temp dir is renamed.

    Shards were hashed as they were written (:meth:`CheckpointWriter.shard_digests`); copied
    and added files are hashed from their sources. The index is derived from the shards and
    is not hashed.
    """
    copied = [Path(files_from) / a for a in AUX_FILES if a not in added] if files_from else []
    copied = [p for p in copied if p.is_file()]
    if not checksums:
        finals = [final for _, final in writer.shard_files()]
        return dict.fromkeys(sorted([*finals, *(p.name for p in copied), *added]))
    out: dict[str, str | None] = dict(writer.shard_digests())
    for p, h in hash_files(copied).items():
        out[Path(p).name] = h
    for name, content in added.items():
        out[name] = hashlib.sha256(content).hexdigest()
    return dict(sorted(out.items()))
