"""What the experiments share: the results store that survives interruptions, progress lines on
stderr, and a run's TensorBoard scalars read back."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lit_icl.files import atomic_path

# The checkout's configs/: the experiments train through `lit-icl fit` with its YAML configs,
# which live beside the package (an editable install, as scripts/setup.sh makes).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def log(message: str, prefix: str = "reproduce") -> None:
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)


class Store:
    """DIR/NAME.json: the experiment's config and every finished run, rewritten atomically after
    each run. A stored run is returned instead of run again; a config that differs in more than
    `free` (fields that change which runs there are, not what a run computes: seeds, shot
    counts, pairs) starts afresh. `command` is the command line recorded with the results."""

    def __init__(self, out: Path, name: str, config: dict, free: tuple[str, ...] = (), command: str = "",
                 prefix: str = "reproduce"):
        self.path = out / f"{name}.json"
        self.prefix = prefix
        self.data = {"experiment": name, "config": config, "runs": {}}
        self.reused = False  # whether earlier runs of this config were found (else leftovers are stale)
        if self.path.exists():
            old = json.loads(self.path.read_text())
            same = lambda c: {k: v for k, v in c.items() if k not in free}  # noqa: E731
            if same(old.get("config", {})) == same(config):
                self.data, self.reused = {**old, "config": config}, True
            else:
                log(f"{self.path}: another configuration; its {len(old.get('runs', {}))} runs are not reused", prefix)
        self.data["command"] = command

    @property
    def runs(self) -> dict:
        return self.data["runs"]

    def run(self, key: str, fn, **meta):
        """fn()'s result for run `key`, computed once; `meta` (its config, seed) is stored with it."""
        if key in self.runs:
            log(f"{key}: done earlier ({self.runs[key]['seconds']:.0f} s), skipped", self.prefix)
            return self.runs[key]["result"]
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        self.runs[key] = {**meta, "result": result, "seconds": round(seconds, 1)}
        self.save()
        log(f"{key}: finished in {seconds:.0f} s ({len(self.runs)} runs stored)", self.prefix)
        return result

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps(self.data, indent=1, sort_keys=False, allow_nan=True) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (`lit_icl.files.atomic_path`): an interrupted run never
    leaves a half-written result."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def curves(logdir: Path) -> dict[str, list]:
    """Every scalar of a run's TensorBoard events: tag -> [[step, value], ...] (last value per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted({e.step: e.value for e in acc.Scalars(tag)}.items()) for tag in acc.Tags()["scalars"]}


def save_figure(fig, out: Path, name: str) -> list[str]:
    """Lay out and write `fig` as DIR/NAME.png, close it; the list of figure files."""
    from lit_icl.plots import plt

    fig.tight_layout()
    fig.savefig(out / f"{name}.png")
    plt.close(fig)
    return [f"{name}.png"]
