"""Output throughput and print-to-event latency, with and without pyrepl3_ext.

Run: ``python bench/bench_io.py [--rounds N] [--quick]``.  Measures side by
side in one process (variants interleaved, best and median of the rounds),
prints tables and writes JSON to ``bench/results/``.

Throughput: MB/s of text a cell prints, for three shapes of output (short
lines through ``print``, 10 kB lines through ``sys.stdout.write``, 1 MB
writes), in these variants:

  stock     the extension not loaded (stdout is a discarding text stream)
  ext       loaded, nobody subscribed (the routing stream tees, no events)
  ext+sub   loaded, one subscriber counting the output events (tee on)
  ext+sub-notee   as ext+sub with ``output_tee = False`` (a host that only
            wants events, e.g. a protocol server on stdio)

Latency: the time from just before ``print`` in the cell to the output event
reaching a subscriber, per line (p50/p99), with the cell printing alone and
with 4 threads of the cell printing at once.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from traitlets.config import Config  # noqa: E402

import pyrepl3_ext  # noqa: E402
from bench._common import interleaved, write_results  # noqa: E402


class _Discard(io.TextIOBase):
    """A text stream that drops everything (the terminal's cost left out)."""

    def write(self, s):
        return len(s)

    def writable(self):
        return True


SHAPES = {
    # name: (cell source, characters the cell prints)
    "print 80-char lines": ("for _ in range(20_000):\n    print('x' * 79)", 20_000 * 80),
    "write 10 kB lines": ("import sys\n_l = 'y' * 9_999 + '\\n'\nfor _ in range(400):\n"
                          "    sys.stdout.write(_l)", 400 * 10_000),
    "write 1 MB chunks": ("import sys\n_c = 'z' * 1_000_000\nfor _ in range(8):\n"
                          "    sys.stdout.write(_c)\nprint()", 8_000_001),
}

LATENCY_CELLS = {
    "1 thread": "import time\nfor _i in range({n}):\n    _t0[_i] = time.perf_counter()\n"
                "    print(_i)",
    "4 threads": "import threading, time\n"
                 "def _work(k):\n"
                 "    for j in range({n} // 4):\n"
                 "        i = k * ({n} // 4) + j\n"
                 "        _t0[i] = time.perf_counter()\n"
                 "        print(i)\n"
                 "_ts = [threading.Thread(target=_work, args=(k,)) for k in range(4)]\n"
                 "for _t in _ts: _t.start()\n"
                 "for _t in _ts: _t.join()",
}


def flood(shell, seconds: float) -> dict[str, float]:
    """``while True: print('x' * 10**6)`` under a deadline, with a subscriber
    keeping every event (the worst case for memory): what was written, what
    was delivered and dropped, and how much the peak RSS grew."""
    import resource

    def rss_mb() -> float:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform != "darwin" else peak / 2**20

    pyrepl3_ext.load_ipython_extension(shell)
    kept: list = []
    unsubscribe = pyrepl3_ext.subscribe(shell, kept.append)
    cfg = pyrepl3_ext.get_state(shell).config
    cfg.output_tee = False
    showtraceback = shell.showtraceback
    shell.showtraceback = lambda *a, **k: None
    before = rss_mb()
    try:
        pyrepl3_ext.run_cell(shell, "_n = 0\nwhile True:\n    print('x' * 10**6)\n    _n += 1",
                             timeout=seconds, store_history=False)
        after = rss_mb()
        written = shell.user_ns.pop("_n") * (10**6 + 1)
        outs = [e for e in kept if e["type"] == "output"]
        return {"seconds": seconds, "written_mb": written / 1e6,
                "delivered_mb": sum(len(e["text"]) for e in outs) / 1e6,
                "dropped_mb": sum(e.get("dropped", 0) for e in outs) / 1e6,
                "rss_growth_mb": after - before}
    finally:
        shell.showtraceback = showtraceback
        unsubscribe()
        pyrepl3_ext.unload_ipython_extension(shell)


def per_cell_cost(shell, rounds: int) -> dict[str, float]:
    """What the I/O components add to every cell: their hooks called directly
    (best of the rounds), since a whole ``run_cell`` is too noisy for 2 us."""
    from pyrepl3_ext.events import Execution

    pyrepl3_ext.load_ipython_extension(shell)
    try:
        state = pyrepl3_ext.get_state(shell)
        out = {}
        for name in ("io_capture", "input_request"):
            component = getattr(state, name)
            best = float("inf")
            for _ in range(max(rounds, 5) * 3):
                runs = [Execution(f"e{i}", "s", "x = 1", "sync", 1, {}, state.bus)
                        for i in range(2000)]
                t0 = time.perf_counter()
                for execution in runs:
                    component.before_cell(execution)
                    component.after_cell(execution, None)
                best = min(best, (time.perf_counter() - t0) / len(runs))
            out[name] = best * 1e6
        return out
    finally:
        pyrepl3_ext.unload_ipython_extension(shell)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    report = sys.__stdout__

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    real_stdout = sys.stdout
    sys.stdout = _Discard()
    state: dict = {"loaded": False, "unsub": None}
    counted = [0]

    def count(event):
        if event["type"] == "output":
            counted[0] += len(event["text"])

    def ensure(name: str) -> None:
        if state["unsub"] is not None:
            state["unsub"]()
            state["unsub"] = None
        if name == "stock":
            if state["loaded"]:
                pyrepl3_ext.unload_ipython_extension(shell)
                state["loaded"] = False
            return
        if not state["loaded"]:
            pyrepl3_ext.load_ipython_extension(shell)
            cfg = pyrepl3_ext.get_state(shell).config
            cfg.output_limit = 0  # measure delivery, not dropping
            state["loaded"] = True
        pyrepl3_ext.get_state(shell).config.output_tee = name != "ext+sub-notee"
        if name.startswith("ext+sub"):
            state["unsub"] = pyrepl3_ext.subscribe(shell, count)

    results: dict = {"throughput": {}, "latency": {}}
    try:
        print(f"{'output':<22}{'variant':<16}{'MB/s best':>10}{'MB/s med':>10}{'vs stock':>10}",
              file=report)
        for shape, (source, chars) in SHAPES.items():
            def cell(source=source):
                shell.run_cell(source, store_history=False)

            variants = {"stock": cell, "ext": cell, "ext+sub": cell, "ext+sub-notee": cell}
            timing = interleaved(variants, rounds=rounds, number=3, setup=ensure)
            stock = timing["stock"]["best"]
            results["throughput"][shape] = {}
            for variant, t in timing.items():
                best, med = chars / t["best"] / 1e6, chars / t["median"] / 1e6
                print(f"{shape:<22}{variant:<16}{best:>10.1f}{med:>10.1f}"
                      f"{stock / t['best']:>10.2f}", file=report)
                results["throughput"][shape][variant] = {"mb_s_best": best, "mb_s_median": med}

        ensure("ext+sub-notee")
        state["unsub"]()
        state["unsub"] = None
        print(f"\n{'latency':<12}{'lines':>7}{'p50 us':>10}{'p99 us':>10}{'max us':>10}",
              file=report)
        n = 2_000 if args.quick else 20_000
        for name, template in LATENCY_CELLS.items():
            t0 = [0.0] * n
            lat: list[float] = []

            def on_event(event, t0=t0, lat=lat):
                if event["type"] == "output":
                    now = time.perf_counter()
                    for line in event["text"].splitlines():
                        lat.append(now - t0[int(line)])

            shell.user_ns["_t0"] = t0
            unsub = pyrepl3_ext.subscribe(shell, on_event)
            for _ in range(rounds):
                shell.run_cell(template.format(n=n), store_history=False)
            unsub()
            lat.sort()
            p50 = statistics.median(lat) * 1e6
            p99 = lat[int(len(lat) * 0.99)] * 1e6
            print(f"{name:<12}{len(lat):>7}{p50:>10.1f}{p99:>10.1f}{lat[-1] * 1e6:>10.1f}",
                  file=report)
            results["latency"][name] = {"p50_us": p50, "p99_us": p99, "max_us": lat[-1] * 1e6,
                                        "samples": len(lat)}
    finally:
        if state["loaded"]:
            pyrepl3_ext.unload_ipython_extension(shell)
        sys.stdout = real_stdout
    results["flood"] = flood(shell, 3.0 if args.quick else 10.0)
    f = results["flood"]
    print(f"\nflood (while True: print('x' * 10**6), {f['seconds']:g} s deadline, tee off, "
          f"default limits): {f['written_mb']:.0f} MB written, {f['delivered_mb']:.1f} MB "
          f"delivered, {f['dropped_mb']:.0f} MB reported dropped, peak RSS "
          f"+{f['rss_growth_mb']:.0f} MB", file=report)
    results["per_cell_us"] = per_cell_cost(shell, rounds)
    print(f"\nper-cell cost of the I/O components (before_cell + after_cell, nobody "
          f"subscribed): " + ", ".join(f"{k} {v:.2f} us" for k, v in
                                       results["per_cell_us"].items()), file=report)
    path = write_results("io", results)
    print(f"wrote {path}", file=report)


if __name__ == "__main__":
    main()
