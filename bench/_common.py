"""Helpers shared by the benchmark scripts: interleaved timing and result files.

Machines here are shared and noisy, so every benchmark measures all the
variants it compares side by side in one process, interleaved in random
order, and reports the best of several rounds (the least disturbed one)
together with the median.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable

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
            fn()  # warm
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


def environment() -> dict:
    import IPython

    return {"python": platform.python_version(), "ipython": IPython.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "argv": sys.argv}


def write_results(name: str, payload: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    env = environment()
    path = os.path.join(RESULTS_DIR, f"{name}-py{env['python']}-ipython{env['ipython']}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"environment": env, **payload}, f, indent=2)
    return path
