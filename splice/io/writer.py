"""Atomic, streaming, sharded safetensors writer.

Tensors are appended to the current shard's data file as they arrive (memory stays one
tensor); when a shard is full its header is written and the data copied behind it. Everything
happens in a temp dir beside the destination, renamed into place only when the block exits
cleanly. An exception (or Ctrl-C) removes the temp dir: the destination is either untouched
or complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from splice._lazy import lazy_import
from splice.errors import SpliceError
from splice.io._direct import StagedFile, _pwrite_all
from splice.io._dtypes import DTypeLike, itemsize, safetensors_code
from splice.io._hash import hash_files
from splice.io._hints import start_writeback
from splice.io._safetensors import check_tensor_name
from splice.io._units import parse_size
from splice.io.atomic import new_temp_dir, swap_in

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch", globals())

__all__ = ["AUX_FILES", "CheckpointWriter", "check_no_overlap"]

AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def check_no_overlap(dest: Path, protect: list[str | Path] | tuple[str | Path, ...]) -> None:
    """Refuse an output that is, contains, or lies inside one of the ``protect`` paths."""
    out = dest.resolve()
    for p in protect:
        inp = Path(p).resolve()
        if out == inp or out.is_relative_to(inp) or inp.is_relative_to(out):
            raise SpliceError(
                f"output overlaps the input {p}",
                where=str(dest),
                fix="write the output to a new directory; inputs are never modified",
            )


def _shard_name(i: int, total: int) -> str:
    """The file name of shard ``i`` of ``total`` (HF's convention)."""
    return "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"


def _header_bytes(entries: dict[str, dict[str, object]], metadata: dict[str, str]) -> bytes:
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return t.reshape(-1).view(torch.uint8).numpy().data


class _PlannedShard:
    """A shard whose tensors are known up front: header first, data written in place.

    Tensors that arrive in file order are staged and written around the page cache and
    hashed on the way (:class:`~splice.io._direct.StagedFile`); the first one out of order
    ends that, and it and the rest are written in place through the page cache (the digest is
    then read back from the file).
    """

    def __init__(
        self,
        path: Path,
        layout: list[tuple[str, tuple[int, ...], DTypeLike]],
        meta: dict,
        sha: bool = False,
    ) -> None:
        self.path = path
        self.entries: dict[str, dict[str, object]] = {}
        self.size = 0
        for name, shape, dtype in layout:
            n = math.prod(shape) * itemsize(dtype)
            self.entries[name] = {
                "dtype": safetensors_code(dtype),
                "shape": list(shape),
                "data_offsets": [self.size, self.size + n],
            }
            self.size += n
        header = _header_bytes(self.entries, meta)
        self.start = len(header)
        self.pending = set(self.entries)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.start + self.size)
        self.stream = StagedFile(path, self.fd, self.start + self.size, sha=sha, head=header)

    @property
    def digest(self) -> str | None:
        """SHA-256 of the whole file when every byte came in order (``sha=True``), else None."""
        return self.stream.digest

    def add(self, name: str, t: torch.Tensor) -> None:
        entry = self.entries[name]
        if list(t.shape) != entry["shape"] or safetensors_code(t.dtype) != entry["dtype"]:
            raise SpliceError(
                f"tensor {name!r} is {tuple(t.shape)} {t.dtype}, planned as "
                f"{tuple(entry['shape'])} {entry['dtype']}"
            )
        begin = self.start + entry["data_offsets"][0]
        view = _tensor_bytes(t)
        if self.stream.open and begin == self.stream.written:
            self.stream.append(view)
        else:
            self.stream.abandon()
            _pwrite_all(self.fd, view, begin)
            start_writeback(self.fd, begin, len(view))
        self.pending.discard(name)

    def finish(self) -> None:
        if self.pending:
            raise SpliceError(
                f"{len(self.pending)} planned tensor(s) never written, e.g. "
                f"{sorted(self.pending)[0]!r}"
            )
        self.stream.abandon()  # a no-op when complete
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        self.stream.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Shard:
    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self.fh = open(data_path, "wb")  # noqa: SIM115 - closed in finish()
        self.entries: dict[str, dict[str, object]] = {}
        self.size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if n:
            self.fh.write(_tensor_bytes(t))
        self.entries[name] = {
            "dtype": safetensors_code(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [self.size, self.size + n],
        }
        self.size += n

    def finish(self, final: Path, metadata: dict[str, str]) -> None:
        self.fh.close()
        with open(final, "wb") as out, open(self.data_path, "rb") as data:
            out.write(_header_bytes(self.entries, metadata))
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        self.data_path.unlink()

    def close(self) -> None:
        self.fh.close()


class CheckpointWriter:
    """Write an HF-style model dir atomically: ``with CheckpointWriter(dest) as w: w.write(...)``.

    Args:
        dest: destination directory.
        max_shard_size: bytes per shard, int or human units ("2GB", "500MB").
        force: replace an existing ``dest``; without it an existing ``dest`` is an error.
        copy_files_from: dir whose config/tokenizer/generation files are copied into ``dest``.
        metadata: string metadata stored in every shard's header (recipe, seed, version).
        protect: input paths the output must not overwrite: ``dest`` may not be one of them,
            lie inside one, or contain one.
        layout: every ``(name, shape, dtype)`` to be written, in order, when known up front
            (the merge engine knows it from headers). Shards and headers are then laid out
            first and each tensor is written in place: no spill file, no second copy.
        checksums: with ``layout``, hash each shard from the bytes as they are written
            (:meth:`shard_digests`); shards written out of order are read back instead.

    Raises:
        SpliceError: ``dest`` exists without ``force``, ``dest`` overlaps a protected input,
            a name repeats, a dtype is unsupported.
    """

    def __init__(
        self,
        dest: str | Path,
        *,
        max_shard_size: int | str = "5GB",
        force: bool = False,
        copy_files_from: str | Path | None = None,
        metadata: dict[str, str] | None = None,
        protect: list[str | Path] | tuple[str | Path, ...] = (),
        layout: list[tuple[str, tuple[int, ...], DTypeLike]] | None = None,
        checksums: bool = False,
    ) -> None:
        self.dest = Path(dest)
        check_no_overlap(self.dest, protect)
        self.max_shard_size = parse_size(max_shard_size)
        self.force = force
        self.copy_files_from = Path(copy_files_from) if copy_files_from else None
        self.metadata = {"format": "pt", **(metadata or {})}
        if self.dest.exists() and not force:
            raise SpliceError(
                "destination already exists",
                where=str(self.dest),
                fix="choose another output path or pass --force to replace it",
            )
        if self.dest.exists() and not self.dest.is_dir():
            raise SpliceError("destination exists and is not a directory", where=str(self.dest))
        self._layout = layout
        self._checksums = checksums
        self._planned: dict[str, _PlannedShard] = {}
        self._tmp: Path | None = None
        self._shards: list[tuple[Path, dict[str, dict[str, object]], int]] = []
        self._current: _Shard | None = None
        self._names: set[str] = set()
        self._files: dict[str, bytes] = {}

    def __enter__(self) -> CheckpointWriter:
        try:
            self._tmp = new_temp_dir(self.dest)
            if self._layout is not None:
                self._plan_shards(self._layout)
        except OSError as e:
            raise SpliceError(
                f"cannot create output: {e.strerror}", where=str(self.dest.parent)
            ) from e
        return self

    def _plan_shards(self, layout: list[tuple[str, tuple[int, ...], DTypeLike]]) -> None:
        assert self._tmp is not None
        groups: list[list[tuple[str, tuple[int, ...], DTypeLike]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            check_tensor_name(name, str(self.dest))
            n = math.prod(shape) * itemsize(dtype)
            if groups[-1] and size + n > self.max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append((name, tuple(shape), dtype))
            size += n
        for i, group in enumerate(groups):
            path = self._tmp / f"part-{i:05d}.safetensors"
            shard = _PlannedShard(path, group, self.metadata, self._checksums)
            for name, _, _ in group:
                if name in self._planned:
                    raise SpliceError(f"tensor {name!r} planned twice", where=str(self.dest))
                self._planned[name] = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (moved to CPU, made contiguous) to the current shard."""
        if self._tmp is None:
            raise RuntimeError("use CheckpointWriter as a context manager")
        check_tensor_name(name, str(self.dest))
        if name in self._names:
            raise SpliceError(f"tensor {name!r} written twice", where=str(self.dest))
        if safetensors_code(tensor.dtype) is None:
            raise SpliceError(f"dtype {tensor.dtype} cannot be saved", where=name)
        self._names.add(name)
        t = tensor.detach().to("cpu").contiguous()
        if self._layout is not None:
            if name not in self._planned:
                raise SpliceError(f"tensor {name!r} is not in the planned layout")
            try:
                self._planned[name].add(name, t)
            except OSError as e:
                raise SpliceError(f"cannot write: {e.strerror}", where=str(self.dest)) from e
            return
        n = t.numel() * t.element_size()
        if self._current is not None and self._current.size + n > self.max_shard_size:
            self._close_shard()
        if self._current is None:
            self._current = _Shard(self._tmp / f"shard-{len(self._shards):05d}.data")
        try:
            self._current.add(name, t)
        except OSError as e:
            raise SpliceError(f"cannot write: {e.strerror}", where=str(self.dest)) from e

    def add_file(self, name: str, content: str | bytes) -> None:
        """Add a small file (ledger, config) to the output dir."""
        if Path(name).name != name:
            raise SpliceError(f"file name {name!r} must not contain directories")
        self._files[name] = content.encode() if isinstance(content, str) else content

    def shard_files(self) -> list[tuple[Path, str]]:
        """After the last :meth:`write`: each shard's file in the staging dir, in order, with the
        name it will have in ``dest`` — to hash the output before it is published. In spill
        mode the open shard is closed first (a later write starts a new shard)."""
        if self._tmp is None:
            raise RuntimeError("use CheckpointWriter as a context manager")
        if self._current is not None:
            self._close_shard()
        paths = [p for p, _, _ in self._shards] + [
            s.path for s in dict.fromkeys(self._planned.values())
        ]
        return [(p, _shard_name(i, len(paths))) for i, p in enumerate(paths)]

    def shard_digests(self) -> dict[str, str]:
        """After the last :meth:`write`: ``{final shard name: sha256}`` of every shard, hashed
        as it was written (``checksums=True``, in-order writes) or else read back."""
        shards = self.shard_files()
        planned = {s.path: s for s in self._planned.values()}
        out: dict[str, str] = {}
        rest: list[tuple[Path, str]] = []
        for path, final in shards:
            shard = planned.get(path)
            digest = None if shard is None or shard.pending else shard.digest
            if digest is None:
                rest.append((path, final))
            else:
                out[final] = digest
        read = hash_files(p for p, _ in rest)
        out.update({final: read[str(p)] for p, final in rest})
        return out

    def _close_shard(self) -> None:
        assert self._current is not None and self._tmp is not None
        part = self._tmp / f"part-{len(self._shards):05d}.safetensors"
        self._current.finish(part, self.metadata)
        self._shards.append((part, self._current.entries, self._current.size))
        self._current = None

    def _finalize(self) -> None:
        assert self._tmp is not None
        if self._current is not None:
            self._close_shard()
        for shard in dict.fromkeys(self._planned.values()):
            shard.finish()
            self._shards.append((shard.path, shard.entries, shard.size))
        if not self._shards:
            raise SpliceError("nothing was written", where=str(self.dest))
        total = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (part, entries, _) in enumerate(self._shards):
            final = _shard_name(i, total)
            part.rename(self._tmp / final)
            weight_map.update(dict.fromkeys(entries, final))
        if total > 1:
            index = {
                "metadata": {"total_size": sum(s for _, _, s in self._shards)},
                "weight_map": weight_map,
            }
            (self._tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if self.copy_files_from is not None:
            for aux in AUX_FILES:
                src = self.copy_files_from / aux
                if src.is_file():
                    shutil.copy2(src, self._tmp / aux)
        for name, content in self._files.items():
            (self._tmp / name).write_bytes(content)
        self._swap_in()

    def _swap_in(self) -> None:
        assert self._tmp is not None
        swap_in(self._tmp, self.dest)
        self._tmp = None

    def _abort(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        for shard in self._planned.values():
            shard.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._finalize()
        except OSError as e:
            self._abort()
            raise SpliceError(f"cannot write output: {e.strerror}", where=str(self.dest)) from e
        except BaseException:
            self._abort()
            raise
