"""Engine sessions: memory of create/close cycles, cost of many live sessions.

Run: ``python bench/bench_sessions.py [--cycles 1000] [--live 100] [--rounds 30]``
(meant for the patched build, e.g. ``/work/venvs/py312-patched``; it runs on
stock IPython too, where sessions exist side by side but run one at a time).

Create/close cycles
    ``--cycles`` times: create a session, run one cell, close it.  RSS
    (``/proc/self/statm``, after ``gc.collect()`` and glibc's
    ``malloc_trim``) is read after a warm-up of 20 cycles and at the end;
    printed: the growth in MB (target <= 10 MB) and how many of the closed
    shells are still alive (weak references), which says whether a growth
    is a leak of whole shells.

Live sessions
    ``--live`` sessions created one after another and kept open; each
    creation timed.  Printed: p50/p95/max creation time (target <= 15 ms
    each), RSS per live session, and the time to close them all.

Side by side
    ``--rounds`` interleaved rounds of creating one bare ``InteractiveShell``
    and one engine session (closing them is not timed); the best round of
    each is the creation cost without a garbage collection or a scheduler
    pause in it, and their ratio the engine's own share.

Results are written as JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
import weakref

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import environment, interleaved, write_results  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")
try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def rss_mb() -> float:
    """Resident memory now, after giving freed heap pages back to the OS."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def _config():
    from traitlets.config import Config

    config = Config()
    config.InteractiveShell.xmode = "Plain"
    return config


def cycles(engine, n: int) -> dict:
    alive: list[weakref.ref] = []

    def one() -> None:
        s = engine.create_session()
        s.execute("x = list(range(100))\nsum(x)")
        alive.append(weakref.ref(s.shell))
        s.close()

    for _ in range(20):  # warm-up: imports, caches, first allocations
        one()
    alive.clear()
    before = rss_mb()
    t0 = time.perf_counter()
    for _ in range(n):
        one()
    elapsed = time.perf_counter() - t0
    after = rss_mb()
    survivors = sum(1 for r in alive if r() is not None)
    return {"cycles": n, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "rss_growth_mb": round(after - before, 2), "shells_still_alive": survivors,
            "ms_per_cycle": round(elapsed / n * 1000, 2)}


def live(engine, n: int) -> dict:
    before = rss_mb()
    times = []
    sessions = []
    for _ in range(n):
        t0 = time.perf_counter()
        sessions.append(engine.create_session())
        times.append(time.perf_counter() - t0)
    for s in sessions:  # each session used once: its worker thread exists
        s.execute("1")
    during = rss_mb()
    t0 = time.perf_counter()
    for s in sessions:
        s.close()
    close_s = time.perf_counter() - t0
    after = rss_mb()
    times_ms = sorted(t * 1000 for t in times)
    return {"sessions": n, "create_ms_p50": round(statistics.median(times_ms), 2),
            "create_ms_p95": round(times_ms[int(0.95 * (n - 1))], 2),
            "create_ms_max": round(times_ms[-1], 2),
            "rss_per_session_mb": round((during - before) / n, 2),
            "rss_with_all_live_mb": round(during, 1), "rss_after_close_mb": round(after, 1),
            "close_all_s": round(close_s, 3)}


def side_by_side(engine, rounds: int) -> dict:
    """Creation only (closing happens untimed, between batches)."""
    from IPython.core.interactiveshell import InteractiveShell

    from pyrepl3_ext import _compat

    main = sys.modules.get("__main__")
    engine_config = _config()
    engine_config.HistoryManager.hist_file = ":memory:"
    shells: list = []
    sessions: list = []

    def bare() -> None:
        shells.append(InteractiveShell(config=engine_config))
        sys.modules["__main__"] = main  # IPython took it

    def session() -> None:
        sessions.append(engine.create_session())

    def close_all(_name: str) -> None:
        while shells:
            _compat.close_shell(shells.pop())
        while sessions:
            sessions.pop().close()

    timings = interleaved({"bare InteractiveShell": bare, "engine session": session},
                          rounds=rounds, number=1, setup=close_all)
    close_all("")
    ratio = timings["engine session"]["best"] / timings["bare InteractiveShell"]["best"]
    return {"per_op_ms": {k: {m: round(t[m] * 1000, 2) for m in ("best", "median")}
                          for k, t in timings.items()},
            "ratio_engine_over_bare": round(ratio, 2)}


def real_print(*args: object) -> None:
    sys.__stdout__.write(" ".join(str(a) for a in args) + "\n")
    sys.__stdout__.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--live", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()

    from pyrepl3_ext import Engine
    from pyrepl3_ext._compat import is_patched_build

    env = environment()
    real_stdout = sys.stdout
    # cells print Out[n] through IPython's displayhook: keep it off the report
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    print = real_print  # noqa: A001 - the report goes to the real stdout
    print(f"Python {env['python']}, IPython {env['ipython']} "
          f"({'patched' if is_patched_build() else 'stock'} build)")
    with Engine(config=_config()) as engine:
        sbs = side_by_side(engine, args.rounds)
        print("creation only, side by side (best of rounds, ms):",
              {k: v["best"] for k, v in sbs["per_op_ms"].items()},
              f"engine/bare = {sbs['ratio_engine_over_bare']}")
        cyc = cycles(engine, args.cycles)
        verdict = "met" if cyc["rss_growth_mb"] <= 10 else "NOT met"
        print(f"{cyc['cycles']} create/close cycles: RSS {cyc['rss_before_mb']} -> "
              f"{cyc['rss_after_mb']} MB, growth {cyc['rss_growth_mb']} MB "
              f"(target <= 10 MB: {verdict}); closed shells still alive: "
              f"{cyc['shells_still_alive']}; {cyc['ms_per_cycle']} ms per cycle")
        liv = live(engine, args.live)
        verdict = "met" if liv["create_ms_p95"] <= 15 else "NOT met"
        print(f"{liv['sessions']} live sessions: creation p50 {liv['create_ms_p50']} ms, "
              f"p95 {liv['create_ms_p95']} ms, max {liv['create_ms_max']} ms "
              f"(target <= 15 ms: {verdict}); {liv['rss_per_session_mb']} MB each, "
              f"{liv['rss_with_all_live_mb']} MB with all live; closing all took "
              f"{liv['close_all_s']} s")
    path = write_results("bench_sessions", {"side_by_side": sbs, "cycles": cyc, "live": liv})
    print(f"results: {path}")
    sys.stdout = real_stdout


if __name__ == "__main__":
    main()
