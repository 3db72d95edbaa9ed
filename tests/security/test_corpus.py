"""The escape corpus (0 escapes under ``restricted``, every payload escapes
unprotected) and the benign corpus (runs unchanged under ``restricted``)."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys

import pytest

from .benign import CELLS
from .corpus import load_payloads

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux",
                                reason="the corpus runner forks; the files "
                                       "capability needs openat")


def run_corpus(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tests.security.corpus", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_corpus_size_and_classes():
    payloads = load_payloads()
    assert len(payloads) >= 60
    classes = collections.Counter(p["class"] for p in payloads)
    assert len(classes) >= 15, classes
    assert len({p["id"] for p in payloads}) == len(payloads)


@pytest.mark.heavy
@pytest.mark.timeout(300)
def test_positive_controls_escape_unprotected():
    """Each payload really works without protection (naive host capability)."""
    out = run_corpus("escapes", "control")
    failed = [r for r in out["results"] if not r.get("escaped")]
    assert not failed, failed


@pytest.mark.timeout(300)
def test_no_escape_under_restricted():
    out = run_corpus("escapes", "restricted")
    results = out["results"]
    assert len(results) >= 60
    escaped = [r for r in results if r.get("escaped") or r.get("crashed")]
    assert not escaped, escaped
    # every payload was stopped by an error, and most before anything ran
    assert all(r["ename"] for r in results), [r for r in results if not r["ename"]]
    kinds = collections.Counter(r["error_kind"] for r in results)
    assert kinds["security"] >= len(results) * 0.8, kinds


@pytest.mark.heavy
@pytest.mark.timeout(300)
def test_guarded_stops_every_command_payload():
    """``guarded`` allows reads by design; nothing may run a command.

    Except the documented hole: before 3.12 no audit event announces a new
    thread, so a thread the cell starts is not followed (``guarded`` leaves
    ``threading`` importable; ``restricted`` does not).
    """
    out = run_corpus("escapes", "guarded")
    goals = {p["id"]: p["goal"] for p in load_payloads()}
    known = {"thread_target"} if sys.version_info < (3, 12) else set()
    ran = [r for r in out["results"]
           if goals[r["id"]] == "run_command" and (r.get("escaped") or r.get("crashed"))
           and r["id"] not in known]
    assert not ran, ran


_TIMING = re.compile(r"^(CPU times|Wall time):.*$", re.M)


def _normalise(outcome: dict) -> dict:
    return {**outcome, "stdout": _TIMING.sub(r"\1: <t>", outcome["stdout"] or "")}


@pytest.mark.heavy
@pytest.mark.timeout(300)
def test_benign_cells_run_unchanged_under_restricted():
    assert len(CELLS) >= 50
    out = run_corpus("benign")
    trusted = [_normalise(c) for c in out["trusted"]["cells"]]
    restricted = [_normalise(c) for c in out["restricted"]["cells"]]
    assert len(trusted) == len(restricted) == len(CELLS)
    # the corpus itself is meaningful: most cells succeed, a few raise on purpose
    assert sum(c["status"] == "ok" for c in trusted) >= len(CELLS) - 3
    same = [t == r for t, r in zip(trusted, restricted)]
    differing = [(CELLS[i], trusted[i], restricted[i]) for i, ok in enumerate(same) if not ok]
    assert sum(same) / len(CELLS) >= 0.98, differing


# -- process sessions: the OS layer on its own -------------------------------------

def _confinement_missing() -> str | None:
    from pyrepl3_ext.engine.confine import probe

    found = probe()
    if not found["landlock_abi"] or not found["seccomp"]:
        return "the kernel lacks Landlock or seccomp: process sessions cannot be confined here"
    return None


_unconfinable = pytest.mark.skipif(_confinement_missing() is not None,
                                   reason=_confinement_missing() or "")


def _processes(test):
    """The process-session corpus: confinable kernels only, heavy (once per Python)."""
    return pytest.mark.heavy(_unconfinable(test))


@_processes
@pytest.mark.timeout(300)
def test_process_sessions_without_confinement_are_escaped():
    """The control: in a process session that is not confined, with the guard
    off, every payload escapes, except those aimed at the host's capability
    object, which a process session does not hold (its parent serves it)."""
    out = run_corpus("escapes-process", "trusted", "unconfined")
    results = out["results"]
    aims = {p["id"]: p["aims_at"] for p in load_payloads()}
    held = [r for r in results if not r["escaped"]]
    assert all(r["id"].split("_")[0] in ("capability", "cap") or aims[r["id"]]
               for r in held), held
    assert len(held) <= 16, held


@_processes
@pytest.mark.timeout(300)
def test_os_confinement_alone_stops_every_payload():
    """Policy ``trusted`` (the in-process guard off) plus OS confinement."""
    out = run_corpus("escapes-process", "trusted", "confined")
    results = out["results"]
    assert len(results) >= 60
    escaped = [r for r in results if r["escaped"]]
    assert not escaped, escaped
    assert all(r["confined"]["seccomp"]["applied"] and r["confined"]["landlock"]["applied"]
               for r in results)


@_processes
@pytest.mark.timeout(300)
def test_guard_and_confinement_together_stop_every_payload():
    out = run_corpus("escapes-process", "restricted", "confined")
    escaped = [r for r in out["results"] if r["escaped"]]
    assert not escaped, escaped
