"""nox sessions: the test matrix, the patched build, upstream's suite, benchmarks.

Python interpreters come from pyenv: run with
``PYENV_VERSION=3.11.7:3.12.1:3.13.0:3.10.13`` so ``python3.10`` ..
``python3.13`` are all on PATH.  A missing interpreter is an error, not a skip.
"""

from __future__ import annotations

import nox

nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = False

#: The stock IPython releases we test: the oldest and newest supported of
#: each major series, with every Python each of them supports.
IPYTHON_MATRIX = {
    "8.12.3": ["3.10", "3.11"],
    "8.39.0": ["3.10", "3.11", "3.12", "3.13"],
    "9.0.2": ["3.11", "3.12", "3.13"],
    "9.18.1": ["3.11", "3.12", "3.13"],
}
MATRIX = [nox.param(py, ip, id=f"py{py}-ipython{ip}")
          for ip, pys in IPYTHON_MATRIX.items() for py in pys]
#: the session that runs the long variants of the heavy tests (server fuzz)
NEWEST = ("3.13", "9.18.1")


@nox.session
@nox.parametrize("python,ipython", MATRIX)
def tests(session: nox.Session, ipython: str) -> None:
    """The project's tests on stock IPython."""
    session.install(f"ipython=={ipython}", "-e", ".[test]")
    env = {}
    if (session.python, ipython) == NEWEST:
        env["PYREPL3_FUZZ_MESSAGES"] = "100000"  # the full fuzz run, once per matrix
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                *session.posargs, env=env)


@nox.session(python=["3.11", "3.12", "3.13"], default=False)
def bench(session: nox.Session) -> None:
    """Every ``bench/bench_*.py`` on stock IPython 9.18.1; ``-- NAME`` picks scripts.

    Results go to ``bench/results/`` as JSON; the tables are printed.
    """
    import glob
    import os

    session.install("ipython==9.18.1", "-e", ".[test]")
    wanted = [a for a in session.posargs if not a.startswith("-")]
    flags = [a for a in session.posargs if a.startswith("-")]
    for script in sorted(glob.glob("bench/bench_*.py")):
        name = os.path.basename(script)[len("bench_"):-len(".py")]
        if wanted and name not in wanted:
            continue
        session.run("python", script, *flags)


@nox.session(python=False, default=False, name="patches")
def patches(session: nox.Session) -> None:
    """The upstream tool under the name the docs use: ``nox -s patches -- check 9.10.0 9.18.1``."""
    upstream(session)


@nox.session(python=False, default=False)
def upstream(session: nox.Session) -> None:
    """The upstream tool: ``nox -s upstream -- check 9.17.0`` (fetch/apply/refresh/build/check)."""
    if not session.posargs:
        session.error("say what to do, e.g. `nox -s upstream -- check 9.17.0` "
                      "(see `python upstream/upstream.py --help`)")
    session.run("python3", "upstream/upstream.py", *session.posargs)


@nox.session(python="3.12")
def patched(session: nox.Session) -> None:
    """Build the patched IPython wheel (pin + patches/series) and run the whole suite on it.

    ``tests/test_patched.py`` runs only here; every other test must hold on
    the patched build as on stock.
    """
    import glob

    session.install("pip")  # the build runs `python -m pip wheel`; uv venvs have no pip
    for step in ("fetch", "apply", "build"):
        session.run("python", "upstream/upstream.py", step)
    wheels = sorted(glob.glob("upstream/_work/dist/ipython-*+pyrepl3.*-py3-none-any.whl"))
    if not wheels:
        session.error("no patched wheel in upstream/_work/dist/")
    session.install(wheels[-1], "-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs)
