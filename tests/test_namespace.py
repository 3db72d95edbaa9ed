"""Namespace manager: host access while cells run, transactions, snapshots."""

from __future__ import annotations

import os
import pickle
import stat
import sys
import threading

import pytest

import pyrepl3_ext
from pyrepl3_ext import (NamespaceError, ProtectedName, SnapshotNotFound, SnapshotRefused,
                         VariableNotFound, extension, namespace)

from .conftest import by_execution, hook_snapshot

WAIT = 30  # upper bound on waits: reaching it is a failure, never a timing assertion


@pytest.fixture
def clean_ns(ip):
    """Remove the user names a test creates, so tests sharing the shell stay independent."""
    before = set(ip.user_ns)
    yield ip
    for name in set(ip.user_ns) - before:
        if not namespace._is_history(name):
            ip.user_ns.pop(name, None)


@pytest.fixture
def key_file(ip, tmp_path):
    path = tmp_path / "keys" / "snapshot.key"
    ip.configurables  # noqa: B018 - the PyREPL3 configurable lives there
    extension.get_state(ip).config.snapshot_key_file = str(path)
    return path


def sync_unders(ip):
    """Give ``_``/``__``/``___`` back to the displayhook.

    IPython stops updating them once user code has assigned one (other test
    files share this shell and may have), so tests about them start here.
    """
    for name in ("_", "__", "___"):
        # IPython 8 compares with the displayhook's copy, 9 with user_ns_hidden
        value = getattr(ip.displayhook, name)
        ip.user_ns[name] = value
        if name in ip.user_ns_hidden:
            ip.user_ns_hidden[name] = value


def run(ip, code, **kw):
    return pyrepl3_ext.run_cell(ip, code, **kw)


def wait_for_variable(ip, name):
    """Wait (in a host thread) until the running cell binds ``name``."""
    for _ in range(WAIT * 1000):
        if pyrepl3_ext.get_variable(ip, name, None) is not None:
            return
        threading.Event().wait(0.001)
    raise AssertionError(f"the cell never set {name}")


# -- host access -------------------------------------------------------------------

def test_get_set_delete_update_merge_into_the_same_dict(clean_ns):
    ip = clean_ns
    ns = ip.user_ns
    pyrepl3_ext.set_variable(ip, "ns_a", [1, 2])
    pyrepl3_ext.update_variables(ip, {"ns_b": 2, "ns_c": 3})
    assert ip.user_ns is ns
    assert run(ip, "ns_a.append(ns_b + ns_c)").success
    assert pyrepl3_ext.get_variable(ip, "ns_a") == [1, 2, 5]
    pyrepl3_ext.delete_variable(ip, "ns_b")
    assert "ns_b" not in ns
    assert pyrepl3_ext.get_variable(ip, "ns_b", "dflt") == "dflt"
    with pytest.raises(VariableNotFound) as info:
        pyrepl3_ext.get_variable(ip, "ns_b")
    assert isinstance(info.value, KeyError)
    assert str(info.value) == f"session {extension.get_state(ip).session_id!r} has no variable 'ns_b'"
    with pytest.raises(KeyError):
        pyrepl3_ext.delete_variable(ip, "ns_b")
    # the cell sees what the host set, IPython's names still work
    sync_unders(ip)
    result = run(ip, "ns_c * 2")
    assert result.result == 6 and ip.user_ns["_"] == 6
    assert ip.user_ns["In"] is ip.user_ns["_ih"] and ip.user_ns["Out"] is ip.user_ns["_oh"]


@pytest.mark.parametrize("name", ["In", "Out", "_ih", "_oh", "_dh", "_", "__", "___", "_i",
                                  "_ii", "_iii", "_i3", "_7", "get_ipython", "exit", "quit",
                                  "__builtins__", "__name__"])
def test_ipython_names_cannot_be_set_or_deleted(ip, name):
    before = ip.user_ns.get(name, "absent")
    with pytest.raises(ProtectedName):
        pyrepl3_ext.set_variable(ip, name, 1)
    with pytest.raises(ProtectedName):
        pyrepl3_ext.delete_variable(ip, name)
    with pytest.raises(ProtectedName):
        pyrepl3_ext.update_variables(ip, {"fine_name": 1, name: 1})
    assert "fine_name" not in ip.user_ns  # checked before anything was bound
    assert ip.user_ns.get(name, "absent") is before


def test_bad_names_are_refused(ip):
    for bad in ("not an identifier", "", 3, None):
        with pytest.raises(NamespaceError):
            pyrepl3_ext.set_variable(ip, bad, 1)
    with pytest.raises(NamespaceError):
        pyrepl3_ext.get_variable(ip, 3)


def test_list_hides_names_the_way_who_does(clean_ns):
    ip = clean_ns
    run(ip, "who_a = 1\n_who_private = 2\nimport os as who_os", store_history=True)
    run(ip, "who_a", store_history=True)  # creates _, _N, _iN
    names = pyrepl3_ext.list_variables(ip)
    assert names == sorted(ip.run_line_magic("who_ls", ""))
    assert {"who_a", "who_os"} <= set(names)
    assert not {"_who_private", "In", "Out", "get_ipython", "open", "exit"} & set(names)
    private = pyrepl3_ext.list_variables(ip, private=True)
    assert "_who_private" in private
    assert not {"_", "_i", "In", "__builtins__", "__name__"} & set(private)
    assert namespace.manager(ip).describe("who_a") == {
        "name": "who_a", "type": "builtins.int", "repr": "1"}


def test_describe_survives_a_broken_repr(clean_ns):
    ip = clean_ns
    run(ip, "class BadRepr:\n    def __repr__(self): raise RuntimeError('no')\nbad_r = BadRepr()")
    info = namespace.manager(ip).describe("bad_r")
    assert info["repr"] == "<repr failed: RuntimeError: no>"
    assert info["type"].endswith("BadRepr")


def test_host_threads_while_a_cell_loops(clean_ns):
    """Hosts read, write, delete and list from threads while the cell churns names."""
    ip = clean_ns
    errors: list[BaseException] = []
    n_threads, per_thread = 4, 300

    def host(t):
        try:
            wait_for_variable(ip, "loop_running")
            for i in range(per_thread):
                pyrepl3_ext.set_variable(ip, f"host{t}_{i}", i)
                assert pyrepl3_ext.get_variable(ip, f"host{t}_{i}") == i
                pyrepl3_ext.set_variable(ip, f"tmp{t}", i)
                pyrepl3_ext.delete_variable(ip, f"tmp{t}")
                names = pyrepl3_ext.list_variables(ip)
                assert f"host{t}_{i}" in names
                pyrepl3_ext.get_variable(ip, "churn0", None)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(t,), daemon=True) for t in range(n_threads)]
    for t in threads:
        t.start()

    def stopper():
        for t in threads:
            t.join(WAIT)
        pyrepl3_ext.set_variable(ip, "stop_loop", True)

    stop_thread = threading.Thread(target=stopper, daemon=True)
    stop_thread.start()
    result = run(ip, "stop_loop = False\nloop_running = True\ni = 0\n"
                     "while not stop_loop:\n"
                     "    i += 1\n"
                     "    globals()[f'churn{i % 50}'] = i\n"
                     "    globals().pop(f'churn{(i + 25) % 50}', None)\n"
                     "loops = i")
    stop_thread.join(WAIT)
    assert not errors, errors
    assert result.success and ip.user_ns["loops"] > 0
    for t in range(n_threads):  # no host write lost, deletes done
        assert all(ip.user_ns[f"host{t}_{i}"] == i for i in range(per_thread))
        assert f"tmp{t}" not in ip.user_ns


# -- transactions ------------------------------------------------------------------

def outcome(events, execution_id):
    mine = by_execution(events, execution_id)
    assert mine[-1]["type"] == "finished"
    return [e for e in mine if e["type"] == "error"][0], mine


def test_rollback_when_the_cell_raises(quiet, clean_ns, events):
    ip = clean_ns
    run(ip, "tx_keep = 'old'\ntx_del = 'there'\ntx_list = [1]")
    old_keep = ip.user_ns["tx_keep"]
    seen_at_error = []
    unsubscribe = pyrepl3_ext.subscribe(ip, lambda e: e["type"] == "error" and seen_at_error.append(
        ("tx_added" in ip.user_ns, ip.user_ns.get("tx_keep"))))
    try:
        result = run(ip, "tx_keep = 'new'\ntx_added = 1\ndel tx_del\ntx_list.append(2)\n"
                         "raise ValueError('boom')", execution_id="tx-raise", transaction=True)
    finally:
        unsubscribe()
    assert seen_at_error == [(False, "old")]  # rolled back before the error event
    assert isinstance(result.error_in_exec, ValueError)
    assert ip.user_ns["tx_keep"] is old_keep
    assert "tx_added" not in ip.user_ns
    assert ip.user_ns["tx_del"] == "there"
    # in-place mutation of a surviving object is not undone (documented)
    assert ip.user_ns["tx_list"] == [1, 2]
    report = {"removed": ["tx_added"], "rebound": ["tx_keep"], "undeleted": ["tx_del"],
              "omitted": 0}
    assert result.pyrepl3_rollback == report
    error, mine = outcome(events, "tx-raise")
    assert error["kind"] == "exception" and error["rollback"] == report
    assert [e["type"] for e in mine][-2:] == ["error", "finished"]
    assert namespace.manager(ip).open_transactions() == []


def test_success_commits_and_reports_nothing(clean_ns, events):
    ip = clean_ns
    result = run(ip, "tx_ok = 1", execution_id="tx-ok", transaction=True)
    assert result.success and ip.user_ns["tx_ok"] == 1
    assert not hasattr(result, "pyrepl3_rollback")
    assert namespace.manager(ip).open_transactions() == []
    # a failing cell without a transaction keeps its changes
    result = run(ip, "tx_no = 1\nraise ValueError", execution_id="tx-no")
    assert ip.user_ns["tx_no"] == 1
    error, _ = outcome(events, "tx-no")
    assert "rollback" not in error


def test_syntax_error_in_a_transaction_changes_nothing(quiet, clean_ns, events):
    ip = clean_ns
    run(ip, "tx_syn = 1")
    result = run(ip, "tx_syn = 2\n)", execution_id="tx-syntax", transaction=True)
    assert result.error_before_exec is not None
    assert ip.user_ns["tx_syn"] == 1
    error, _ = outcome(events, "tx-syntax")
    assert error["kind"] == "syntax"
    assert error["rollback"] == {"removed": [], "rebound": [], "undeleted": [], "omitted": 0}


def test_rollback_on_cancel_from_another_thread(quiet, clean_ns, events):
    ip = clean_ns
    run(ip, "tx_c = 'before'")
    hit = {}

    def canceller():
        wait_for_variable(ip, "tx_ready")
        hit["hit"] = pyrepl3_ext.cancel(ip, "tx-cancel", "host gave up")

    thread = threading.Thread(target=canceller, daemon=True)
    thread.start()
    result = run(ip, "tx_c = 'during'\ntx_new = 1\ntx_ready = True\nwhile True:\n    pass",
                 execution_id="tx-cancel", transaction=True)
    thread.join(WAIT)
    assert hit["hit"] is True
    assert isinstance(result.error_in_exec, pyrepl3_ext.CellCancelled)
    assert ip.user_ns["tx_c"] == "before"
    assert "tx_new" not in ip.user_ns and "tx_ready" not in ip.user_ns
    error, _ = outcome(events, "tx-cancel")
    assert error["kind"] == "cancelled"
    assert error["rollback"]["removed"] == ["tx_new", "tx_ready"]
    assert error["rollback"]["rebound"] == ["tx_c"]


def test_rollback_on_cancel_of_a_worker_thread_cell(quiet, clean_ns):
    ip = clean_ns
    run(ip, "tx_w = 'before'")
    out = {}

    def worker():
        out["result"] = run(ip, "tx_w = 'during'\ntx_w_ready = True\nwhile True:\n    pass",
                            execution_id="tx-worker", transaction=True)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    wait_for_variable(ip, "tx_w_ready")
    assert pyrepl3_ext.cancel(ip, "tx-worker")
    thread.join(WAIT)
    assert out["result"].pyrepl3_rollback["rebound"] == ["tx_w"]
    assert ip.user_ns["tx_w"] == "before" and "tx_w_ready" not in ip.user_ns


def test_rollback_on_timeout_with_typed_directives(quiet, clean_ns, events):
    ip = clean_ns
    run(ip, "tx_t = 0")
    result = ip.run_cell("%%timeout 0.2\n%%transaction\ntx_t = 1\ntx_t2 = 2\nwhile True:\n    pass")
    assert isinstance(result.error_in_exec, pyrepl3_ext.CellTimeout)
    assert ip.user_ns["tx_t"] == 0 and "tx_t2" not in ip.user_ns
    error, _ = outcome(events, result.pyrepl3_execution_id)
    assert error["kind"] == "timeout"
    assert error["rollback"]["rebound"] == ["tx_t"]


@pytest.mark.filterwarnings("ignore:To exit")  # IPython's hint after SystemExit
@pytest.mark.parametrize("raised, kind", [("KeyboardInterrupt", "cancelled"),
                                          ("SystemExit(3)", "exception")])
def test_rollback_on_base_exceptions(quiet, clean_ns, events, raised, kind):
    ip = clean_ns
    result = ip.run_cell(f"%%transaction\ntx_k = 1\nraise {raised}")
    assert "tx_k" not in ip.user_ns
    error, _ = outcome(events, result.pyrepl3_execution_id)
    assert error["kind"] == kind and error["rollback"]["removed"] == ["tx_k"]


def test_rollback_of_an_async_cell(quiet, clean_ns, events):
    ip = clean_ns
    result = ip.run_cell("%%transaction\nimport asyncio as tx_asyncio\ntx_as = 1\n"
                         "await tx_asyncio.sleep(0)\nraise ValueError('after await')")
    assert isinstance(result.error_in_exec, ValueError)
    assert "tx_as" not in ip.user_ns and "tx_asyncio" not in ip.user_ns
    error, mine = outcome(events, result.pyrepl3_execution_id)
    assert mine[0]["mode"] == "async"
    assert error["rollback"]["removed"] == ["tx_as", "tx_asyncio"]


def test_ipython_names_intact_after_rollback(quiet, clean_ns):
    ip = clean_ns
    ns = ip.user_ns
    sync_unders(ip)
    run(ip, "10", store_history=True)
    run(ip, "20", store_history=True)
    run(ip, "30", store_history=True)
    saved = {k: ns[k] for k in ("In", "Out", "_ih", "_oh", "_dh", "get_ipython", "exit", "quit",
                                "_", "__", "___", "__builtins__")}
    code = ("In = None\nOut = None\n_ih = 1\n_oh = 1\nget_ipython = None\nexit = None\n"
            "_ = 'x'\n__ = 'y'\n___ = 'z'\n__builtins__ = {}\nraise ValueError")
    result = run(ip, code, store_history=True, transaction=True)
    for name, value in saved.items():
        assert ns[name] is value, name
    assert ns["In"] is ns["_ih"] and ns["Out"] is ns["_oh"]
    assert (ns["_"], ns["__"], ns["___"]) == (30, 20, 10)
    # the input history records the failing cell, as without a transaction
    count = result.execution_count
    assert ns[f"_i{count}"] == code and ns["In"][count] == code
    assert ns["_i"] == "30"  # IPython's "previous input", moved on by the failing cell
    assert run(ip, "get_ipython() is not None and callable(exit)", store_history=True).result
    run(ip, "40", store_history=True)
    assert (ns["_"], ns["__"], ns["___"]) == (40, True, 30)
    assert ns["Out"][ip.execution_count - 1] == 40


def test_values_ipython_displayed_before_the_failure_stay(quiet, clean_ns):
    """With interactivity 'all' a failing cell can display values first:
    ``_``/``_N``/``Out[N]`` are IPython's record of that and stay consistent."""
    ip = clean_ns
    ns = ip.user_ns
    sync_unders(ip)
    run(ip, "'before'", store_history=True)
    saved = ip.ast_node_interactivity
    ip.ast_node_interactivity = "all"
    try:
        result = run(ip, "tx_disp = 5\ntx_disp * 2\nraise ValueError", store_history=True,
                     transaction=True)
    finally:
        ip.ast_node_interactivity = saved
    count = result.execution_count
    assert ns["Out"][count] == 10 and ns[f"_{count}"] == 10
    assert ns["_"] == 10 and ns["__"] == "before"
    assert result.pyrepl3_rollback["removed"] == ["tx_disp"]
    assert "tx_disp" not in ns
    run(ip, "'after'", store_history=True)
    assert (ns["_"], ns["__"], ns["___"]) == ("after", 10, "before")


def test_config_default_and_per_execute_override(quiet, clean_ns):
    ip = clean_ns
    config = extension.get_state(ip).config
    config.transactions = True
    try:
        run(ip, "tx_d = 1\nraise ValueError")
        assert "tx_d" not in ip.user_ns
        run(ip, "tx_d = 2\nraise ValueError", transaction=False)
        assert ip.user_ns["tx_d"] == 2
    finally:
        config.transactions = False
    run(ip, "tx_d = 3\nraise ValueError")
    assert ip.user_ns["tx_d"] == 3


def test_host_writes_during_a_transaction_are_kept(quiet, clean_ns):
    ip = clean_ns
    run(ip, "tx_h_pre = 'pre'\ntx_h_own = 'own'")

    def host():
        wait_for_variable(ip, "tx_h_ready")
        pyrepl3_ext.set_variable(ip, "tx_h_host", "host")
        pyrepl3_ext.set_variable(ip, "tx_h_own", "host wrote")
        pyrepl3_ext.delete_variable(ip, "tx_h_pre")
        pyrepl3_ext.set_variable(ip, "tx_h_go", True)

    thread = threading.Thread(target=host, daemon=True)
    thread.start()
    result = run(ip, "tx_h_cell = 1\ntx_h_ready = True\n"
                     "while not globals().get('tx_h_go'):\n    pass\n"
                     "tx_h_own = 'cell wrote later'\nraise ValueError", transaction=True)
    thread.join(WAIT)
    assert isinstance(result.error_in_exec, ValueError)
    ns = ip.user_ns
    assert ns["tx_h_host"] == "host" and ns["tx_h_go"] is True
    assert ns["tx_h_own"] == "host wrote"  # the host's value, not the cell's later one
    assert "tx_h_pre" not in ns  # the host's delete stands
    assert "tx_h_cell" not in ns and "tx_h_ready" not in ns


def test_host_coroutine_on_the_cells_loop_is_a_host(quiet, clean_ns):
    """An async cell shares its thread with the host's other coroutines: a
    write from one of those is the host's (kept), not the cell's."""
    import asyncio

    ip = clean_ns

    async def main():
        async def host():
            while pyrepl3_ext.get_variable(ip, "tx_aready", None) is None:
                await asyncio.sleep(0.001)
            pyrepl3_ext.set_variable(ip, "tx_ahost", "kept")
            pyrepl3_ext.set_variable(ip, "tx_ago", True)

        task = asyncio.ensure_future(host())
        result = await pyrepl3_ext.run_cell_async(
            ip, "import asyncio as tx_aio\ntx_aready = 1\n"
                "while not globals().get('tx_ago'):\n    await tx_aio.sleep(0.001)\n"
                "import pyrepl3_ext\npyrepl3_ext.set_variable(get_ipython(), 'tx_aown', 1)\n"
                "raise ValueError", transaction=True)
        await asyncio.wait_for(task, WAIT)
        return result

    result = asyncio.run(main())
    assert isinstance(result.error_in_exec, ValueError)
    assert ip.user_ns["tx_ahost"] == "kept" and ip.user_ns["tx_ago"] is True
    assert not {"tx_aready", "tx_aown", "tx_aio"} & set(ip.user_ns)


def test_api_calls_from_the_cell_itself_are_rolled_back(quiet, clean_ns):
    ip = clean_ns
    run(ip, "import pyrepl3_ext\ntx_s = 1")
    run(ip, "pyrepl3_ext.set_variable(get_ipython(), 'tx_s', 2)\n"
            "pyrepl3_ext.set_variable(get_ipython(), 'tx_s_new', 2)\nraise ValueError",
        transaction=True)
    assert ip.user_ns["tx_s"] == 1 and "tx_s_new" not in ip.user_ns


def test_transaction_magic_unstripped_and_misused(quiet, clean_ns):
    ip = clean_ns
    ip.run_cell_magic("transaction", "", "tx_m = 1\nraise ValueError")
    assert "tx_m" not in ip.user_ns
    ip.run_cell_magic("transaction", "", "tx_m = 2")
    assert ip.user_ns["tx_m"] == 2
    result = ip.run_cell("%%transaction now\ntx_m = 3")
    assert result.error_in_exec is not None and ip.user_ns["tx_m"] == 2


def test_nested_cells_roll_back_with_the_outer_transaction(quiet, clean_ns):
    ip = clean_ns
    ip.run_cell("%%transaction\nget_ipython().run_cell('tx_inner = 1')\ntx_outer = 1\n"
                "raise ValueError")
    assert "tx_inner" not in ip.user_ns and "tx_outer" not in ip.user_ns
    # an inner transaction that fails rolls back only its own changes
    ip.run_cell("tx_o2 = 1\nget_ipython().run_cell('%%transaction\\ntx_i2 = 1\\nraise ValueError')")
    assert ip.user_ns["tx_o2"] == 1 and "tx_i2" not in ip.user_ns


def test_rollback_report_is_capped(quiet, clean_ns):
    ip = clean_ns
    result = run(ip, "for tx_i in range(250):\n    globals()[f'tx_many{tx_i}'] = tx_i\n"
                     "raise ValueError",
                 transaction=True)
    report = result.pyrepl3_rollback
    assert len(report["removed"]) == namespace.REPORT_LIMIT
    assert report["omitted"] == 251 - namespace.REPORT_LIMIT  # 250 names and tx_i
    assert not any(k.startswith("tx_many") for k in ip.user_ns)


# -- snapshots ---------------------------------------------------------------------

def test_snapshot_round_trip_in_memory(clean_ns):
    ip = clean_ns
    run(ip, "import os as snap_os\nsnap_x = 100\nsnap_y = [1, 2, 3]\nsnap_a = snap_b = {'k': []}")
    info = pyrepl3_ext.take_snapshot(ip, "s1")
    assert {"snap_x", "snap_y", "snap_a", "snap_b", "snap_os"} <= set(info["names"])
    assert "snap_os" in info["by_reference"]  # modules cannot be copied
    assert not {"snap_x", "snap_y", "snap_a", "snap_b"} & set(info["by_reference"])
    assert not {"In", "Out", "_", "get_ipython", "__builtins__"} & set(info["names"])
    run(ip, "snap_y.append(4)\nsnap_x = 5\nsnap_a['k'].append(1)\nsnap_z = 1")
    for _ in range(2):  # the snapshot itself is never handed out: restorable again
        done = pyrepl3_ext.restore_snapshot(ip, "s1")
        assert done["removed"] == ["snap_z"]
        assert run(ip, "(snap_x, snap_y, snap_a)").result == (100, [1, 2, 3], {"k": []})
        assert ip.user_ns["snap_a"] is ip.user_ns["snap_b"]  # aliasing kept
        assert ip.user_ns["snap_os"] is os
        assert ip.user_ns["In"] is ip.user_ns["_ih"]
        run(ip, "snap_y.append(9)\nsnap_z = 2")
    pyrepl3_ext.restore_snapshot(ip, "s1", clear=False)
    assert ip.user_ns["snap_z"] == 2 and ip.user_ns["snap_y"] == [1, 2, 3]
    assert [s["name"] for s in pyrepl3_ext.list_snapshots(ip)] == ["s1"]
    pyrepl3_ext.delete_snapshot(ip, "s1")
    assert pyrepl3_ext.list_snapshots(ip) == []
    with pytest.raises(SnapshotNotFound):
        pyrepl3_ext.restore_snapshot(ip, "s1")
    with pytest.raises(KeyError):
        pyrepl3_ext.delete_snapshot(ip, "s1")


def test_snapshot_magic(clean_ns, capsys):
    ip = clean_ns
    run(ip, "mag_v = [1]")
    ip.run_line_magic("snapshot", "take m1")
    run(ip, "mag_v.append(2)\nmag_w = 1")
    ip.run_line_magic("snapshot", "restore m1 --keep")
    assert ip.user_ns["mag_v"] == [1] and ip.user_ns["mag_w"] == 1
    ip.run_line_magic("snapshot", "restore m1")
    assert "mag_w" not in ip.user_ns
    ip.run_line_magic("snapshot", "list")
    ip.run_line_magic("snapshot", "delete m1")
    out = capsys.readouterr().out
    assert "snapshot 'm1'" in out and "m1: " in out and "deleted snapshot 'm1'" in out
    from IPython.core.error import UsageError

    for bad in ("", "take", "restore m1", "frobnicate x", "take 'unclosed"):
        with pytest.raises(UsageError):
            ip.run_line_magic("snapshot", bad)


def test_snapshot_file_round_trip(clean_ns, key_file, tmp_path):
    ip = clean_ns
    run(ip, "file_n = 100\nfile_l = [1, {'a': (2, 3)}]\nfile_f = lambda: 1\n"
            "class FilePoint:\n    def __init__(self, x): self.x = x\nfile_p = FilePoint(7)")
    pyrepl3_ext.take_snapshot(ip, "disk")
    path = tmp_path / "snap.bin"
    saved = pyrepl3_ext.save_snapshot(ip, "disk", path)
    assert "file_f" in saved["skipped"]  # a lambda cannot be pickled
    assert {"file_n", "file_l", "FilePoint", "file_p"} <= set(saved["names"])
    assert not {"file_n", "file_l", "FilePoint", "file_p"} & set(saved["skipped"])
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    run(ip, "file_n = 0\nfile_l = None\nfile_p = None")
    loaded = pyrepl3_ext.load_snapshot(ip, path, name="from-disk")
    assert loaded["name"] == "from-disk" and loaded["skipped"] == saved["skipped"]
    pyrepl3_ext.restore_snapshot(ip, "from-disk", clear=False)
    assert ip.user_ns["file_n"] == 100 and ip.user_ns["file_l"] == [1, {"a": (2, 3)}]
    # instances of classes defined in cells come back (classes go by reference)
    assert ip.user_ns["file_p"].x == 7
    assert type(ip.user_ns["file_p"]) is ip.user_ns["FilePoint"]
    # a key given by the host instead of the key file
    pyrepl3_ext.save_snapshot(ip, "disk", path, key=b"k" * 32)
    assert pyrepl3_ext.load_snapshot(ip, path, key=b"k" * 32)["name"] == "disk"
    with pytest.raises(SnapshotRefused):
        pyrepl3_ext.load_snapshot(ip, path)  # the key file's key did not sign it
    with pytest.raises(NamespaceError):
        pyrepl3_ext.save_snapshot(ip, "disk", path, key=b"short")


class _Evil:
    def __reduce__(self):
        return (exec, ("import builtins; builtins.PYREPL3_PWNED = True",))


def test_tampered_or_foreign_snapshot_files_are_refused_unread(clean_ns, key_file, tmp_path,
                                                               monkeypatch):
    import builtins

    ip = clean_ns
    run(ip, "tamper_v = 'value'")
    pyrepl3_ext.take_snapshot(ip, "t")
    path = tmp_path / "t.snap"
    pyrepl3_ext.save_snapshot(ip, "t", path)
    good = path.read_bytes()
    assert pyrepl3_ext.load_snapshot(ip, path)["name"] == "t"

    unpickled = []
    real_loads = pickle.loads
    monkeypatch.setattr(namespace.pickle, "loads",
                        lambda data: unpickled.append(1) or real_loads(data))
    magic_len = len(namespace._FILE_MAGIC)
    evil_payload = pickle.dumps(_Evil())
    cases = {
        "flipped byte": good[:-5] + bytes([good[-5] ^ 1]) + good[-4:],
        "truncated": good[:-10],
        "payload swapped": good[:magic_len + 65] + evil_payload,
        "bad signature": good[:magic_len] + b"0" * 64 + good[magic_len + 64:],
        "not a snapshot": evil_payload,
        "empty": b"",
    }
    for label, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(SnapshotRefused):
            pyrepl3_ext.load_snapshot(ip, path)
        assert unpickled == [], label
    assert not hasattr(builtins, "PYREPL3_PWNED")
    from IPython.core.error import UsageError

    path.write_bytes(cases["flipped byte"])
    with pytest.raises(UsageError, match="failed verification .* it was not unpickled"):
        ip.run_line_magic("snapshot", f"load {path}")
    assert unpickled == []


def test_magic_reports_a_refused_file_as_usage_error(clean_ns, key_file, tmp_path):
    from IPython.core.error import UsageError

    path = tmp_path / "x.snap"
    path.write_bytes(b"garbage")
    with pytest.raises(UsageError, match="not a pyrepl3 snapshot file"):
        clean_ns.run_line_magic("snapshot", f"load {path}")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_key_file_readable_by_others_is_refused(clean_ns, key_file, tmp_path):
    ip = clean_ns
    run(ip, "perm_v = 1")
    pyrepl3_ext.take_snapshot(ip, "p")
    pyrepl3_ext.save_snapshot(ip, "p", tmp_path / "p.snap")  # creates the key file
    os.chmod(key_file, 0o644)
    with pytest.raises(NamespaceError, match="other users"):
        pyrepl3_ext.load_snapshot(ip, tmp_path / "p.snap")


# -- unload --------------------------------------------------------------------------

def test_unload_leaves_nothing_behind(shell, tmp_path):
    before = hook_snapshot(shell)
    pyrepl3_ext.load_ipython_extension(shell)
    extension.get_state(shell).config.snapshot_key_file = str(tmp_path / "k")
    shell.showtraceback = lambda *a, **k: None
    try:
        pyrepl3_ext.run_cell(shell, "unl_v = 1\nraise ValueError", transaction=True)
        pyrepl3_ext.run_cell(shell, "unl_w = 1")
        pyrepl3_ext.take_snapshot(shell, "u")
        pyrepl3_ext.save_snapshot(shell, "u", tmp_path / "u.snap")
        manager = namespace.manager(shell)
    finally:
        del shell.showtraceback
        pyrepl3_ext.unload_ipython_extension(shell)
    shell.user_ns.pop("unl_w", None)
    after = hook_snapshot(shell)
    for snap in (before, after):
        snap["user_ns_keys"] = {k for k in snap["user_ns_keys"] if not k.startswith("_")}
    assert after == before
    assert "snapshot" not in shell.magics_manager.magics["line"]
    assert manager.list_snapshots() == [] and manager.open_transactions() == []
    with pytest.raises(RuntimeError, match="not loaded"):
        pyrepl3_ext.get_variable(shell, "unl_w")
    # reloading starts from an empty snapshot store
    pyrepl3_ext.load_ipython_extension(shell)
    try:
        assert pyrepl3_ext.list_snapshots(shell) == []
    finally:
        pyrepl3_ext.unload_ipython_extension(shell)
    assert sys.modules["pyrepl3_ext.namespace"] is namespace
