"""Timing helpers of the benchmark (`lit_icl.experiments.bench`, scripts/bench.py): alternating
rounds, medians, ratios, forward+backward closures, resident-memory peaks, and what the machine
is (its CPU, its load, the settings that move the figures)."""
from __future__ import annotations

import ctypes
import os
import platform
import statistics
import threading
import time
from typing import Callable

import torch


def alternate(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function: one warm-up round, then `reps` rounds alternating
    the order (forward, reverse, ...)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def rss() -> int | None:
    """Resident set size in bytes (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def peak_memory(fn: Callable[[], object]) -> int | None:
    """Peak growth of resident memory while fn runs (sampled every 0.5 ms, freed heap memory
    returned to the OS first); None where /proc is missing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base = rss()
    if base is None:
        return None
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss() or 0)
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn()
    done.set()
    thread.join()
    return max(peak[0], rss() or 0) - base


def fwd_bwd(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    """A closure running fn forward and backward, with a fixed random output gradient."""
    grads: list[torch.Tensor] = []

    def run():
        out = fn(*inputs)
        if not grads:
            grads.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device))
        torch.autograd.grad(out, inputs, grads[0])

    return run


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def matmul_check(n: int = 1024) -> dict[str, float]:
    """GFLOP/s of torch.mm n x n at one thread and at the chosen thread count: shows how
    busy the machine is (on an idle machine the second is about the first times the cores)."""
    a, b, threads, out = torch.randn(n, n), torch.randn(n, n), torch.get_num_threads(), {}
    for t in sorted({1, threads, os.cpu_count() or 1}):
        torch.set_num_threads(t)
        out[f"{t} threads"] = 2 * n**3 / med(alternate({"mm": lambda: torch.mm(a, b)}, 9)["mm"]) / 1e9
    torch.set_num_threads(threads)
    return out


def knobs() -> str:
    """The environment settings that move these numbers: OpenMP threads spin (ACTIVE) or sleep
    (PASSIVE) between ops, which decides how much a busy core costs; glibc's malloc returns
    tensors above 32 MiB to the OS after each use unless told otherwise (page faults)."""
    names = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    found = [f"{k}={os.environ[k]}" for k in names if k in os.environ]
    return ", ".join(found) if found else "no OpenMP/malloc settings"


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
