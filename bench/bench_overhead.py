"""Per-cell cost of the extension: plain exec vs stock run_cell vs run_cell with pyrepl3_ext.

Run: ``python bench/bench_overhead.py [--rounds N] [--quick]``.  Prints a
table of microseconds per cell and ratios, measured side by side in one
process, and writes JSON to ``bench/results/``.

Variants:
  exec       compile + exec of the same source in a dict (no IPython)
  stock      ``shell.run_cell`` with the extension not loaded
  ext        ``shell.run_cell`` with pyrepl3_ext loaded, nobody subscribed
  ext-core   as ext, with no capability component attached (the
             foundation alone: hooks, execution ids, events machinery)
  ext+sub    as ext, with one in-process subscriber (events are built)
  stock-again  stock timed a second time: the A/A difference is this run's
             noise floor
All run with ``store_history=False`` and an in-memory history, so the
numbers are about execution machinery, not SQLite.

``--hooks [MB,MB]`` also times the extension's two cell hooks called
directly, warm (back to back) and right after evicting the caches with a
buffer of each size: in a real cell they run amid IPython's far larger
per-cell work, so their time is mostly the memory they touch.

``--instructions`` (needs valgrind) also counts the machine instructions
of 1,000 trivial cells (after 500 uncounted ones), stock and with the
extension, each in its own process under callgrind (only that region is
counted; the garbage collections a variant's allocations cause are
counted with it).  Counts do not drift with the machine's load the way
times do: on a shared VM a few microseconds of timing difference are
within the noise, instruction counts are exact.

Timing is this thread's CPU time by default (``--wall`` for wall clock):
the cells never wait, and CPU time is far less disturbed by other
processes on a shared machine.  The added cost is given two ways: the
difference of the best rounds, and the median over rounds of the
difference measured within one round (``paired``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pyrepl3_ext  # noqa: E402
from pyrepl3_ext import extension  # noqa: E402
from bench._common import (  # noqa: E402
    bench_shell, count_regions, in_counted_region, interleaved, paired_difference,
    write_results)

CELLS = {
    "trivial": "x = 1",
    "ten statements": "\n".join(f"v{i} = {i} * 2" for i in range(10)),
    "compute-heavy": "total = 0\nfor i in range(200_000):\n    total += i * i",
}


def run_cells(variant: str, cells: int) -> None:
    """The child side of ``--instructions``: warm up, then run ``cells``
    cells in the counted region."""
    shell = bench_shell()
    if variant == "ext":
        pyrepl3_ext.load_ipython_extension(shell)
    for _ in range(500):
        shell.run_cell("x = 1", store_history=False)

    def cells_() -> None:
        for _ in range(cells):
            shell.run_cell("x = 1", store_history=False)

    in_counted_region(cells_)


def instructions() -> dict:
    cells = 1000
    script = os.path.abspath(__file__)
    stock, ext = (counts[0] / cells for counts in count_regions(
        [[script, "--run-cells", v, str(cells)] for v in ("stock", "ext")], 1))
    added = ext - stock
    print(f"instructions per trivial cell: stock {stock:,.0f}, with pyrepl3_ext "
          f"{ext:,.0f}: {added:+,.0f} ({added / stock:+.1%})")
    return {"stock": stock, "ext": ext, "added": added, "ratio": ext / stock}


def hooks(shell: Any, ensure: Callable[[str], None], evict_mb: list[float],
          rounds: int) -> dict:
    """Time the extension's two cell hooks alone, warm and with caches evicted.

    ``pre_run_cell`` + ``post_run_cell`` are called directly with a real
    ``ExecutionInfo``/``ExecutionResult`` of a trivial cell, with the
    extension loaded as in the ``ext`` and ``ext-core`` variants (every
    component, or none).  Warm: back to back.  Evicted: after touching one
    byte per cache line of an ``N`` MB buffer before each call, as
    IPython's own per-cell work does to the hooks in a real cell; a cell's
    hooks pay for the memory they touch more than for their bytecodes.
    """
    import timeit

    ensure("stock")
    captured: list = []
    shell.events.register("pre_run_cell", captured.append)
    result = shell.run_cell("x = 1", store_history=False)
    shell.events.unregister("pre_run_cell", captured.append)
    info = captured[0]

    rows: dict = {}
    print(f"\n{'cell hooks alone':<18}{'warm us':>9}" + "".join(
        f"{f'{mb:g} MB evicted':>17}" for mb in evict_mb))
    buffers = [bytearray(int(mb * 2**20)) for mb in evict_mb]
    ones = [b"\x01" * len(range(0, len(b), 64)) for b in buffers]
    # the timer's own cost under the same eviction, taken off every row
    baseline = [_evicted_best(_nothing, b, o, rounds) for b, o in zip(buffers, ones)]
    for label, variant in (("all hooks", "ext"), ("core", "ext-core")):
        ensure(variant)
        state = extension.get_state(shell)

        def pair(state=state) -> None:
            state._pre_run_cell(info)
            state._post_run_cell(result)

        warm = min(timeit.repeat(pair, number=2000, repeat=rounds)) / 2000
        cold = [_evicted_best(pair, b, o, rounds) - base
                for b, o, base in zip(buffers, ones, baseline)]
        rows[label] = {"warm_us": warm * 1e6,
                       **{f"evicted_{mb:g}mb_us": c * 1e6 for mb, c in zip(evict_mb, cold)}}
        print(f"{label:<18}{warm * 1e6:>9.2f}" + "".join(f"{c * 1e6:>17.2f}" for c in cold))
    ensure("stock")
    return rows


def _nothing() -> None:
    pass


def _evicted_best(fn: Callable[[], None], buffer: bytearray, ones: bytes, rounds: int,
                  calls: int = 300) -> float:
    """Seconds per ``fn()`` right after touching every cache line of ``buffer``
    (best of ``rounds`` means of ``calls`` calls; only ``fn()`` is timed)."""
    best = float("inf")
    for _ in range(rounds):
        total = 0.0
        for _ in range(calls):
            buffer[::64] = ones
            t0 = time.perf_counter()
            fn()
            total += time.perf_counter() - t0
        best = min(best, total / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    parser.add_argument("--wall", action="store_true",
                        help="wall-clock time instead of this thread's CPU time")
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions per cell under valgrind (slow: minutes)")
    parser.add_argument("--hooks", metavar="MB,MB", nargs="?", const="2,48",
                        help="also time the two cell hooks alone, warm and after "
                             "evicting caches with buffers of these sizes (default 2,48)")
    parser.add_argument("--run-cells", nargs=2, metavar=("VARIANT", "CELLS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    evict_mb: list[float] = []
    if args.hooks:
        try:
            evict_mb = [float(x) for x in args.hooks.split(",")]
        except ValueError:
            parser.error(f"--hooks expects sizes in MB like 2,48, got {args.hooks!r}")
        if not evict_mb or any(mb <= 0 for mb in evict_mb):
            parser.error("--hooks: buffer sizes must be > 0 MB")
    if args.run_cells:
        run_cells(args.run_cells[0], int(args.run_cells[1]))
        return
    clock = time.perf_counter if args.wall else time.thread_time
    rounds = 5 if args.quick else args.rounds

    shell = bench_shell()
    all_components = list(extension.COMPONENTS)
    #: the component list the extension is loaded with (None: not loaded)
    state: dict = {"components": None, "unsubscribe": None}

    def ensure(name: str) -> None:
        want = None if not name.startswith("ext") else \
            ([] if name == "ext-core" else all_components)
        if state["unsubscribe"] is not None and (want is None or name != "ext+sub"):
            state["unsubscribe"]()
            state["unsubscribe"] = None
        if state["components"] is not None and state["components"] != want:
            pyrepl3_ext.unload_ipython_extension(shell)
            state["components"] = None
        if want is not None and state["components"] is None:
            extension.COMPONENTS[:] = want
            pyrepl3_ext.load_ipython_extension(shell)
            extension.COMPONENTS[:] = all_components
            state["components"] = want
        if name == "ext+sub" and state["unsubscribe"] is None:
            state["unsubscribe"] = pyrepl3_ext.subscribe(shell, lambda event: None)

    results: dict[str, dict] = {}
    print(f"{'cell':<16}{'variant':<10}{'best us':>10}{'median us':>11}"
          f"{'vs exec':>9}{'vs stock':>10}{'ext-stock us':>14}")
    for cell_name, source in CELLS.items():
        number = (20 if args.quick else 200) if cell_name != "compute-heavy" else (2 if args.quick else 5)
        namespace: dict = {}

        def plain_exec(source=source, namespace=namespace):
            exec(compile(source, "<cell>", "exec"), namespace)

        def run(source=source):
            shell.run_cell(source, store_history=False)

        variants = {"exec": plain_exec, "stock": run, "stock-again": run, "ext-core": run,
                    "ext": run, "ext+sub": run}
        timing = interleaved(variants, rounds=rounds, number=number, setup=ensure,
                             clock=clock)
        ensure("stock")
        stock = timing["stock"]["best"]
        for variant, t in timing.items():
            delta = (t["best"] - stock) * 1e6
            print(f"{cell_name:<16}{variant:<10}{t['best']*1e6:>10.1f}{t['median']*1e6:>11.1f}"
                  f"{t['best']/timing['exec']['best']:>9.2f}{t['best']/stock:>10.3f}"
                  f"{delta:>14.1f}")
        results[cell_name] = {v: {"best_us": t["best"] * 1e6, "median_us": t["median"] * 1e6,
                                  "paired_added_us": paired_difference(timing, v, "stock") * 1e6}
                              for v, t in timing.items()}
    trivial = results["trivial"]
    added = trivial["ext"]["best_us"] - trivial["stock"]["best_us"]
    core = trivial["ext-core"]["best_us"] - trivial["stock"]["best_us"]
    paired = trivial["ext"]["paired_added_us"]
    noise = (trivial["stock-again"]["best_us"] - trivial["stock"]["best_us"],
             trivial["stock-again"]["paired_added_us"])
    print(f"\nextension cost per trivial cell: {added:+.1f} us (best vs best; paired "
          f"{paired:+.1f} us), of which the foundation {core:+.1f} us and the components "
          f"({', '.join(n for n, _ in all_components)}) {added - core:+.1f} us "
          f"(target <= 10 us; stock run_cell {trivial['stock']['best_us']:.0f} us; "
          f"{'CPU' if not args.wall else 'wall'} time, {rounds} rounds)\n"
          f"noise floor (stock-again - stock): {noise[0]:+.1f} us best vs best, "
          f"{noise[1]:+.1f} us paired")
    hook_rows = hooks(shell, ensure, evict_mb, max(3, rounds // 3)) if args.hooks else None
    counted = instructions() if args.instructions else None
    if counted is not None:
        print(f"at this machine's stock run_cell time that is "
              f"{(counted['ratio'] - 1) * trivial['stock']['best_us']:+.1f} us of CPU work")
    path = write_results("overhead", {"cells": results, "added_us_trivial": added,
                                      "instructions_per_trivial_cell": counted,
                                      "cell_hooks_alone": hook_rows,
                                      "added_us_trivial_paired": paired,
                                      "added_us_trivial_core": core,
                                      "a_a_us_trivial": noise[0],
                                      "a_a_us_trivial_paired": noise[1],
                                      "clock": "wall" if args.wall else "thread_cpu"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
