"""Checkpoints of process sessions: a paused fork of the whole interpreter, and
transactions that undo everything (in-place mutation, module state, objects
pickle cannot carry), even when the cell is cancelled or its process dies.

Bounds are "must not hang" bounds; the speed is in ``bench/bench_isolation.py``.
"""

from __future__ import annotations

import time

import pytest

from pyrepl3_ext import CellCancelled, Engine
from pyrepl3_ext.errors import CellError, SessionLost, SnapshotRefused

from .polling import wait_until

#: costly and not about the IPython version (tests/conftest.py)
pytestmark = pytest.mark.heavy

WAIT = 30

STATE = (
    "import numpy, json, threading\n"
    "items = [1, 2]\n"
    "grid = numpy.zeros(4)\n"
    "json.__dict__['pyrepl3_mark'] = {'k': 1}\n"
)
CHECK = "(items, grid.tolist(), json.__dict__['pyrepl3_mark'])"
BEFORE = "([1, 2], [0.0, 0.0, 0.0, 0.0], {'k': 1})"
MUTATE = ("items.append(3)\n"
          "grid[:] = 7\n"
          "json.__dict__['pyrepl3_mark']['k'] = 2\n")


@pytest.fixture(scope="module")
def engine():
    eng = Engine(kill_grace=1.0)
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


def _plain(session, code):
    return session.execute(code).data["text/plain"]


def test_a_failing_transaction_cell_undoes_in_place_mutation(session):
    session.execute(STATE)
    result = session.execute("%%transaction\n" + MUTATE + "1 / 0")
    assert isinstance(result.error_in_exec, CellError)
    assert _plain(session, CHECK) == BEFORE


def test_a_cancelled_transaction_cell_undoes_it_too(session, tmp_path):
    session.execute(STATE)
    mutated = tmp_path / "mutated"  # the cell says it has mutated (another process)
    handle = session.execute(MUTATE + f"open({str(mutated)!r}, 'w').close()\n"
                             "import time\ntime.sleep(100)", transaction=True, wait=False)
    wait_until(mutated.exists, "the cell to mutate")
    assert session.cancel(handle.execution_id)
    assert isinstance(handle.result(WAIT).error_in_exec, CellCancelled)
    assert _plain(session, CHECK) == BEFORE


def test_a_successful_transaction_cell_keeps_its_changes(session):
    session.execute(STATE)
    assert session.execute("%%transaction\n" + MUTATE + "'done'").success
    assert _plain(session, CHECK) == "([1, 2, 3], [7.0, 7.0, 7.0, 7.0], {'k': 2})"
    assert session._checkpoints == {}  # the transaction's checkpoint is gone


def test_a_transaction_cell_whose_process_dies_rolls_back_and_the_session_goes_on(session):
    session.execute(STATE)
    result = session.execute(MUTATE + "import os\nos._exit(4)", transaction=True)
    assert isinstance(result.error_in_exec, SessionLost)
    assert "rolled back" in str(result.error_in_exec)
    assert session.lost is None
    assert _plain(session, CHECK) == BEFORE


def test_a_checkpoint_holds_what_pickle_cannot(session):
    session.execute("import threading\n"
                    "def numbers():\n    yield from range(10)\n"
                    "gen = numbers(); next(gen); next(gen)\n"
                    "lock = threading.Lock()\nholds = lambda: lock.acquire(timeout=1)\n"
                    "class Opaque:\n    def __reduce__(self):\n"
                    "        raise TypeError('not picklable')\n"
                    "    def hello(self):\n        return 'opaque'\n"
                    "thing = Opaque()")
    info = session.take_snapshot("before")
    assert info["kind"] == "checkpoint"
    session.execute("next(gen); next(gen); lock.acquire(); del thing")
    session.restore_snapshot("before")
    assert _plain(session, "next(gen)") == "2"
    assert _plain(session, "holds()") == "True"  # the lock was free at the checkpoint
    assert _plain(session, "thing.hello()") == "'opaque'"
    # a checkpoint can be restored again: the second copy starts from the same state
    session.execute("next(gen)")
    session.restore_snapshot("before")
    assert _plain(session, "next(gen)") == "2"
    session.delete_snapshot("before")
    assert session._checkpoints == {}


def test_a_checkpoint_survives_its_worker_and_restarts_the_session(session):
    session.execute("kept = {'a': [1, 2, 3]}")
    session.take_snapshot("safe")
    session.execute("import os; os._exit(1)")
    assert session.lost["kind"] == "exited"
    session.restart(from_snapshot="safe")
    assert session.lost is None
    assert _plain(session, "kept['a'][2]") == "3"


def test_checkpoints_refuse_what_they_cannot_copy(session):
    session.execute("import threading\nstop = threading.Event()\n"
                    "t = threading.Thread(target=stop.wait, name='helper')\nt.start()")
    with pytest.raises(SnapshotRefused, match="helper"):
        session.take_snapshot("c")
    session.execute("stop.set(); t.join()")
    assert session.take_snapshot("c")["kind"] == "checkpoint"
    session.max_checkpoints = 1
    with pytest.raises(SnapshotRefused, match="the most it may"):
        session.take_snapshot("d")
    session.take_snapshot("c")  # replacing one is fine
    handle = session.execute("import time; time.sleep(0.5)", wait=False)
    with pytest.raises(SnapshotRefused, match="between cells"):
        session.take_snapshot("e")
    handle.result(WAIT)


def test_a_confined_session_checkpoints_too(engine):
    from pyrepl3_ext.engine.confine import probe as confine_probe
    from pyrepl3_ext.engine.limits import probe as limits_probe

    if not confine_probe()["seccomp"] or limits_probe()["pids"] is None:
        pytest.skip("needs seccomp and a pids cgroup (which bounds a confined session's copies)")
    s = engine.create_session(isolation="process", confine=True)
    try:
        assert s.confinement["seccomp"]["applied"]
        s.execute(STATE)
        result = s.execute("%%transaction\n" + MUTATE + "raise ValueError('no')")
        assert isinstance(result.error_in_exec, CellError)
        assert _plain(s, CHECK) == BEFORE
        # the resumed copy is the same confined process: still no way out
        assert s.execute("import subprocess; subprocess.run(['true'])").error_in_exec.ename \
            == "PermissionError"
    finally:
        s.close()


def test_the_transactions_setting_makes_every_cell_a_transaction(engine):
    from traitlets.config import Config

    config = Config()
    config.PyREPL3.transactions = True
    s = engine.create_session(isolation="process", config=config)
    try:
        s.execute(STATE)
        s.execute(MUTATE + "raise KeyError('x')")
        assert _plain(s, CHECK) == BEFORE
        # and a cell may opt out
        s.execute(MUTATE + "raise KeyError('x')", transaction=False)
        assert _plain(s, CHECK) != BEFORE
    finally:
        s.close()


def test_transaction_cells_leave_no_processes_behind(session):
    def zombies_and_children():
        import os

        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == session.pid:
                    found.append((int(entry), fields[0]))
        return found

    for i in range(30):
        session.execute(f"value = {i}", transaction=True)
    time.sleep(0.2)
    # the last one or two may still be on their way out (reaped at the next
    # request); the ones before are gone: nothing accumulates
    assert len(zombies_and_children()) <= 2, zombies_and_children()
    assert _plain(session, "value") == "29"


def _standby_ready(session):
    """Wait until the worker made its standby checkpoint (it does so once the
    session has been idle a few ms after a transaction cell)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if session.standby is not None:
            return session.standby
        time.sleep(0.01)
    raise AssertionError("no standby checkpoint was made")


def test_an_idle_session_keeps_a_standby_checkpoint_for_the_next_one(session):
    session.execute(STATE)
    session.execute("items.append(3)", transaction=True)
    standby = _standby_ready(session)
    assert standby["standby"], standby
    # the next checkpoint is the standby (no fork on the request's path) ...
    assert session.take_snapshot("now")["pid"] == standby["pid"]
    # ... and it holds the state as it was when taken
    session.execute("items.append(4)")
    session.restore_snapshot("now")
    assert _plain(session, "items") == "[1, 2, 3]"


@pytest.mark.parametrize("change", ["cell", "set_variable", "restore"])
def test_whatever_changes_the_session_after_its_standby_ends_the_standby(session, change):
    """A transaction rolls back to the state at its own start, never to an
    older standby's."""
    session.execute(STATE)
    session.take_snapshot("older")
    session.execute("items.append(3)", transaction=True)
    assert _standby_ready(session)["standby"]
    if change == "cell":
        session.execute("items.append(9)", transaction=False)
    elif change == "set_variable":
        session.set_variable("items", [9])
    else:
        session.restore_snapshot("older")  # a fresh worker: [1, 2]
    expected = _plain(session, "items")
    assert expected != "[1, 2, 3]"
    result = session.execute("items.append(5)\n1 / 0", transaction=True)
    assert isinstance(result.error_in_exec, CellError)
    assert _plain(session, "items") == expected
