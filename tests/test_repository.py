"""The repository itself: results that the README shows are JSON, Markdown and PNG; runs,
checkpoints and event files stay out of git (scripts/results/.gitignore, .gitignore)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_no_tracked_file_is_over_one_megabyte():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    sizes = {name.decode(): (ROOT / name.decode()).stat().st_size for name in files if name and (ROOT / name.decode()).is_file()}
    assert len(sizes) > 50, "git ls-files listed the checkout"
    large = {name: size for name, size in sizes.items() if size > 1 << 20}
    assert not large, f"tracked files over 1 MB (runs and checkpoints stay out of git): {large}"
    assert not [n for n in sizes if n.endswith(".ckpt") or "tfevents" in n], "checkpoints or event files are tracked"
