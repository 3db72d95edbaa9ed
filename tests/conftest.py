"""Shared fixtures: one IPython shell per test process, the extension fresh per test."""

from __future__ import annotations

import atexit
import faulthandler
import os
import shutil
import sys
import tempfile

# Every shell of the run (this process's and the servers', kernels' and
# workers' it starts) keeps its profile and history in a directory of the
# run's own: never the user's ~/.ipython, whose history database another run
# (a second test run, a developer's IPython) may be writing at the same time.
_IPYTHONDIR = os.environ["IPYTHONDIR"] = tempfile.mkdtemp(prefix="pyrepl3-tests-ipython-")
# registered before any shell's: atexit runs it after they closed their history
atexit.register(shutil.rmtree, _IPYTHONDIR, ignore_errors=True)

import IPython  # noqa: E402
import pytest  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

import pyrepl3_ext  # noqa: E402


_watchdog_fd: int | None = None


def pytest_configure(config):
    """Keep a copy of the real stderr for the watchdog (capture redirects fd 2)."""
    global _watchdog_fd
    _watchdog_fd = os.dup(sys.__stderr__.fileno())


def pytest_collection_modifyitems(config, items):
    """``PYREPL3_SKIP_HEAVY``: nox runs the tests marked ``heavy`` (costly,
    and not about the IPython version) once per Python, in the session with
    its newest IPython; the other sessions skip them and say so."""
    if not os.environ.get("PYREPL3_SKIP_HEAVY"):
        return
    skip = pytest.mark.skip(reason="PYREPL3_SKIP_HEAVY: run once per Python, in the nox "
                                   "session with its newest IPython")
    for item in items:
        if item.get_closest_marker("heavy"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    """The random order's seed, also under ``-q`` (nox), where pytest-randomly's
    header line is not shown: a failure that depends on the order reruns
    with ``-p randomly --randomly-seed=N``."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"random order: --randomly-seed={seed}")


def pytest_unconfigure(config):
    """The process must also exit: a thread a test left running (or an
    atexit handler) must not hold the interpreter open for ever."""
    if _watchdog_fd is not None:
        faulthandler.dump_traceback_later(60, exit=True, file=_watchdog_fd)


@pytest.fixture(autouse=True)
def hang_watchdog(request):
    """Kill the run with every thread's C-level stack if a test wedges.

    pytest-timeout's thread needs the GIL; a cancellation bug that leaves
    the GIL held (or hits that thread) would hang CI silently.  faulthandler's
    watchdog is a C thread, so it fires regardless, 30 s after pytest-timeout
    should have.
    """
    limit = request.config.getini("timeout")
    faulthandler.dump_traceback_later(float(limit or 120) + 30, exit=True,
                                      file=_watchdog_fd)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def shell():
    """The process's IPython shell (stock IPython supports one per process well)."""
    return InteractiveShell.instance()


@pytest.fixture
def ip(shell):
    """``shell`` with pyrepl3_ext freshly loaded; unloaded (and checked) afterwards.

    ``%config PyREPL3.x = ...`` writes the shell's config, which the next
    load reads: each test gets the settings back as they were.
    """
    settings = dict(shell.config.PyREPL3)
    pyrepl3_ext.load_ipython_extension(shell)
    try:
        yield shell
    finally:
        pyrepl3_ext.unload_ipython_extension(shell)
        shell.config.PyREPL3.clear()
        shell.config.PyREPL3.update(settings)


@pytest.fixture
def quiet(ip):
    """``ip`` with IPython's traceback printing at its cheapest settings (plain,
    no colour), for tests whose cells fail or are cancelled by the hundred.

    The real formatter, with the extension's own wrappers around it, still
    runs: it is what users run on the cancel path."""
    mode, colors = ip.InteractiveTB.mode, ip.colors
    ip.run_line_magic("xmode", "Plain")
    ip.run_line_magic("colors", "nocolor" if IPython.version_info[0] >= 9 else "NoColor")
    try:
        yield ip
    finally:
        ip.run_line_magic("colors", colors)
        ip.run_line_magic("xmode", mode)


@pytest.fixture
def events(ip):
    """Every event of ``ip`` during the test, in arrival order."""
    received: list[dict] = []
    unsubscribe = pyrepl3_ext.subscribe(ip, received.append)
    yield received
    unsubscribe()


def by_execution(events: list[dict], execution_id: str) -> list[dict]:
    return [e for e in events if e["execution_id"] == execution_id]


def hook_snapshot(shell) -> dict:
    """Everything an extension could leave behind in a shell or the process.

    ``test_unload_restores_everything`` compares this before load and after
    unload; capability tests can reuse it.
    """
    import builtins
    import signal
    import sys

    mm = shell.magics_manager
    snap = {
        "events": {name: list(cbs) for name, cbs in shell.events.callbacks.items()},
        "input_transformers_cleanup": list(shell.input_transformers_cleanup),
        "input_transformers_post": list(shell.input_transformers_post),
        "ast_transformers": list(shell.ast_transformers),
        "line_magics": dict(mm.magics["line"]),
        "cell_magics": dict(mm.magics["cell"]),
        "magics_registry": dict(mm.registry),
        "configurables": list(shell.configurables),
        "user_ns_keys": set(shell.user_ns),
        # the security layers replace these values (not keys) in user_ns
        "user_ns_builtins": shell.user_ns.get("__builtins__"),
        "user_ns_get_ipython": shell.user_ns.get("get_ipython"),
        "user_ns_open": shell.user_ns.get("open"),
        "builtins": set(vars(builtins)),
        "trace": sys.gettrace(),
        "profile": sys.getprofile(),
        "displayhook": sys.displayhook,
        # instance attributes the extension wraps (trailing_semicolon, io_capture)
        "shell_displayhook": {name: value for name, value in vars(shell.displayhook).items()
                              if callable(value) and name not in ("_", "__", "___")},
        "excepthook": sys.excepthook,
        "stdout": sys.stdout,
        "stderr": sys.stderr,
        "stdin": sys.stdin,
        "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1,
                                                      signal.SIGUSR2, signal.SIGALRM)},
    }
    if sys.version_info >= (3, 12):
        snap["monitoring_tools"] = [sys.monitoring.get_tool(i) for i in range(6)]
        snap["monitoring_events"] = [sys.monitoring.get_events(i) for i in range(6)]
    import getpass
    import threading

    snap["thread_start"] = threading.Thread.start
    snap["input"] = builtins.input
    snap["getpass"] = getpass.getpass
    try:
        snap["threading_trace"] = threading.gettrace()
    except AttributeError:  # Python 3.10 has no threading.gettrace
        pass
    return snap
