"""Process sessions: containment of crashes, cancellable blocking calls, the kill
after an ignored cancel, restart, and the Session API over the channel.

Every bound below is a "must not hang" bound, never a latency target: the
latencies are measured by ``bench/bench_isolation.py``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from pyrepl3_ext import CellCancelled, CellTimeout, Engine, SessionClosed
from pyrepl3_ext.errors import CellError, SessionLost, VariableNotFound

from .polling import wait_until

#: costly and not about the IPython version (tests/conftest.py)
pytestmark = pytest.mark.heavy

WAIT = 30
#: a blocked call the cancel must interrupt: far longer than any bound here
LONG = 100


@pytest.fixture(scope="module")
def engine():
    eng = Engine(kill_grace=2.0)
    eng.warm_up(wait=True)
    try:
        yield eng
    finally:
        assert eng.close(timeout=WAIT)


@pytest.fixture
def session(engine):
    s = engine.create_session(isolation="process")
    try:
        yield s
    finally:
        s.close(timeout=WAIT)


def _events(session, code, **options):
    events: list[dict] = []
    result = session.execute(code, on_event=events.append, **options)
    return result, events


def _started(handle):
    """Wait until the worker reports the cell started (it runs, then we cancel)."""
    wait_until(lambda: handle._job.started)


# -- the Session API over the channel ------------------------------------------

def test_a_process_session_runs_cells_in_its_own_process(session):
    result, events = _events(session, "import os\nx = 6\nx * 7")
    assert result.success and result.data == {"text/plain": "42"}
    assert [e["type"] for e in events] == ["started", "result", "finished"]
    assert [e["seq"] for e in events] == [0, 1, 2]
    assert {e["session"] for e in events} == {session.id}
    pid = session.execute("os.getpid()").data["text/plain"]
    assert int(pid) == session.pid != os.getpid()


def test_output_precedes_the_outcome_and_errors_keep_their_kind(session):
    result, events = _events(session, "print('a')\n1/0")
    assert [e["type"] for e in events] == ["started", "output", "error", "finished"]
    assert isinstance(result.error_in_exec, CellError)
    assert result.error_in_exec.ename == "ZeroDivisionError"
    assert events[2]["kind"] == "exception"
    result, events = _events(session, "def (")
    assert isinstance(result.error_before_exec, CellError)
    assert result.error_before_exec.kind == "syntax"


def test_namespace_and_snapshots_cross_the_channel(session):
    session.set_variable("data", {"k": [1, 2]})
    assert session.execute("data['k'][1]").data == {"text/plain": "2"}
    assert session.variable("data")["value"] == {"k": [1, 2]}
    assert "data" in {v["name"] for v in session.variables()}
    session.take_snapshot("s1")
    session.execute("data = None")
    session.restore_snapshot("s1")
    assert session.variable("data")["value"] == {"k": [1, 2]}
    session.delete_variable("data")
    with pytest.raises(VariableNotFound):
        session.variable("data")


def test_input_is_answered_by_the_host_or_ends(session):
    def answer(event):
        if event["type"] == "input_requested":
            threading.Thread(target=session.reply_input,
                             args=(event["input_id"], "alice")).start()

    result = session.execute("name = input('who? ')\nname.upper()", on_event=answer)
    assert result.data == {"text/plain": "'ALICE'"}
    # nobody listens: input() sees end of file instead of waiting for ever
    result = session.execute("input('who? ')")
    assert isinstance(result.error_in_exec, CellError)
    assert result.error_in_exec.ename == "EOFError"


def test_queued_executions_run_in_order_and_a_queued_cancel_never_runs(session):
    first = session.execute("import time; time.sleep(0.3); 1", wait=False)
    second = session.execute("ran = True", wait=False)
    third = session.execute("3", wait=False)
    assert session.cancel(second.execution_id)
    assert first.result(WAIT).data == {"text/plain": "1"}
    assert isinstance(second.result(WAIT).error_before_exec, CellCancelled)
    assert third.result(WAIT).data == {"text/plain": "3"}
    with pytest.raises(VariableNotFound):
        session.variable("ran")


def test_a_files_grant_is_served_by_the_parent(session, tmp_path):
    from pyrepl3_ext.security import FilesCapability

    (tmp_path / "in.txt").write_text("hello")
    session.grant("files", FilesCapability(str(tmp_path)))
    result = session.execute("files.write('out.txt', files.read('in.txt') * 2)\n"
                             "files.list('.')")
    assert sorted(eval(result.data["text/plain"])) == ["in.txt", "out.txt"]
    assert (tmp_path / "out.txt").read_text() == "hellohello"
    result = session.execute("files.read('../escape')")
    assert isinstance(result.error_in_exec, CellError)


def test_stock_or_patched_process_sessions_run_concurrently(engine, tmp_path):
    # a barrier across the three processes: each cell marks itself running,
    # then waits for the other two; run one after the other, the first
    # would wait for ever (result(WAIT) raises)
    sessions = [engine.create_session(isolation="process") for _ in range(3)]
    try:
        cell = ("import os, time\nopen(os.path.join({d!r}, {n!r}), 'w').close()\n"
                "while len(os.listdir({d!r})) < 3:\n    time.sleep(0.01)\n1")
        handles = [s.execute(cell.format(d=str(tmp_path), n=str(i)), wait=False)
                   for i, s in enumerate(sessions)]
        assert all(h.result(WAIT).data == {"text/plain": "1"} for h in handles)
    finally:
        for s in sessions:
            s.close()


# -- cancel and timeout: every blocking call -------------------------------------

BLOCKING = {
    "sleep": f"import time; time.sleep({LONG})",
    "event": "import threading; threading.Event().wait()",
    "queue": "import queue; queue.Queue().get()",
    "socket": "import socket\na, b = socket.socketpair()\na.recv(1)",
    "subprocess": f"import subprocess; subprocess.run(['sleep', '{LONG}'])",
    "input": "input('never answered: ')",
    "lock": "import threading\nl = threading.Lock(); l.acquire()\nl.acquire()",
}


@pytest.mark.parametrize("name", sorted(BLOCKING))
def test_cancel_interrupts_a_blocking_call(session, name):
    events: list[dict] = []
    handle = session.execute(BLOCKING[name], wait=False, on_event=events.append)
    _started(handle)
    time.sleep(0.1)  # most likely inside the blocking call by now (either way it must end)
    assert session.cancel(handle.execution_id)
    result = handle.result(WAIT)  # the call blocks for LONG (100 s) > WAIT, or for ever
    assert isinstance(result.error_in_exec, CellCancelled), result
    assert events[-2]["type"] == "error" and events[-2]["kind"] == "cancelled"
    assert session.lost is None
    assert session.execute("'alive'").data == {"text/plain": "'alive'"}


@pytest.mark.parametrize("name", ["sleep", "event", "socket"])
def test_a_timeout_interrupts_a_blocking_call(session, name):
    handle = session.execute(BLOCKING[name], timeout=0.3, wait=False)
    result = handle.result(WAIT)  # the call blocks for LONG (100 s) > WAIT, or for ever
    assert isinstance(result.error_in_exec, CellTimeout)
    assert session.execute("1").success


def test_a_child_process_of_a_cell_ends_with_a_cancel(session):
    # subprocess.run kills its child when interrupted; the session process
    # group ends the rest when the session closes (below)
    handle = session.execute(BLOCKING["subprocess"], wait=False)
    _started(handle)
    wait_until(lambda: _children(session.pid), "the cell's `sleep` to run")
    children = _children(session.pid)
    session.cancel(handle.execution_id)
    handle.result(WAIT)
    _wait_gone(children)


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # exited, waiting for its reaper


def _wait_gone(pids):
    for pid in pids:
        wait_until(lambda: _gone(pid), interval=0.02)


def test_closing_a_session_ends_the_processes_its_cells_started(engine):
    s = engine.create_session(isolation="process")
    s.execute("import subprocess\np = subprocess.Popen(['sleep', '1000'])\n"
              "q = subprocess.Popen(['sleep', '1000'], start_new_session=False)")
    children = _children(s.pid)
    assert len(children) == 2
    s.close(timeout=WAIT)
    _wait_gone(children)


# -- what the supervisor does when the worker does not cooperate ------------------

def test_a_cell_that_ignores_its_cancel_is_killed_and_the_session_restarts(session):
    events: list[dict] = []
    lost: list[dict] = []
    session.add_lost_callback(lambda s, info: lost.append(info))
    handle = session.execute(
        "import time\nwhile True:\n    try:\n        time.sleep(10)\n"
        "    except BaseException:\n        pass", wait=False, on_event=events.append)
    _started(handle)
    time.sleep(0.1)
    session.cancel(handle.execution_id)
    result = handle.result(WAIT)
    assert isinstance(result.error_in_exec, SessionLost)
    assert result.error_in_exec.kind == "killed"
    assert [e["type"] for e in events][-2:] == ["error", "finished"]
    assert events[-2]["kind"] == "killed" and events[-1]["status"] == "cancelled"
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert lost and lost[0]["kind"] == "killed" and "ignored a cancel" in lost[0]["message"]
    with pytest.raises(SessionLost):
        session.execute("1")
    old_pid = session.pid
    session.restart()
    assert session.lost is None and session.pid != old_pid
    assert session.execute("2").data == {"text/plain": "2"}


def test_runaway_recursion_with_a_raised_limit_ends_within_the_grace(session):
    handle = session.execute("import sys\nsys.setrecursionlimit(10**6)\n"
                             "def r(n):\n    return r(n + 1)\nr(0)", wait=False)
    _started(handle)
    time.sleep(0.3)
    assert WAIT > session.kill_grace + 5
    session.cancel(handle.execution_id)
    result = handle.result(WAIT)
    error = result.error_in_exec
    # cancelled in the cell, or (C stack exhausted first) the process died, or
    # the recursion reached its limit before the cancel came: it ended, in time
    reached_limit = isinstance(error, CellError) and error.ename == "RecursionError"
    assert isinstance(error, (CellCancelled, SessionLost)) or reached_limit, error
    if session.lost is not None:
        session.restart()
    assert session.execute("1").success


CRASHES = {
    "exit": ("import os; os._exit(1)", "exited", "code 1"),
    "segfault": ("import ctypes; ctypes.string_at(0)", "crashed", "SIGSEGV"),
    "c-stack": ("m = iter([1])\nfor _ in range(1_000_000):\n    m = map(abs, m)\nnext(m)",
                "crashed", "SIGSEGV"),
    "abort": ("import os; os.abort()", "crashed", "SIGABRT"),
}


@pytest.mark.parametrize("name", sorted(CRASHES))
def test_a_crash_is_contained_and_reported_while_neighbours_run(engine, name):
    code, kind, detail = CRASHES[name]
    victim = engine.create_session(isolation="process")
    neighbours = [engine.create_session(isolation="process") for _ in range(3)]
    neighbours.append(engine.create_session())  # in-process, in this very process
    try:
        for i, n in enumerate(neighbours):
            n.execute(f"mine = {i}")
        busy = [n.execute(f"import time\nfor _ in range(20): time.sleep(0.01)\nmine * 10",
                          wait=False) for n in neighbours]
        events: list[dict] = []
        result = victim.execute(code, on_event=events.append)
        assert isinstance(result.error_in_exec, SessionLost)
        assert result.error_in_exec.kind == kind
        assert detail in str(result.error_in_exec)
        assert victim.lost["kind"] == kind
        assert events[-2]["type"] == "error" and events[-2]["kind"] == kind
        assert events[-1]["type"] == "finished" and events[-1]["status"] == "error"
        for i, (n, h) in enumerate(zip(neighbours, busy)):
            result = h.result(WAIT)
            # a process session's result crosses as its mime bundle, an
            # in-process one is the object itself
            value = result.result if n.isolation == "in-process" else \
                int(result.data["text/plain"])
            assert value == i * 10
            assert n.variable("mine")["value"] == i
        victim.restart()
        assert victim.execute("'back'").data == {"text/plain": "'back'"}
    finally:
        for s in [victim, *neighbours]:
            s.close()


def test_a_closed_process_session_refuses_work(engine):
    s = engine.create_session(isolation="process")
    pid = s.pid
    assert s.close(timeout=WAIT)
    with pytest.raises(SessionClosed):
        s.execute("1")
    with pytest.raises(OSError):
        os.kill(pid, 0)  # reaped, gone
    assert s.close()  # idempotent


def test_a_killed_worker_is_reported_as_killed(session):
    handle = session.execute("import time; time.sleep(100)", wait=False)
    _started(handle)
    os.kill(session.pid, signal.SIGKILL)
    result = handle.result(WAIT)
    assert isinstance(result.error_in_exec, SessionLost)
    assert result.error_in_exec.kind == "killed"
    assert "SIGKILL" in session.lost["message"]


def test_bad_arguments_are_refused_clearly(engine):
    with pytest.raises(ValueError, match="isolation must be one of"):
        engine.create_session(isolation="thread")
    with pytest.raises(ValueError, match="need isolation='process'"):
        engine.create_session(confine=True)
    with pytest.raises(ValueError, match="kill_grace"):
        engine.create_session(isolation="process", kill_grace=0)
    with pytest.raises(ValueError, match="plain data"):
        engine.create_session(isolation="process", config={"PyREPL3": {"x": object()}})


@pytest.mark.skipif(sys.platform != "linux", reason="session processes need Linux")
def test_the_fork_server_dies_with_its_engine():
    eng = Engine()
    s = eng.create_session(isolation="process")
    forkserver, worker = eng._supervisor.forkserver_pid, s.pid
    eng.close(timeout=WAIT)
    _wait_gone([forkserver, worker])


# -- over the protocol --------------------------------------------------------------

def test_the_server_runs_process_sessions_and_reports_their_death():
    import asyncio

    from pyrepl3_ext.client import Client, ClientError

    async def main():
        async with await Client.spawn_stdio("--isolation", "process") as client:
            assert (await client.call("server.info"))["isolation"] == "process"
            sid = await client.create_session("p1")
            local = await client.create_session("l1", isolation="in-process")
            response, events = await client.run(sid, "import os\nos.getpid()")
            assert response["status"] == "ok"
            server_pid = client.process.pid
            assert int(events[1]["data"]["text/plain"]) != server_pid
            info = await client.call("session.info", session=sid)
            assert info["isolation"] == "process" and info["execution_count"] == 2
            await client.call("namespace.set", session=sid, name="v", value=[1, 2])
            assert (await client.call("namespace.get", session=sid, name="v"))["value"] == [1, 2]

            running = client.execute(sid, "import time; time.sleep(100)", timeout=0.3)
            assert (await running.response())["status"] == "cancelled"
            running = client.execute(sid, "import time; time.sleep(100)", execution_id="z")
            for _ in range(200):
                if (await client.call("session.info", session=sid))["running"] == "z":
                    break
                await asyncio.sleep(0.01)
            answer = await client.call("cancel", session=sid, execution_id="z")
            assert answer["state"] == "sent" and "killed" in answer["detail"]
            assert (await running.response())["status"] == "cancelled"

            response, events = await client.run(sid, "import ctypes; ctypes.string_at(0)")
            assert response["status"] == "error"
            assert response["error"]["kind"] == "crashed"
            assert [e["type"] for e in events][-2:] == ["error", "finished"]
            for _ in range(100):
                if sid in client.lost:
                    break
                await asyncio.sleep(0.05)
            assert client.lost[sid]["kind"] == "crashed"
            assert "SIGSEGV" in client.lost[sid]["message"]
            info = await client.call("session.info", session=sid)
            assert info["lost"]["kind"] == "crashed"
            with pytest.raises(ClientError) as caught:
                await client.run(sid, "1")
            assert caught.value.code == -32011  # SESSION_LOST
            # the in-process neighbour and the server never noticed
            response, _ = await client.run(local, "'fine'")
            assert response["status"] == "ok"
            await client.restart_session(sid)
            response, events = await client.run(sid, "'again'")
            # a checkpoint: the whole process, restored as often as wanted
            await client.run(sid, "box = [1]")
            taken = await client.call("snapshot.take", session=sid, name="cp")
            assert taken["snapshot"]["kind"] == "checkpoint"
            await client.run(sid, "box.append(2)")
            await client.call("snapshot.restore", session=sid, name="cp")
            _, boxed = await client.run(sid, "box")
            assert boxed[1]["data"]["text/plain"] == "[1]"
            await client.call("snapshot.delete", session=sid, name="cp")
            with pytest.raises(ClientError) as caught:
                await client.call("snapshot.restore", session=sid, name="cp")
            assert caught.value.code == -32008
            # a durable snapshot crosses the death of the process
            await client.run(sid, "kept = [1, 2, 3]")
            await client.call("snapshot.take", session=sid, name="s", durable=True)
            await client.run(sid, "import os; os._exit(0)")
            answer = await client.call("session.restart", session=sid, snapshot="s")
            assert "kept" in answer["restored"]["restored"]
            assert (await client.call("namespace.get", session=sid, name="kept"))["value"] == \
                [1, 2, 3]
            assert events[1]["data"]["text/plain"] == "'again'"
            with pytest.raises(ClientError, match="limits and confine apply"):
                await client.create_session("l2", isolation="in-process", confine=True)
            await client.close_session(sid)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_the_engine_example_of_the_docs_works_as_written():
    """docs/engine.md's first example, run as written (its cancel must not wait 60 s)."""
    import re

    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "docs", "engine.md")
    with open(docs) as f:
        text = f.read()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    sync_part = example.split("async def host")[0]
    namespace = {"print": lambda *a: None}
    exec(compile(sync_part.replace("h.result()", "_cancelled = h.result()")
                 .replace('p.execute("6 * 7").data', '_data = p.execute("6 * 7").data'),
                 "docs/engine.md", "exec"), namespace)
    assert namespace["r"].result == 42
    assert "CellCancelled" in repr(namespace["_cancelled"])
    assert namespace["_data"] == {"text/plain": "42"}


# -- limits ---------------------------------------------------------------------------

def _cgroups_available():
    from pyrepl3_ext.engine.limits import probe

    return probe()["memory"] is not None


@pytest.mark.skipif(not _cgroups_available(), reason="no writable memory cgroup here")
def test_a_memory_bomb_fails_alone_and_neighbours_allocate(engine):
    victim = engine.create_session(isolation="process", limits={"memory": "160M"})
    neighbours = [engine.create_session(isolation="process", limits={"memory": "400M"})
                  for _ in range(4)]
    try:
        assert victim._cgroup is not None and victim._cgroup.has_memory
        bomb = victim.execute("hoard = []\nwhile True:\n    hoard.append(b'x' * 10**7)",
                              wait=False)
        allocations = [n.execute("block = b'y' * (100 * 2**20)\nlen(block) // 2**20",
                                 wait=False) for n in neighbours]
        result = bomb.result(WAIT)
        assert isinstance(result.error_in_exec, SessionLost), result
        assert victim.lost["kind"] == "oom"
        assert "160 MiB" in victim.lost["message"]
        for handle in allocations:
            assert handle.result(WAIT).data == {"text/plain": "100"}
        victim.restart()
        assert victim.execute("'recovered'").success
    finally:
        for s in [victim, *neighbours]:
            s.close()


def test_limits_are_checked_and_rlimits_apply(engine, tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        engine.create_session(isolation="process", limits={"ram": "1G"})
    s = engine.create_session(isolation="process",
                              limits={"open_files": 64, "file_size": "1M"})
    try:
        result = s.execute("import resource\nresource.getrlimit(resource.RLIMIT_NOFILE)")
        assert result.data == {"text/plain": "(64, 64)"}
        # written outside the checkout: the session's working directory is the tests'
        result = s.execute(f"with open({str(tmp_path / 'big')!r}, 'wb') as f:\n"
                           "    f.write(b'z' * (2 * 2**20))")
        assert isinstance(result.error_in_exec, CellError)
        assert "File too large" in str(result.error_in_exec)
        assert s.lost is None
    finally:
        s.close()


def test_a_cell_time_limit_is_enforced_by_the_supervisor(engine):
    s = engine.create_session(isolation="process", limits={"cell_seconds": 0.5},
                              kill_grace=0.5)
    try:
        events: list[dict] = []
        # the cell never ends by itself: only the supervisor's kill ends it
        result = s.execute("import time\nwhile True:\n    try:\n        time.sleep(10)\n"
                           "    except BaseException:\n        pass", on_event=events.append)
        assert isinstance(result.error_in_exec, SessionLost)
        assert s.lost["kind"] == "cell_timeout"
        assert events[-1]["status"] == "cancelled"
        s.restart()
        assert s.execute("1").success
    finally:
        s.close()


def test_a_cpu_time_limit_ends_the_session_with_its_cause(engine):
    s = engine.create_session(isolation="process", limits={"cpu_seconds": 1})
    try:
        result = s.execute("while True:\n    pass")
        assert isinstance(result.error_in_exec, SessionLost)
        assert s.lost["kind"] == "cpu_limit", s.lost
        assert "CPU time limit (1 s)" in s.lost["message"]
    finally:
        s.close()


# -- confinement -----------------------------------------------------------------------

def _confinable():
    from pyrepl3_ext.engine.confine import probe

    found = probe()
    return found["landlock_abi"] > 0 and found["seccomp"]


@pytest.mark.skipif(not _confinable(), reason="the kernel lacks Landlock or seccomp")
def test_a_confined_session_reaches_nothing_of_the_host(engine, tmp_path):
    from pyrepl3_ext.security import FilesCapability

    secret = tmp_path / "secret"
    secret.write_text("host secret")
    os.environ["PYREPL3_TEST_SECRET"] = "env secret"
    try:
        s = engine.create_session(isolation="process", confine=True)
    finally:
        del os.environ["PYREPL3_TEST_SECRET"]
    try:
        report = s.confinement
        for layer in ("fds", "netns", "landlock", "capabilities", "no_new_privs", "seccomp"):
            assert report[layer]["applied"], (layer, report[layer])
        denied = {
            "read": f"open({str(secret)!r}).read()",
            "exec": "import os; os.execv('/bin/sh', ['sh', '-c', 'true'])",
            "subprocess": "import subprocess; subprocess.run(['true'])",
            "socket": "import socket; socket.socket()",
            "signal": f"import os, signal; os.kill({os.getpid()}, signal.SIGTERM)",
        }
        for name, code in denied.items():
            result = s.execute(code)
            assert isinstance(result.error_in_exec, CellError), (name, result)
            assert result.error_in_exec.ename in ("PermissionError", "OSError"), (name, result)
        assert s.execute("import os; os.environ.get('PYREPL3_TEST_SECRET')").data is None
        # a copy of the process (what checkpoints are made of, allowed where a
        # pids cgroup bounds it) is exactly as confined: no read, no exec
        result = s.execute(
            "import os\npid = os.fork()\nif pid == 0:\n    code = 0\n    try:\n"
            f"        open({str(secret)!r}).read()\n    except PermissionError:\n"
            "        code |= 1\n    try:\n        os.execv('/bin/true', ['true'])\n"
            "    except PermissionError:\n        code |= 2\n    os._exit(code)\n"
            "os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])")
        if result.success:  # fork allowed: the copy must be refused both
            assert result.data == {"text/plain": "3"}, result.data
        else:  # no pids cgroup here: fork itself is refused
            assert result.error_in_exec.ename == "PermissionError"
        # what it may do: its scratch directory, threads, an event loop, the parent's files
        assert s.execute("import tempfile\nwith tempfile.TemporaryFile() as f:\n"
                         "    f.write(b'ok')").success
        assert s.execute("import threading\nt = threading.Thread(target=print)\n"
                         "t.start(); t.join()").success
        assert s.execute("import asyncio\nawait asyncio.sleep(0)").success
        s.grant("files", FilesCapability(str(tmp_path)))
        assert s.execute("files.read('secret')").data == {"text/plain": "'host secret'"}
        handle = s.execute("import time; time.sleep(100)", wait=False)
        _started(handle)
        s.cancel(handle.execution_id)
        assert isinstance(handle.result(WAIT).error_in_exec, CellCancelled)
    finally:
        s.close()


@pytest.mark.skipif(not _confinable(), reason="the kernel lacks Landlock or seccomp")
def test_confinement_follows_the_policy_and_a_required_layer_is_enforced(engine):
    from traitlets.config import Config

    from pyrepl3_ext.engine.confine import ConfinementUnavailable, probe

    config = Config()
    config.PyREPL3.security_policy = "restricted"
    s = engine.create_session(isolation="process", config=config)
    try:
        assert s.confinement["seccomp"]["applied"]
    finally:
        s.close()
    plain = engine.create_session(isolation="process")
    try:
        assert plain.confinement == {}
    finally:
        plain.close()
    if probe()["unprivileged_uid"] is None:  # this machine: the uid drop cannot happen
        with pytest.raises(ConfinementUnavailable, match="uid"):
            engine.create_session(isolation="process", confine={"required": ["uid"]})
    with pytest.raises(ValueError, match="unknown key"):
        engine.create_session(isolation="process", confine={"net": True})


def test_a_durable_snapshot_survives_the_process_and_restores_on_restart(session):
    session.execute("import collections\ncounts = collections.Counter('hello')\n"
                    "note = 'kept'\nhandle = open('/dev/null')")
    info = session.take_snapshot("before-crash", durable=True)
    assert info["durable"] and info["bytes"] > 0
    session.execute("note = 'changed'")
    session.execute("import os; os._exit(9)")
    assert session.lost["kind"] == "exited"
    restored = session.restart(from_snapshot="before-crash")
    assert "note" in restored["restored"]
    assert session.variable("note")["value"] == "kept"
    assert session.execute("counts['l']").data == {"text/plain": "2"}
    with pytest.raises(VariableNotFound):  # an open file cannot be pickled: left out
        session.variable("handle")
    from pyrepl3_ext.errors import SnapshotNotFound

    session.execute("import os; os._exit(1)")
    with pytest.raises(SnapshotNotFound):
        session.restart(from_snapshot="never-taken")


def test_the_operators_limits_are_defaults_and_ceilings():
    import asyncio

    from pyrepl3_ext.client import Client, ClientError

    async def main():
        async with await Client.spawn_stdio("--isolation", "process", "--limits",
                                            "memory=300M,cell_seconds=30") as client:
            info = await client.call("server.info")
            assert info["session_limits"]["memory"] == 300 * 2**20
            sid = await client.create_session("a")
            response, events = await client.run(
                sid, "import resource\nresource.getrlimit(resource.RLIMIT_NOFILE)[0]")
            assert events[1]["data"]["text/plain"] == "1024"
            await client.create_session("b", limits={"memory": "100M"})
            with pytest.raises(ClientError, match="memory may be at most"):
                await client.create_session("c", limits={"memory": "1G"})
            with pytest.raises(ClientError, match="cell_seconds may be at most"):
                await client.create_session("d", limits={"cell_seconds": None})
            with pytest.raises(ClientError, match="unknown key"):
                await client.create_session("e", limits={"ram": 1})

    asyncio.run(asyncio.wait_for(main(), 120))


def test_an_ignored_timeout_kills_even_under_a_longer_cell_time_limit(engine):
    s = engine.create_session(isolation="process", limits={"cell_seconds": 60},
                              kill_grace=0.5)
    try:
        result = s.execute("while True:\n    try:\n        import time; time.sleep(10)\n"
                           "    except BaseException:\n        pass", timeout=0.3)
        # killed for the ignored timeout, not by the 60 s limit (its kind)
        assert isinstance(result.error_in_exec, SessionLost)
        assert s.lost["kind"] == "killed" and "ignored its timeout" in s.lost["message"]
    finally:
        s.close()


def test_a_session_process_hands_the_gil_off_within_half_a_millisecond(session):
    # its channel reader must get the GIL from a computing cell to deliver a
    # cancel (cancellation/handoff.py)
    _result, events = _events(session, "import sys\nsys.getswitchinterval()")
    (value,) = [e["data"]["text/plain"] for e in events if e["type"] == "result"]
    assert float(value) <= 0.0005
