"""Files that are never half-written, checkpoints loaded without running pickled code, and
generated blocks of a hand-written file (README tables) replaced in place."""
from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch

from lit_icl.errors import first_line


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; when the block succeeds, rename it onto `path`
    (atomic on POSIX), otherwise delete it. A crash or a kill leaves the old file or none,
    never a partial one."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True (no code from the file runs); ValueError naming the
    file when it is missing, truncated or not a lit_icl checkpoint. A sharded checkpoint (the
    folder a ``--trainer.strategy fsdp2`` run writes) is consolidated first, in a temporary file."""
    from lit_icl.strategies import consolidate_checkpoint, is_sharded_checkpoint

    if is_sharded_checkpoint(path):
        with tempfile.TemporaryDirectory() as tmp:
            return load_checkpoint(consolidate_checkpoint(path, Path(tmp) / "consolidated.ckpt"))
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # the refusal below says it in one line
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path} is not a loadable checkpoint (it holds objects other than tensors and plain "
            "data; refused under weights_only=True, nothing in it was run)"
        ) from None
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path} is not a loadable checkpoint ({first_line(e)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint.get("hyper_parameters", {}):
        raise ValueError(f"{path} is not a lit_icl checkpoint (no state_dict / model config)")
    return checkpoint


def replace_marked_block(path: str | os.PathLike, begin: str, end: str, block: str) -> None:
    """Replace the part of text file `path` from the line marker `begin` to `end` (or append
    it) with `block`, which starts with `begin` and ends with `end`; the rest is kept. The file
    is rewritten atomically. How scripts regenerate their README tables: never typed."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
