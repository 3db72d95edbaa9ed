"""Helpers shared by the benchmark scripts: interleaved timing, instruction
counts under callgrind, and result files.

Machines here are shared and noisy, so every benchmark measures all the
variants it compares side by side in one process, interleaved in random
order, and reports the best of several rounds (the least disturbed one)
together with the median.  Where the difference to show is smaller than
that noise, callgrind counts the instructions instead: a count does not
depend on the load, at the price of ignoring cache and pipeline effects.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def interleaved(variants: dict[str, Callable[[], None]], *, rounds: int, number: int,
                setup: Callable[[str], None] | None = None,
                seed: int = 1234,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, float]]:
    """Time ``number`` calls of each variant per round, variants shuffled each round.

    ``setup(name)`` runs (untimed) before a variant's batch, e.g. to load or
    unload an extension.  Returns seconds per call: best and median over rounds.
    ``clock`` may be ``time.thread_time`` (CPU time of this thread: far less
    sensitive to other processes on a loaded machine, blind to waiting).
    """
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            if setup is not None:
                setup(name)
            fn = variants[name]
            # warm: a setup (loading an extension) leaves the caches full of
            # its own work; a tenth of a batch brings the variant's code back
            for _ in range(max(1, number // 10)):
                fn()
            # every batch starts from an empty young generation: otherwise the
            # garbage of a setup (loading an extension) is collected inside
            # the next batch, always the same variant's
            gc.collect()
            t0 = clock()
            for _ in range(number):
                fn()
            samples[name].append((clock() - t0) / number)
    return {name: {"best": min(s), "median": statistics.median(s), "samples": s}
            for name, s in samples.items()}


def paired_ratio(timing: dict, variant: str, baseline: str) -> float:
    """Median over rounds of ``variant / baseline`` timed in the same round.

    Rounds are minutes apart at most, so a slow spell of a shared machine
    tends to hit both sides of a pair; the median drops the rest.  A second
    estimate beside the ratio of the bests.
    """
    pairs = zip(timing[variant]["samples"], timing[baseline]["samples"])
    return statistics.median(v / b for v, b in pairs)


def paired_difference(timing: dict, variant: str, baseline: str) -> float:
    """Median over rounds of ``variant - baseline`` (seconds) timed in the same round."""
    pairs = zip(timing[variant]["samples"], timing[baseline]["samples"])
    return statistics.median(v - b for v, b in pairs)


# -- instruction counts --------------------------------------------------------
#
# A region of a child process is counted on its own by running it inside
# libc's qsort_r: the child sorts a two-element array whose comparison
# callback (a ctypes function, which reaches C as ``closure_fcn``) runs the
# region; callgrind collects only inside qsort_r and dumps its counters
# when qsort_r returns.  Other qsort_r calls (there are a few during start-up)
# are told apart because their dumps never contain ``closure_fcn``.

_REGION_FUNCTION = "qsort_r"
_REGION_MARK = "closure_fcn"


def in_counted_region(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` where :func:`count_regions` counts it (a plain call otherwise)."""
    import ctypes

    box: list = []

    def compare(a: int, b: int) -> int:
        if not box:
            box.append(fn())
        return 0

    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(compare)
    pair = (ctypes.c_int * 2)(0, 1)
    ctypes.CDLL(None).qsort(pair, 2, ctypes.sizeof(ctypes.c_int), callback)
    return box[0]


def count_regions(children: list[list[str]], expected: int,
                  pythons: list[str] | None = None) -> list[list[int]]:
    """Instructions of each :func:`in_counted_region` call made by each Python
    child (its argv), in call order; the children run under callgrind side by
    side (the variants a benchmark compares; counts do not depend on load).
    ``pythons``: the interpreter of each child (default: this one)."""
    import concurrent.futures

    if shutil.which("valgrind") is None:
        raise SystemExit("instruction counts need valgrind on PATH")
    pythons = pythons or [sys.executable] * len(children)
    with concurrent.futures.ThreadPoolExecutor(len(children)) as pool:
        return list(pool.map(lambda job: _count_child(job[0], expected, job[1]),
                             zip(children, pythons)))


def _count_child(argv: list[str], expected: int, python: str = sys.executable) -> list[int]:
    with tempfile.TemporaryDirectory(prefix="pyrepl3-callgrind-") as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no",
             f"--toggle-collect={_REGION_FUNCTION}", f"--dump-after={_REGION_FUNCTION}",
             f"--callgrind-out-file={tmp}/cg.out", python, *argv],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        if out.returncode != 0:
            raise SystemExit(f"the counted child failed: {out.stderr[-3000:]}")
        parts = sorted((int(m.group(1)), name) for name in os.listdir(tmp)
                       if (m := re.fullmatch(r"cg\.out\.(\d+)", name)))
        counts = []
        for _, name in parts:
            with open(os.path.join(tmp, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
            if _REGION_MARK in text:
                counts.append(int(re.search(r"^totals: (\d+)", text, re.M).group(1)))
    if len(counts) != expected:
        raise SystemExit(f"callgrind counted {len(counts)} regions, expected {expected} "
                         f"(does this libc sort through {_REGION_FUNCTION}?)")
    return counts


def bench_shell() -> Any:
    """The shell every benchmark times: in-memory history, plain-text display."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.display_formatter.active_types = ["text/plain"]
    return shell


def environment() -> dict:
    try:
        import IPython
    except ImportError:  # a driver that only runs other interpreters (bench_patches)
        version = "none"
    else:
        version = IPython.__version__

    return {"python": platform.python_version(), "ipython": version,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "argv": sys.argv}


def write_results(name: str, payload: dict) -> str:
    """Write ``payload`` to this environment's result file; sections of an
    earlier run that this run did not measure are kept."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    env = environment()
    path = os.path.join(RESULTS_DIR, f"{name}-py{env['python']}-ipython{env['ipython']}.json")
    try:
        with open(path, encoding="utf-8") as f:
            merged = json.load(f)
    except (OSError, ValueError):
        merged = {}
    merged.update(payload, environment=env)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=2)
    return path
