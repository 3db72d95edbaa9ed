"""Cost of namespace transactions and snapshots on a large namespace.

Run: ``python bench/bench_namespace.py [--names 10000] [--rounds N] [--quick]``.
Prints microseconds per cell and ratios, measured side by side in one
process (interleaved rounds), and writes JSON to ``bench/results/``.

Cell variants (``pyrepl3_ext.run_cell`` with the extension loaded, no
subscriber, ``store_history=False``, an in-memory history), on a namespace
holding ``--names`` user variables:
  ok           ``x = 1`` without a transaction
  ok+txn       ``x = 1`` in a transaction (baseline copied, then dropped)
  fail         ``x = 1; raise ValueError`` without a transaction
  fail+txn     the same in a transaction (baseline copied, then rolled back)
Tracebacks are not printed (``showtraceback`` is a no-op in every variant),
so the failing variants measure execution, not formatting.

The transaction machinery alone (no IPython): ``begin`` (the shallow copy)
and ``rollback`` (the identity diff and the restore of a few names).

Snapshots: ``take`` (deep copy of every user variable), ``restore`` (a
fresh deep copy bound again), ``save`` and ``load`` (pickle + HMAC, a file
in a temporary directory), each best of several runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pyrepl3_ext  # noqa: E402
from pyrepl3_ext import namespace  # noqa: E402
from bench._common import bench_shell, interleaved, write_results  # noqa: E402


def fill(ns: dict, count: int) -> None:
    """``count`` user variables of the usual kinds: numbers, strings, small containers."""
    for i in range(count):
        kind = i % 4
        value = (i if kind == 0 else f"value {i}" if kind == 1 else
                 [i, i + 1, i + 2] if kind == 2 else {"k": i, "v": [i]})
        ns[f"var{i}"] = value


def best_of(fn, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"best_us": min(times) * 1e6, "median_us": statistics.median(times) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    args = parser.parse_args()
    rounds = 5 if args.quick else args.rounds
    number = 50 if args.quick else 300

    shell = bench_shell()
    shell.showtraceback = lambda *a, **k: None
    pyrepl3_ext.load_ipython_extension(shell)
    fill(shell.user_ns, args.names)
    total = len(shell.user_ns)

    def cell(code: str, txn: bool):
        def run() -> None:
            pyrepl3_ext.run_cell(shell, code, transaction=txn, store_history=False)
        return run

    variants = {
        "ok": cell("x = 1", False),
        "ok+txn": cell("x = 1", True),
        "fail": cell("x = 1\nraise ValueError", False),
        "fail+txn": cell("x = 1\nraise ValueError", True),
    }
    timing = interleaved(variants, rounds=rounds, number=number)
    print(f"namespace: {args.names} user variables ({total} names in user_ns), "
          f"{rounds} rounds x {number} cells, best (median) us per cell\n")
    print(f"{'variant':<12}{'best us':>10}{'median us':>11}{'ratio':>8}{'added us':>10}")
    cells: dict = {}
    for name, base in (("ok", "ok"), ("ok+txn", "ok"), ("fail", "fail"),
                       ("fail+txn", "fail")):
        t, b = timing[name], timing[base]
        cells[name] = {"best_us": t["best"] * 1e6, "median_us": t["median"] * 1e6,
                       "ratio": t["best"] / b["best"],
                       "added_us": (t["best"] - b["best"]) * 1e6}
        print(f"{name:<12}{t['best']*1e6:>10.1f}{t['median']*1e6:>11.1f}"
              f"{t['best']/b['best']:>8.3f}{(t['best']-b['best'])*1e6:>10.1f}")

    # the machinery alone, without IPython around it
    ns = shell.user_ns
    manager = namespace.manager(shell)
    txn = namespace.Transaction("bench", 0, {})

    def begin() -> None:
        txn.base = ns.copy()

    def rollback() -> None:
        txn.base = ns.copy()
        ns["x"] = object()
        ns["bench_new"] = 1
        manager._rollback(txn)

    def copy_only() -> None:
        ns.copy()

    parts = interleaved({"begin": begin, "copy": copy_only, "begin+rollback": rollback},
                        rounds=rounds, number=number)
    begin_us = parts["begin"]["best"] * 1e6
    rollback_us = parts["begin+rollback"]["best"] * 1e6 - begin_us
    print(f"\nmachinery alone: begin (shallow copy of {total} names) {begin_us:.1f} us, "
          f"rollback (identity diff + 2 names restored) {rollback_us:.1f} us "
          f"({begin_us * 1000 / total:.1f} ns and {rollback_us * 1000 / total:.1f} ns per name)")

    # snapshots
    repeat = 3 if args.quick else 7
    snaps: dict = {}
    snaps["take"] = best_of(lambda: manager.take_snapshot("bench"), repeat)
    snaps["restore"] = best_of(lambda: manager.restore_snapshot("bench"), repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.snap")
        key = os.urandom(32)
        snaps["save"] = best_of(lambda: manager.save_snapshot("bench", path, key=key), repeat)
        size = os.path.getsize(path)
        snaps["load"] = best_of(lambda: manager.load_snapshot(path, key=key), repeat)
    print(f"\nsnapshots of {args.names} user variables (best of {repeat}, ms): " + ", ".join(
        f"{k} {v['best_us'] / 1000:.1f}" for k, v in snaps.items())
          + f"; file {size / 1e6:.2f} MB")

    ok, fail = cells["ok+txn"], cells["fail+txn"]
    print(f"\ntransaction cost per cell at {args.names} variables: "
          f"+{ok['added_us']:.1f} us on success ({ok['ratio']:.2f}x), "
          f"+{fail['added_us']:.1f} us on failure with rollback ({fail['ratio']:.2f}x)")
    pyrepl3_ext.unload_ipython_extension(shell)
    path = write_results(f"namespace-{args.names}", {
        "names": args.names, "user_ns_size": total, "rounds": rounds, "number": number,
        "cells": cells,
        "machinery": {"begin_us": begin_us, "rollback_us": rollback_us},
        "snapshots": snaps, "snapshot_file_bytes": size})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
