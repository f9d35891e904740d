"""A lazy, read-only view of a checkpoint on disk: names, shapes and dtypes from headers only.

Formats: a single ``.safetensors`` file; a Hugging Face model dir (``model.safetensors`` or
shards + ``model.safetensors.index.json``); a PEFT adapter dir (``adapter_config.json`` +
``adapter_model.safetensors``). Pickled weights (``.bin .pt .pth .ckpt``) are refused unless
``allow_pickle=True``, and then loaded only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splice._lazy import lazy_import
from splice.errors import SpliceError
from splice.io._dtypes import dtype_name
from splice.io._safetensors import TensorInfo, check_tensor_name, read_header, read_tensor

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch", globals())

__all__ = ["PICKLE_SUFFIXES", "Checkpoint", "open_checkpoint"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"
PEFT_CONFIG = "adapter_config.json"


class Checkpoint(Mapping[str, "torch.Tensor"]):
    """``name -> Tensor`` read on demand; ``info(name)`` answers from headers alone."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        infos: dict[str, TensorInfo],
        metadata: dict[str, str],
        directory: Path | None,
        loaded: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.path = path
        self.format = fmt
        self._infos = infos
        self.metadata = metadata
        self.dir = directory
        self._loaded = loaded
        self._stamps = {f: _stamp(f) for f in self.files}

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self._infos.get(name)
        if info is None:
            raise KeyError(name)
        if self._loaded is not None:
            return self._loaded[name]
        return read_tensor(info)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, tensors={len(self)})"

    def names(self) -> list[str]:
        return list(self._infos)

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self._infos if n.startswith(prefix)]

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise SpliceError(f"no tensor {name!r}", where=str(self.path)) from None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def check_unchanged(self) -> None:
        """Raise if any file of this checkpoint changed on disk since it was opened.

        Long jobs call this before committing their output, so a checkpoint rewritten
        mid-run never yields a silently mixed result.
        """
        for f, stamp in self._stamps.items():
            if _stamp(f) != stamp:
                raise SpliceError(
                    "input file changed while splice was reading it",
                    where=str(f),
                    fix="do not modify inputs during a run; run again once the file is final",
                )

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def num_params(self) -> int:
        return sum(i.numel for i in self._infos.values())

    @property
    def config(self) -> dict[str, Any] | None:
        """``config.json`` (model dir) or ``adapter_config.json`` (PEFT dir), parsed."""
        if self.dir is None:
            return None
        name = PEFT_CONFIG if self.format == "peft" else "config.json"
        return _read_json(self.dir / name) if (self.dir / name).is_file() else None


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint file or directory lazily (see module docstring for formats).

    Raises:
        SpliceError: path missing, not a checkpoint, corrupt header, broken index, pickle refused.
    """
    path = Path(path)
    if not path.exists():
        raise SpliceError(
            "no such file or directory",
            where=str(path),
            fix="give a local path (splice never downloads from a model hub)",
        )
    if path.is_file():
        return _open_file(path, allow_pickle, directory=None, fmt="safetensors")
    if (path / PEFT_CONFIG).is_file():
        return _open_peft(path, allow_pickle)
    if (path / INDEX_NAME).is_file():
        return _open_index(path)
    single = path / "model.safetensors"
    if single.is_file():
        return _open_file(single, allow_pickle, directory=path, fmt="hf")
    pickles = [p for p in sorted(path.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles and allow_pickle:
        return _merge_files(path, pickles, allow_pickle)
    if pickles:
        _refuse_pickle(pickles[0])
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise SpliceError(
        "not a checkpoint directory"
        + (f" (has {found[:3]} but no {INDEX_NAME})" if found else " (no .safetensors files)"),
        where=str(path),
        fix="point at a .safetensors file, an HF model dir or a PEFT adapter dir",
    )


def _open_file(path: Path, allow_pickle: bool, directory: Path | None, fmt: str) -> Checkpoint:
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            _refuse_pickle(path)
        loaded = _load_pickle(path)
        infos = {n: _info_of(n, t, path) for n, t in loaded.items()}
        return Checkpoint(path, "pickle", infos, {}, directory, loaded)
    if path.suffix != ".safetensors":
        raise SpliceError(
            f"unrecognised checkpoint file type {path.suffix!r}",
            where=str(path),
            fix="splice reads .safetensors (and .bin/.pt with --allow-pickle)",
        )
    infos, meta = read_header(path)
    return Checkpoint(path, fmt, infos, meta, directory)


def _open_peft(path: Path, allow_pickle: bool) -> Checkpoint:
    cfg = _read_json(path / PEFT_CONFIG)
    if not isinstance(cfg, dict):
        raise SpliceError(f"{PEFT_CONFIG} is not a JSON object", where=str(path))
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        alt = path / "adapter_model.bin"
        if not alt.is_file():
            raise SpliceError(
                "PEFT adapter dir has no adapter_model.safetensors",
                where=str(path),
                fix="save the adapter with safe_serialization=True",
            )
        weights = alt
    ckpt = _open_file(weights, allow_pickle, directory=path, fmt="peft")
    ckpt.format, ckpt.path = "peft", path
    return ckpt


def _open_index(path: Path) -> Checkpoint:
    index_path = path / INDEX_NAME
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SpliceError("index has no weight_map", where=str(index_path), fix="re-save the model")
    shards: dict[str, Path] = {}
    bad = next((v for v in weight_map.values() if not isinstance(v, str)), None)
    if bad is not None:
        raise SpliceError(
            f"index names shard {bad!r}, which is not a plain file name in the model dir",
            where=str(index_path),
            fix="weight_map values must be shard file names",
        )
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise SpliceError(
                f"index names shard {shard!r}, which is not a plain file name in the model dir",
                where=str(index_path),
                fix="shard paths must not contain directories, '..' or be absolute",
            )
        if not (path / shard).is_file():
            raise SpliceError(
                f"index names shard {shard!r}, which does not exist",
                where=str(index_path),
                fix="the download is incomplete; fetch the missing shard",
            )
        shards[shard] = path / shard
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard, shard_path in shards.items():
        shard_infos, meta = read_header(shard_path)
        metadata = metadata or meta
        for name, info in shard_infos.items():
            if name in infos:
                raise SpliceError(
                    f"tensor {name!r} is in both {infos[name].file.name} and {shard}",
                    where=str(path),
                    fix="the checkpoint is inconsistent; re-save it",
                )
            owner = weight_map.get(name)
            if owner != shard:
                raise SpliceError(
                    f"tensor {name!r} is in {shard} but the index "
                    + ("does not list it" if owner is None else f"puts it in {owner}"),
                    where=str(index_path),
                    fix="the index does not match the shards; re-save the model",
                )
            infos[name] = info
    missing = [n for n in weight_map if n not in infos]
    if missing:
        raise SpliceError(
            f"index lists {len(missing)} tensor(s) absent from their shards, e.g. {missing[0]!r}",
            where=str(index_path),
            fix="the index does not match the shards; re-save the model",
        )
    for name in weight_map:
        check_tensor_name(name, str(index_path))
    ordered = {n: infos[n] for n in sorted(infos, key=lambda n: (infos[n].file, infos[n].offset))}
    return Checkpoint(path, "hf", ordered, metadata, path)


def _merge_files(path: Path, files: list[Path], allow_pickle: bool) -> Checkpoint:
    infos: dict[str, TensorInfo] = {}
    loaded: dict[str, torch.Tensor] = {}
    for f in files:
        part = _open_file(f, allow_pickle, directory=path, fmt="pickle")
        for name in part:
            if name in infos:
                raise SpliceError(f"tensor {name!r} appears in two files", where=str(f))
            infos[name], loaded[name] = part.info(name), part[name]
    return Checkpoint(path, "pickle", infos, {}, path, loaded)


def _refuse_pickle(path: Path) -> None:
    raise SpliceError(
        "pickle checkpoints can run arbitrary code when loaded; refused",
        where=str(path),
        fix="convert to .safetensors, or pass --allow-pickle (allow_pickle=True) to load it "
        "with torch.load(weights_only=True)",
    )


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt/hostile pickles
        raise SpliceError(
            f"refused or unreadable pickle ({_pickle_reason(e)})",
            where=str(path),
            fix="only plain tensor state dicts load with weights_only=True; "
            "convert trusted files to .safetensors",
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise SpliceError("pickle does not hold a {name: tensor} state dict", where=str(path))
    for name in obj:
        check_tensor_name(name, str(path))
    return obj


def _pickle_reason(e: Exception) -> str:
    """Turn torch's long weights-only messages into the one fact that matters."""
    text = str(e)
    m = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
    if m:
        return f"it calls {m.group(1)}, which weights-only loading forbids"
    if m := re.search(r"Unsupported operand (\S+)", text):
        return f"not a tensor pickle: unsupported opcode {m.group(1)}"
    if "zip archive" in text or "hasRecord" in text:
        return "not a complete torch archive (truncated or corrupt)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0].split(". ")[0] if lines else type(e).__name__)[:160]


def _info_of(name: str, t: torch.Tensor, path: Path) -> TensorInfo:
    return TensorInfo(name, tuple(t.shape), dtype_name(t.dtype), t.numel() * t.element_size(), path)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpliceError(f"invalid JSON ({e})", where=str(path), fix="file is corrupt") from e
    except OSError as e:
        raise SpliceError(f"cannot read: {e.strerror}", where=str(path)) from e
