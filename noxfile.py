"""nox sessions: the test matrix, the patched build, the package, upstream's suite, benchmarks.

Python interpreters come from pyenv: run with
``PYENV_VERSION=3.11.7:3.12.1:3.13.0:3.10.13`` so ``python3.10`` ..
``python3.13`` are all on PATH.  A missing interpreter is an error, not a skip.
"""

from __future__ import annotations

import nox

nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = False

#: The stock IPython releases we test: the oldest and newest of each major
#: series.  Each runs on the oldest and the newest Python it supports; the
#: newest release (also the patch series' pin) runs on every Python.  The
#: middle Pythons of the older releases were dropped for CI time: nothing in
#: the extension depends on the pair of a middle Python and an old IPython.
IPYTHON_MATRIX = {
    "8.12.3": ["3.10", "3.11"],
    "8.39.0": ["3.10", "3.13"],
    "9.0.2": ["3.11", "3.13"],
    "9.19.1": ["3.11", "3.12", "3.13"],
}
MATRIX = [nox.param(py, ip, id=f"py{py}-ipython{ip}")
          for ip, pys in IPYTHON_MATRIX.items() for py in pys]
#: the session that runs the long variants of the heavy tests (server fuzz)
NEWEST = ("3.13", "9.19.1")
#: per Python, the session that runs the tests marked ``heavy`` (costly, and
#: not about the IPython version: process sessions, confinement, limits,
#: checkpoints, server load, the corpus' controls): the newest IPython each
#: Python has.  The others set PYREPL3_SKIP_HEAVY and skip them, saying so
#: (tests/conftest.py); the patched session runs everything.
HEAVY = {("3.10", "8.39.0"), ("3.11", "9.19.1"), ("3.12", "9.19.1"), ("3.13", "9.19.1")}


@nox.session
@nox.parametrize("python,ipython", MATRIX)
def tests(session: nox.Session, ipython: str) -> None:
    """The project's tests on stock IPython (the newest pair with the ``fast``
    extra: the server's orjson/uvloop path under the full fuzz run; the
    others test the stdlib path)."""
    extras = "test,fast" if (session.python, ipython) == NEWEST else "test"
    session.install(f"ipython=={ipython}", "-e", f".[{extras}]")
    env = {}
    if (session.python, ipython) == NEWEST:
        env["PYREPL3_FUZZ_MESSAGES"] = "100000"  # the full fuzz run, once per matrix
    if (session.python, ipython) not in HEAVY:
        env["PYREPL3_SKIP_HEAVY"] = "1"
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                *session.posargs, env=env)


@nox.session(python="3.12")
def package(session: nox.Session) -> None:
    """Build the sdist and the wheel (``python -m build``) and check their
    metadata with ``twine check --strict``: what a PyPI upload would get."""
    import glob
    import shutil

    session.install("build", "twine")
    out = f"{session.create_tmp()}/dist"
    shutil.rmtree(out, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", out)
    session.run("twine", "check", "--strict", *sorted(glob.glob(f"{out}/*")))


@nox.session(python="3.12")
def scaleout(session: nox.Session) -> None:
    """Sessions on a Ray cluster through the gateway: a 3-node cluster
    simulated on this machine (tests/test_scaleout_ray.py, with the gateway's
    own tests), on stock IPython."""
    session.install("ipython==9.19.1", "-e", ".[test,ray]")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/test_scaleout_ray.py", "tests/test_gateway.py", *session.posargs)


@nox.session(python=["3.11", "3.12", "3.13"], default=False)
def bench(session: nox.Session) -> None:
    """Every ``bench/bench_*.py`` on stock IPython 9.19.1; ``-- NAME`` picks scripts.

    ``bench_patches.py`` counts the patched build against this stock one
    (it builds the patched environment itself, under ``upstream/_work/``).
    Results go to ``bench/results/`` as JSON; the tables are printed.
    """
    import glob
    import os

    session.install("pip")  # bench_patches builds the patched wheel with `python -m pip wheel`
    # test: bench_server's Jupyter reference; fast: the server's codec and loop;
    # ray: bench_scaleout's cluster
    session.install("ipython==9.19.1", "-e", ".[test,fast,ray]")
    wanted = [a for a in session.posargs if not a.startswith("-")]
    flags = [a for a in session.posargs if a.startswith("-")]
    for script in sorted(glob.glob("bench/bench_*.py")):
        name = os.path.basename(script)[len("bench_"):-len(".py")]
        if wanted and name not in wanted:
            continue
        session.run("python", script, *flags)


@nox.session(python=False, default=False, name="patches")
def patches(session: nox.Session) -> None:
    """The upstream tool under the name the docs use: ``nox -s patches -- check 9.10.0 9.19.1``."""
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
    session.install("pip")  # the build runs `python -m pip wheel`; uv venvs have no pip
    # the README's install command, into this session's venv: fetch, apply,
    # build, pip install the wheel and pyrepl3 (test_cli checks the result)
    session.run("python", "upstream/upstream.py", "install")
    session.install("-e", ".[test]")  # the installed patched IPython satisfies it
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *session.posargs,
                env={"PYREPL3_EXPECT_BUILD": "patched"})


#: Doctest modules upstream's own pytest configuration ignores (its
#: ``addopts``), as paths inside the installed ``IPython`` package.
UPSTREAM_DOCTEST_IGNORES = ("sphinxext", "terminal/pt_inputhooks", "__main__.py",
                            "external/qt_for_kernel.py", "utils/_process_posix.py")


def _junit_outcomes(path: str) -> dict[str, str]:
    """test id -> passed | failed | skipped, from a pytest junit XML file."""
    import xml.etree.ElementTree as ET

    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[test_id] = ("failed" if kinds & {"failure", "error"}
                             else "skipped" if "skipped" in kinds else "passed")
    return outcomes


@nox.session(python="3.12", default=False)
def upstream_tests(session: nox.Session) -> None:
    """IPython's own test suite (from the pinned sdist) on stock IPython and on
    the patched build; fails if a test fails only on the patched build.

    Each build runs its own copy of upstream's ``tests/`` (the patched build's
    carries the patches' changes to upstream tests) and the package doctests,
    against the installed IPython, never the source tree.
    """
    import glob
    import shutil
    from pathlib import Path

    session.install("pip")  # the build runs `python -m pip wheel`
    for step in ("fetch", "apply", "build"):
        session.run("python", "upstream/upstream.py", step)
    wheel = sorted(glob.glob("upstream/_work/dist/ipython-*+pyrepl3.*-py3-none-any.whl"))[-1]
    version = Path(wheel).name.split("-")[1].split("+")[0]
    trees = {"stock": Path(f"upstream/_work/pristine/ipython-{version}"),
             "patched": Path(f"upstream/_work/ipython-{version}")}
    installs = {"stock": [f"ipython[test]=={version}"],
                "patched": ["--force-reinstall", f"{Path(wheel).resolve()}[test]"]}
    tmp = Path(session.create_tmp()).resolve()
    results: dict[str, dict[str, str]] = {}
    for build in ("stock", "patched"):
        suite = tmp / f"suite-{build}"  # outside the source tree: the installed IPython is tested
        shutil.rmtree(suite, ignore_errors=True)
        suite.mkdir()
        shutil.copytree(trees[build] / "tests", suite / "tests")
        for name in ("conftest.py", "pyproject.toml"):
            shutil.copy(trees[build] / name, suite / name)
        session.install(*installs[build])
        package = session.run("python", "-c", "import IPython, os; print(os.path.dirname(IPython.__file__))",
                              silent=True).strip().splitlines()[-1]
        common = ["python", "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                  "-p", "IPython.testing.plugin.pytest_ipdoctest"]
        with session.chdir(suite):
            session.run(*common, f"--junitxml={tmp / build}-tests.xml", "tests", success_codes=[0, 1])
            session.run(*common, "--ipdoctest-modules", "--pyargs", "IPython",
                        *[f"--ignore={package}/{p}" for p in UPSTREAM_DOCTEST_IGNORES],
                        f"--junitxml={tmp / build}-doctests.xml", success_codes=[0, 1])
        results[build] = {**_junit_outcomes(f"{tmp / build}-tests.xml"),
                          **_junit_outcomes(f"{tmp / build}-doctests.xml")}
    for build, outcomes in results.items():
        counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("passed", "failed", "skipped")}
        session.log(f"{build}: {len(outcomes)} tests, " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    stock, patched = results["stock"], results["patched"]
    new = sorted(t for t, v in patched.items() if v == "failed" and stock.get(t) != "failed")
    fixed = sorted(t for t, v in stock.items() if v == "failed" and patched.get(t) == "passed")
    missing = sorted(set(stock) - set(patched))
    for label, ids in (("fail only on the patched build", new), ("fail only on stock", fixed),
                       ("ran only on stock", missing)):
        session.log(f"{len(ids)} {label}" + "".join(f"\n  {t}" for t in ids))
    if new:
        session.error(f"{len(new)} new failure(s) on the patched build")
