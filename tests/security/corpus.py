"""Runs the escape corpus and the benign corpus, one fresh process per run.

Each payload runs in its own process, forked from a parent that has already
imported IPython and pyrepl3 (a fresh interpreter state for each payload at
a fraction of a cold start), at most ``--jobs`` at a time.

    python -m tests.security.corpus escapes restricted   # 0 escapes expected
    python -m tests.security.corpus escapes control      # every payload escapes
    python -m tests.security.corpus escapes guarded codegen later   # some classes or ids
    python -m tests.security.corpus benign               # trusted vs restricted
    python -m tests.security.corpus escapes-process trusted   # OS confinement alone: 0 expected
    python -m tests.security.corpus escapes-process trusted unconfined   # its control

A payload *escapes* when the canary token (a fresh random secret in a file
outside every granted root) shows up in the cell's output or in ``pwned``,
or when the marker file its command touches exists.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time

ESCAPE_MODULES = ("direct", "deserialization", "frames", "indirect",
                  "capabilities", "evasion", "private", "name_gadgets", "codegen",
                  "matching", "spawn", "later", "cap_reach", "hardlinks")


def load_payloads() -> list[dict]:
    payloads = []
    for name in ESCAPE_MODULES:
        module = importlib.import_module(f"tests.security.escapes.{name}")
        for entry in module.PAYLOADS:
            pid, cls, goal, code = entry[:4]
            min_python = entry[4] if len(entry) > 4 else (3, 0)
            setup = entry[5] if len(entry) > 5 else {}
            payloads.append({"id": pid, "class": cls, "goal": goal, "code": code,
                             "min_python": tuple(min_python),
                             "links": list(setup.get("links", ())),
                             # "capability": the host's capability object, which a
                             # process session's parent serves; "host": the
                             # in-process host's own functions
                             "aims_at": setup.get("aims_at")})
    return payloads


def _new_shell():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.colors = "NoColor"
    # plain tracebacks: the verbose ones parse every frame's source file
    # (stack_data), which dominates a fresh process's run time
    config.InteractiveShell.xmode = "Plain"
    return InteractiveShell.instance(config=config)


def _plant_links(payload: dict, root: str, secret: str) -> None:
    """Hard links to the canary inside the root, as someone else would plant them."""
    for rel in payload.get("links", ()):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.link(secret, path)


def _plant(payload: dict, workdir: str) -> tuple[str, str, str, str]:
    """The canary (a fresh secret outside every granted root), the marker a
    command would create, the files root (with the hard links the payload
    asks for), and the payload's code filled in."""
    canary = os.path.join(workdir, "canary")
    root = os.path.join(workdir, "root")
    os.makedirs(canary)
    os.makedirs(root)
    token = secrets.token_hex(16)
    secret = os.path.join(canary, "secret")
    with open(secret, "w") as f:
        f.write(token + "\n")
    marker = os.path.join(canary, "ran")
    cmd = f"cat {secret}; touch {marker}"
    code = (payload["code"].replace("@S@", repr(secret)).replace("@C@", repr(cmd))
            .replace("@RAW@", cmd).replace("@ROOT@", repr(root)))
    _plant_links(payload, root, secret)
    return token, marker, root, code


def _escape_child(payload: dict, mode: str, workdir: str) -> dict:
    import pyrepl3_ext
    from pyrepl3_ext.security import FilesCapability

    token, marker, root, code = _plant(payload, workdir)

    shell = _new_shell()
    pyrepl3_ext.load_ipython_extension(shell)
    events: list[dict] = []
    pyrepl3_ext.subscribe(shell, events.append)
    if mode == "control":
        from tests.security.naive_caps import NaiveFiles

        shell.user_ns["files"] = NaiveFiles(root)
    else:
        pyrepl3_ext.set_policy(shell, mode)
        pyrepl3_ext.grant(shell, "files", FilesCapability(root))
    pyrepl3_ext.run_cell(shell, code, store_history=False)
    pwned = shell.user_ns.get("pwned")
    try:
        pwned_text = str(pwned)
    except Exception:  # noqa: BLE001
        pwned_text = ""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(os.path.join(workdir, "out"), encoding="utf-8", errors="replace") as f:
        output = f.read()
    error = next((e for e in events if e["type"] == "error"), None)
    return {
        "id": payload["id"], "class": payload["class"], "mode": mode,
        "escaped": token in output or token in pwned_text or os.path.exists(marker),
        "error_kind": error and error["kind"], "ename": error and error["ename"],
        "evalue": error and error["evalue"][:300],
        "denials": [e["message"] for e in events if e["type"] == "audit"
                    and e.get("action") == "denied"],
    }


def _benign_child(policy: str, workdir: str) -> dict:
    import contextlib
    import io

    import pyrepl3_ext
    from pyrepl3_ext.security import FilesCapability
    from tests.security.benign import CELLS

    root = os.path.join(workdir, "root")
    os.makedirs(root)
    with open(os.path.join(root, "data.csv"), "w") as f:
        f.write("name,value\na,1\nb,2\nc,3\n")
    shell = _new_shell()
    pyrepl3_ext.load_ipython_extension(shell)
    events: list[dict] = []
    pyrepl3_ext.subscribe(shell, events.append)
    pyrepl3_ext.set_policy(shell, policy)
    pyrepl3_ext.grant(shell, "files", FilesCapability(root))
    outcomes = []
    for cell in CELLS:
        events.clear()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            pyrepl3_ext.run_cell(shell, cell)
        error = next((e for e in events if e["type"] == "error"), None)
        result = next((e for e in events if e["type"] == "result"), None)
        outcomes.append({
            "status": "error" if error else "ok",
            "ename": error and error["ename"],
            "evalue": error and error["evalue"][:300],
            "kind": error and error["kind"],
            "result": result and result["data"].get("text/plain"),
            "stdout": "" if error else buffer.getvalue().split("Out[")[0],
        })
    return {"policy": policy, "cells": outcomes}


def _fork(work, *args) -> tuple[int, str]:
    workdir = tempfile.mkdtemp(prefix="pyrepl3-corpus-")
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            fd = os.open(os.path.join(workdir, "out"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            result = work(*args, workdir)
            with open(os.path.join(workdir, "result.json"), "w") as f:
                json.dump(result, f)
        except BaseException as exc:  # noqa: BLE001 - report, never escape the child
            with open(os.path.join(workdir, "crash"), "w") as f:
                f.write(repr(exc))
            code = 1
        os._exit(code)
    return pid, workdir


def run_many(jobs: list[tuple], parallel: int = 2, timeout: float = 30.0) -> list[dict]:
    """Run each ``(work, *args)`` in a forked child; results in order."""
    results: list[dict | None] = [None] * len(jobs)
    pending = list(enumerate(jobs))
    running: dict[int, tuple[int, str, float]] = {}
    while pending or running:
        while pending and len(running) < parallel:
            index, (work, *args) = pending.pop(0)
            pid, workdir = _fork(work, *args)
            running[pid] = (index, workdir, time.monotonic())
        pid, _status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            now = time.monotonic()
            for cpid, (index, workdir, t0) in list(running.items()):
                if now - t0 > timeout:
                    os.kill(cpid, signal.SIGKILL)
            time.sleep(0.005)
            continue
        if pid not in running:
            continue
        index, workdir, t0 = running.pop(pid)
        path = os.path.join(workdir, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                results[index] = json.load(f)
            results[index]["seconds"] = round(time.monotonic() - t0, 3)
        else:
            crash = ""
            for name in ("crash", "out"):
                p = os.path.join(workdir, name)
                if os.path.exists(p):
                    with open(p, errors="replace") as f:
                        crash += f.read()[-2000:]
            results[index] = {"crashed": True, "detail": crash}
        shutil.rmtree(workdir, ignore_errors=True)
    return results  # type: ignore[return-value]


def run_escapes(mode: str, parallel: int = 2, only: tuple = ()) -> list[dict]:
    """Every payload (or those whose id or class is in ``only``) under ``mode``."""
    payloads = [p for p in load_payloads() if sys.version_info[:2] >= p["min_python"]
                and (not only or p["id"] in only or p["class"] in only)]
    results = run_many([(_escape_child, p, mode) for p in payloads], parallel)
    for payload, result in zip(payloads, results):
        result.setdefault("id", payload["id"])
        result.setdefault("class", payload["class"])
    return results


def run_benign(parallel: int = 2) -> dict:
    trusted, restricted = run_many([(_benign_child, "trusted"),
                                    (_benign_child, "restricted")], parallel)
    return {"trusted": trusted, "restricted": restricted}


def _modules_child(workdir: str) -> dict:
    before = set(sys.modules)
    _escape_child({"id": "probe", "class": "probe", "code": "x = 1"}, "restricted",
                  workdir)
    return {"modules": sorted(set(sys.modules) - before)}


def _prepare() -> None:
    """Import, in the parent, what creating a shell and running a cell imports.

    Every forked child then starts warm (and with those modules already
    loaded: the worst case for the audit layer, whose import events fire
    only on first import).  The parent itself never creates a shell.
    """
    os.environ.setdefault("IPYTHONDIR", tempfile.mkdtemp(prefix="pyrepl3-ipydir-"))
    import IPython.core.interactiveshell  # noqa: F401

    import pyrepl3_ext  # noqa: F401
    import pyrepl3_ext.security.component  # noqa: F401

    probe = run_many([(_modules_child,)], 1)[0]
    for name in probe.get("modules", []):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - best effort warm-up
            pass
    # a pristine shell (it never ran a cell, no extension, no policy, no
    # audit hook): each forked child gets its own copy of it
    _new_shell()


def run_escapes_in_processes(policy: str, confine: bool = True) -> list[dict]:
    """Each payload in a process session of its own (``isolation="process"``).

    With ``policy="trusted"`` and ``confine=True`` the in-process guard is
    off and only the OS confinement stands between the payload and the
    canary: this run shows that layer holding on its own.  The canary lives
    in a fresh directory outside every allowed path; the ``files``
    capability is served by this process (the parent) on a root of its own.
    """
    from pyrepl3_ext import Engine
    from pyrepl3_ext.security import FilesCapability
    from traitlets.config import Config

    payloads = [p for p in load_payloads() if sys.version_info[:2] >= p["min_python"]]
    results = []
    with Engine(kill_grace=2.0) as engine:
        for payload in payloads:
            workdir = tempfile.mkdtemp(prefix="pyrepl3-corpus-")
            try:
                results.append(_escape_in_process(engine, payload, policy, confine, workdir,
                                                  Config, FilesCapability))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    return results


def _escape_in_process(engine, payload, policy, confine, workdir, Config, FilesCapability):
    token, marker, root, code = _plant(payload, workdir)
    config = Config()
    config.PyREPL3.security_policy = policy
    config.InteractiveShell.xmode = "Plain"
    session = engine.create_session(isolation="process", confine=confine, config=config)
    try:
        session.grant("files", FilesCapability(root))
        events: list[dict] = []
        session.execute(code, on_event=events.append, timeout=20, store_history=False)
        seen = json.dumps(events)
        pwned = ""
        if session.lost is None:
            try:
                pwned = json.dumps(session.variable("pwned", max_repr=10000))
            except Exception:  # noqa: BLE001 - no such name: nothing was read
                pwned = ""
        error = next((e for e in events if e["type"] == "error"), None)
        return {
            "id": payload["id"], "class": payload["class"], "mode": f"process-{policy}",
            "confined": session.confinement,
            "escaped": token in seen or token in pwned or os.path.exists(marker),
            "error_kind": error and error["kind"], "ename": error and error["ename"],
            "evalue": error and error["evalue"][:300],
            "lost": session.lost and session.lost["kind"],
        }
    finally:
        session.close()


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "escapes"
    t0 = time.monotonic()
    if what == "escapes-process":
        policy = argv[1] if len(argv) > 1 else "trusted"
        confine = (argv[2] if len(argv) > 2 else "confined") == "confined"
        out = {"mode": f"process-{policy}", "confined": confine,
               "results": run_escapes_in_processes(policy, confine)}
        out["seconds"] = round(time.monotonic() - t0, 2)
        json.dump(out, sys.stdout)
        return 0
    _prepare()
    if what == "escapes":
        mode = argv[1] if len(argv) > 1 else "restricted"
        out = {"mode": mode, "results": run_escapes(mode, only=tuple(argv[2:]))}
    elif what == "benign":
        out = run_benign()
    else:
        raise SystemExit(f"unknown corpus {what!r}")
    out["seconds"] = round(time.monotonic() - t0, 2)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
