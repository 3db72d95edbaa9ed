"""The audit tripwire: scoped to the running cell (and threads it starts), denials reported."""

from __future__ import annotations

import os
import sys
import threading

import pytest

import pyrepl3_ext
from pyrepl3_ext.security import AuditDenied, SecurityPolicy
from pyrepl3_ext.security import audit

from .helpers import audits, run, session, value


@pytest.fixture
def guarded(ip):
    pyrepl3_ext.set_policy(ip, "guarded")
    return ip


def test_process_spawn_is_denied_and_reported(guarded, events):
    mine, error = run(guarded, events, "import os\nos.system('true')")
    assert error["kind"] == "security" and error["ename"] == "AuditDenied"
    assert "starting or signalling processes is refused by security policy 'guarded'" \
        in error["evalue"]
    denied = audits(mine, "denied")
    assert [d["event"] for d in denied] == ["os.system"]
    assert denied[0]["args"] == ["b'true'"]  # os.system audits the encoded command


def test_denials_are_reported_even_when_the_cell_swallows_them(guarded, events):
    mine, error = run(guarded, events,
                      "import subprocess\ntry:\n    subprocess.run(['true'])\n"
                      "except Exception:\n    pass\n'swallowed'")
    assert error is None
    assert [d["event"] for d in audits(mine, "denied")] == ["subprocess.Popen"]
    assert session(guarded).log[-1]["event"] == "subprocess.Popen"


def test_network_and_writes_outside_roots_are_denied(guarded, events, tmp_path):
    _, error = run(guarded, events,
                   "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)")
    assert error["ename"] == "AuditDenied" and "network" in error["evalue"]
    target = tmp_path / "out.txt"
    _, error = run(guarded, events, f"open({str(target)!r}, 'w')")
    assert "writing" in error["evalue"] and "outside the granted roots" in error["evalue"]
    assert not target.exists()
    # reads stay allowed in guarded
    (tmp_path / "in.txt").write_text("data")
    run(guarded, events, f"with open({str(tmp_path / 'in.txt')!r}) as f:\n    data = f.read()")
    assert value(guarded, events, "data") == "'data'"


def test_writes_inside_a_granted_root_are_allowed(guarded, events, tmp_path):
    pyrepl3_ext.grant(guarded, "files", pyrepl3_ext.security.FilesCapability(str(tmp_path)))
    run(guarded, events, f"with open({str(tmp_path / 'w.txt')!r}, 'w') as f:\n    f.write('ok')")
    assert (tmp_path / "w.txt").read_text() == "ok"


def test_restricted_reads_only_python_and_granted_roots(ip, events, tmp_path):
    pyrepl3_ext.set_policy(ip, SecurityPolicy.preset("restricted").replace(
        allowed_modules={"pathlib": frozenset({"Path"}), "json": None}))
    secret = tmp_path / "secret"
    secret.write_text("token")
    _, error = run(ip, events, f"import pathlib\npathlib.Path({str(secret)!r}).read_text()")
    assert error["ename"] == "AuditDenied"
    assert "reading" in error["evalue"] and "'open'" in error["evalue"]
    # a cold import of a stdlib module still reads its source
    assert run(ip, events, "import json\njson.dumps([1])")[1] is None


def test_the_scope_ends_with_the_cell(guarded, events, tmp_path):
    run(guarded, events, "x = 1")
    # host code outside a cell is never affected
    target = tmp_path / "host.txt"
    target.write_text("host")
    assert target.read_text() == "host"
    assert audit._scopes.get(threading.get_ident()) is None


def test_other_threads_are_not_affected_while_a_cell_runs(guarded, events, tmp_path):
    started, release = threading.Event(), threading.Event()
    guarded.user_ns.update(started=started, release=release)
    outcome = {}

    def host_thread():
        started.wait(10)
        try:
            (tmp_path / "t.txt").write_text("from host thread")
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001
            outcome["error"] = exc
        release.set()

    thread = threading.Thread(target=host_thread)
    thread.start()
    _, error = run(guarded, events, "started.set()\nrelease.wait(10)")
    thread.join(10)
    assert error is None and outcome == {"ok": True}


def test_stdlib_may_read_frames_but_the_cell_may_not(guarded, events):
    assert run(guarded, events,
               "import collections\ncollections.namedtuple('P', 'x')(1)")[1] is None
    _, error = run(guarded, events, "import sys\nsys._getframe(0)")
    assert error["ename"] == "AuditDenied" and "reading frames" in error["evalue"]


def test_gc_and_ctypes_are_denied(guarded, events):
    _, error = run(guarded, events, "import gc\ngc.get_objects()")
    assert "walking the garbage collector" in error["evalue"]
    _, error = run(guarded, events, "import ctypes\nctypes.CDLL(None)")
    assert "ctypes" in error["evalue"]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="no thread-start audit event before 3.12")
def test_threads_started_by_the_cell_inherit_the_scope(guarded, events):
    mine, error = run(guarded, events,
                      "import threading, os\nresult = []\n"
                      "def target():\n    try:\n        os.system('true')\n"
                      "    except Exception as exc:\n        result.append(type(exc).__name__)\n"
                      "t = threading.Thread(target=target)\nt.start()\nt.join()\nresult")
    assert error is None
    assert guarded.user_ns["result"] == ["AuditDenied"]
    assert "os.system" in [d["event"] for d in audits(mine, "denied")]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="no thread-start audit event before 3.12")
def test_raw_threads_from_the_cell_are_refused(guarded, events):
    _, error = run(guarded, events,
                   "import _thread\n_thread.start_new_thread(print, ('x',))")
    assert "raw thread" in error["evalue"]


@pytest.mark.skipif(sys.version_info < (3, 12),
                    reason="no thread-start audit event before 3.12 (docs/security.md)")
def test_restricted_refuses_threads(ip, events):
    pyrepl3_ext.set_policy(ip, SecurityPolicy.preset("restricted").replace(
        allowed_modules={"threading": frozenset({"Thread"})}))
    _, error = run(ip, events, "import threading\nthreading.Thread(target=len, args=('',)).start()")
    assert error is not None and error["ename"] == "AuditDenied"
    assert "starting threads" in error["evalue"]


def test_restricted_makes_threading_unimportable(ip, events):
    """The defence that holds on every Python (3.10/3.11 raise no thread-start
    event, so there ``restricted`` relies on this alone)."""
    pyrepl3_ext.set_policy(ip, "restricted")
    for module in ("threading", "_thread"):
        _, error = run(ip, events, f"import {module}")
        assert error is not None and error["kind"] == "security", (module, error)


def test_audit_denied_is_both_security_and_permission_error():
    assert issubclass(AuditDenied, pyrepl3_ext.SecurityError)
    assert issubclass(AuditDenied, PermissionError)


def test_hook_is_inert_without_a_scope(tmp_path):
    audit.install()
    path = tmp_path / "free.txt"
    path.write_text("x")  # no scope on this thread: nothing refused
    assert os.path.exists(path)


def test_cancellation_still_works_inside_the_audit_scope(ip, events):
    """The cancel machinery (signal handler, settrace, frames) is host code."""
    pyrepl3_ext.set_policy(ip, "restricted")
    mine, error = run(ip, events, "while True:\n    pass", timeout=0.3)
    assert error["kind"] == "timeout"
    assert not audits(mine, "denied")
    assert run(ip, events, "x = 1")[1] is None


def test_cancellation_of_a_worker_thread_cell_inside_the_audit_scope(ip, events):
    pyrepl3_ext.set_policy(ip, "restricted")
    outcome = {}

    def worker():
        outcome["events"], outcome["error"] = run(ip, events, "while True:\n    pass",
                                                  timeout=0.3)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert outcome["error"]["kind"] == "timeout"
    assert not audits(outcome["events"], "denied")
