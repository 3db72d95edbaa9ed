"""What the patch series costs: instructions per trivial cell, stock IPython vs the patched build.

Run: ``python bench/bench_patches.py [--stock PYTHON] [--patched PYTHON] [--cells N]``.

Counts the machine instructions of ``N`` (default 2,000) ``run_cell("x = 1")``
calls, after 500 uncounted ones, in a shell with in-memory history and no
extension loaded, once on the pinned stock release and once on the build
of ``patches/series``; both run under callgrind side by side, each in its
own process (``bench/_common.py``: only the region is counted, and a count
does not move with the load of a shared machine).  An empty region is
counted too and taken off, so the figure is per cell.  Prints both counts,
the difference and the ratio (issue 18's target: patched <= stock + 3 %),
and writes JSON to ``bench/results/``.

``--stock``/``--patched`` name the interpreters to use.  Without them the
bench finds or builds its own environments under ``upstream/_work/bench-venvs/``
(git-ignored): ``stock`` gets ``ipython==<pin>`` from the package index (this
interpreter is used instead when it imports exactly that release), and
``patched`` gets ``upstream/upstream.py install``, rebuilt whenever the
series' patches differ from the ones it was built from.
``--store-history`` counts cells run with ``store_history=True`` instead.
``--pieces`` also counts, on both builds, the per-cell pieces the series
changes, each alone 1,000 times in a warmed shell: entering and leaving
the builtin trap and the display trap, the history tee of both streams,
the ``sys.excepthook`` hold around ``exec``, the current-shell binding.
Needs valgrind (without it the bench says so and exits 0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import bench_shell, count_regions, in_counted_region, write_results  # noqa: E402

VENVS = os.path.join(ROOT, "upstream", "_work", "bench-venvs")
WARM_CELLS = 500


def run_cells(cells: int, store_history: bool) -> None:
    """The child: warm up, then one counted region of ``cells`` cells and one empty one."""
    shell = bench_shell()
    for _ in range(WARM_CELLS):
        shell.run_cell("x = 1", store_history=store_history)

    def region() -> None:
        for _ in range(cells):
            shell.run_cell("x = 1", store_history=store_history)

    in_counted_region(region)
    in_counted_region(lambda: None)


PIECES = ("builtin trap", "display trap", "history tee", "excepthook", "current shell")


def run_pieces(number: int) -> None:
    """The child of ``--pieces``: one counted region per piece (``PIECES``)
    and an empty loop, ``number`` times each, on whichever build this is."""
    import sys as sys_

    from IPython.core import getipython

    shell = bench_shell()
    for _ in range(50):
        shell.run_cell("x = 1")
    builtin_trap, display_trap = shell.builtin_trap, shell.display_trap
    patched = hasattr(getipython, "SharedHook")

    def builtins_() -> None:
        for _ in range(number):
            with builtin_trap:
                pass

    def display() -> None:
        for _ in range(number):
            with display_trap:
                pass

    def tee() -> None:
        try:
            from IPython.utils.capture import listen_to_streams, stop_listening
        except ImportError:  # stock, or a build whose _tee is a context manager
            for _ in range(number):
                with shell._tee("stdout"), shell._tee("stderr"):
                    pass
        else:
            for _ in range(number):
                stop_listening(listen_to_streams(shell._history_tee()))

    def excepthook() -> None:
        if not patched:  # what stock's run_code does
            for _ in range(number):
                old, sys_.excepthook = sys_.excepthook, shell.excepthook
                sys_.excepthook = old
            return
        from IPython.core.interactiveshell import excepthooks

        if hasattr(excepthooks, "enter"):
            for _ in range(number):
                excepthooks.enter(shell, shell.excepthook)
                excepthooks.exit(shell)
        else:  # the series before issue 18
            for _ in range(number):
                if not excepthooks.holds(shell):
                    excepthooks.hold(shell, shell)
                excepthooks.release(shell)

    def current() -> None:
        if not patched:
            for _ in range(number):
                pass
            return
        var = getipython.current_shell
        for _ in range(number):
            var.reset(var.set(shell))

    def empty() -> None:
        for _ in range(number):
            pass

    for region in (empty, builtins_, display, tee, excepthook, current):
        region()  # warm
        in_counted_region(region)


def count_pieces(stock: str, patched: str, number: int = 1000) -> dict:
    script = os.path.abspath(__file__)
    results = count_regions([[script, "--run-pieces", str(number)]] * 2, 1 + len(PIECES),
                            pythons=[stock, patched])
    rows = {}
    print(f"\n{'piece (instructions each)':<28}{'stock':>12}{'patched':>12}{'added':>12}")
    for i, piece in enumerate(PIECES, 1):
        plain, ours = ((counts[i] - counts[0]) / number for counts in results)
        rows[piece] = {"stock": plain, "patched": ours}
        print(f"{piece:<28}{plain:>12,.0f}{ours:>12,.0f}{ours - plain:>+12,.0f}")
    print("(a cell enters the builtin trap twice, each other piece once)")
    return rows


# -- the two environments -------------------------------------------------------

def _pin() -> dict:
    sys.path.insert(0, os.path.join(ROOT, "upstream"))
    import upstream  # upstream/upstream.py: stdlib only

    return upstream.read_pin()


def _ipython_version(python: str) -> str | None:
    out = subprocess.run([python, "-c", "import IPython; print(IPython.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def _venv_python(name: str) -> str:
    return os.path.join(VENVS, name, "bin", "python")


def _make_venv(name: str) -> str:
    path = os.path.join(VENVS, name)
    shutil.rmtree(path, ignore_errors=True)
    print(f"creating {path} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    return _venv_python(name)


def stock_python(version: str) -> str:
    """An interpreter importing the stock release ``version``."""
    if _ipython_version(sys.executable) == version:
        return sys.executable
    python = _venv_python("stock")
    if not os.path.exists(python) or _ipython_version(python) != version:
        python = _make_venv("stock")
        subprocess.run([python, "-m", "pip", "install", "-q", f"ipython=={version}"], check=True)
    return python


def _series_digest() -> str:
    digest = hashlib.sha256()
    patches = os.path.join(ROOT, "patches")
    with open(os.path.join(patches, "series"), encoding="utf-8") as f:
        names = [line.split("#", 1)[0].strip() for line in f]
    for name in filter(None, names):
        digest.update(name.encode())
        with open(os.path.join(patches, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def patched_python() -> str:
    """An interpreter importing the build of the current ``patches/series``."""
    python = _venv_python("patched")
    stamp = os.path.join(VENVS, "patched", "series.sha256")
    digest = _series_digest()
    try:
        with open(stamp, encoding="utf-8") as f:
            current = f.read().strip() == digest and os.path.exists(python)
    except OSError:
        current = False
    if not current:
        python = _make_venv("patched")
        subprocess.run([sys.executable, os.path.join(ROOT, "upstream", "upstream.py"),
                        "install", "--python", python], check=True)
        with open(stamp, "w", encoding="utf-8") as f:
            f.write(digest + "\n")
    return python


# -- the count ------------------------------------------------------------------

def count(stock: str, patched: str, cells: int, store_history: bool) -> dict:
    script = os.path.abspath(__file__)
    argv = [script, "--run-cells", str(cells)] + (["--store-history"] if store_history else [])
    versions = {name: _ipython_version(python) for name, python in
                (("stock", stock), ("patched", patched))}
    print(f"counting {cells:,} cells (store_history={store_history}) under callgrind: "
          f"stock IPython {versions['stock']} ({stock}), patched {versions['patched']} "
          f"({patched}) ...", flush=True)
    results = count_regions([argv, argv], 2, pythons=[stock, patched])
    per_cell = {name: (region - empty) / cells
                for name, (region, empty) in zip(("stock", "patched"), results)}
    added = per_cell["patched"] - per_cell["stock"]
    ratio = per_cell["patched"] / per_cell["stock"]
    print(f"instructions per trivial cell: stock {per_cell['stock']:,.0f}, patched "
          f"{per_cell['patched']:,.0f}: {added:+,.0f} ({ratio - 1:+.1%}; target <= +3.0 %)")
    return {"cells": cells, "store_history": store_history, "versions": versions,
            "stock": per_cell["stock"], "patched": per_cell["patched"],
            "added": added, "ratio": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stock", metavar="PYTHON", help="interpreter with stock IPython")
    parser.add_argument("--patched", metavar="PYTHON", help="interpreter with the patched build")
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--store-history", action="store_true")
    parser.add_argument("--pieces", action="store_true",
                        help="also count the per-cell pieces the series changes, alone")
    parser.add_argument("--run-cells", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-pieces", type=int, help=argparse.SUPPRESS)
    # `nox -s bench -- --quick` passes the same flags to every bench script
    args, _ignored = parser.parse_known_args()
    if args.run_cells is not None:
        run_cells(args.run_cells, args.store_history)
        return
    if args.run_pieces is not None:
        run_pieces(args.run_pieces)
        return
    if shutil.which("valgrind") is None:
        print("bench_patches: skipped, instruction counts need valgrind on PATH")
        return
    os.makedirs(VENVS, exist_ok=True)
    stock = args.stock or stock_python(_pin()["version"])
    patched = args.patched or patched_python()
    counted = count(stock, patched, args.cells, args.store_history)
    if args.pieces:
        counted["pieces"] = count_pieces(stock, patched)
    name = "patches" + ("-history" if args.store_history else "")
    print(f"wrote {write_results(name, counted)}")
    print(json.dumps({k: counted[k] for k in ("stock", "patched", "ratio")}))


if __name__ == "__main__":
    main()
