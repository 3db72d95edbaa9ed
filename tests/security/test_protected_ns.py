"""Patch 0009 (capability-aware ``user_ns``): IPython's own namespace
operations respect the names the security layer protects.

Skipped on stock IPython; fails on a patched build without 0009.  Run with
the patched wheel (``nox -s patched``, docs/upstream.md).
"""

from __future__ import annotations

import builtins

import pytest

import pyrepl3_ext
from pyrepl3_ext._compat import is_patched_build
from pyrepl3_ext.security import CustomCapability, FilesCapability

from .helpers import run, session, value

pytestmark = pytest.mark.skipif(
    not is_patched_build(),
    reason="needs the pyrepl3-patched IPython build (patch 0009-capability-aware-user-ns)")


@pytest.fixture
def granted(ip, tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    pyrepl3_ext.set_policy(ip, "restricted")
    facade = pyrepl3_ext.grant(ip, "files", FilesCapability(str(tmp_path)))
    return ip, facade


def test_protected_names_mirror_the_session(granted):
    ip, _ = granted
    assert {"files", "get_ipython", "__builtins__"} <= ip.protected_names
    assert "get_ipython" in ip.builtin_trap.denied_names
    pyrepl3_ext.revoke(ip, "files")
    assert "files" not in ip.protected_names
    pyrepl3_ext.set_policy(ip, "trusted")
    assert not ip.protected_names & {"files", "get_ipython", "__builtins__"}
    assert "get_ipython" not in ip.builtin_trap.denied_names


@pytest.mark.parametrize("operation", [
    lambda ip: ip.push({"files": "replaced"}),
    lambda ip: ip.push({"x": 1, "get_ipython": lambda: ip}),
    lambda ip: ip.push({"__builtins__": builtins}),
    lambda ip: ip.del_var("files"),
    lambda ip: ip.del_var("files", by_name=True),
    lambda ip: ip.reset_selective("^fil"),
    lambda ip: ip.drop_by_id({"files": ip.user_ns["files"]}),
])
def test_namespace_operations_refuse_protected_names(granted, operation):
    from IPython.core.error import ProtectedNameError

    ip, files = granted
    gate, bdict = ip.user_ns["get_ipython"], ip.user_ns["__builtins__"]
    ip.user_ns["x"] = 0
    with pytest.raises(ProtectedNameError, match=r"is refused: protected in this shell") as info:
        operation(ip)
    assert any(repr(n) in str(info.value) for n in ("files", "get_ipython", "__builtins__"))
    assert ip.user_ns["files"] is files and ip.user_ns["get_ipython"] is gate
    assert ip.user_ns["__builtins__"] is bdict and ip.user_ns["x"] == 0  # nothing changed


def test_xdel_magic_and_aliases(granted, events, capsys):
    ip, files = granted
    run(ip, events, "1")  # del_var by identity reads the last execution result
    ip.run_line_magic("xdel", "files")
    assert "protected in this shell" in capsys.readouterr().out
    assert ip.user_ns["files"] is files
    # deleting another name bound to the same object keeps the protected one
    ip.user_ns["alias"] = files
    ip.del_var("alias")
    assert "alias" not in ip.user_ns and ip.user_ns["files"] is files


def test_reset_puts_protected_names_back(granted, events):
    ip, files = granted
    gate, bdict = ip.user_ns["get_ipython"], ip.user_ns["__builtins__"]
    ip.user_ns["mine"] = 1
    ip.reset(new_session=False)
    assert "mine" not in ip.user_ns
    assert ip.user_ns["files"] is files and ip.user_ns["get_ipython"] is gate
    assert ip.user_ns["__builtins__"] is bdict
    assert value(ip, events, "files.read('a.txt')") == "'alpha'"
    _, error = run(ip, events, "get_ipython().user_ns")
    assert error is not None and error["kind"] == "security"
    assert not [e for e in session(ip).log if e.get("action") == "restored"]
    # %who hides the same names as before once the policy is gone
    pyrepl3_ext.set_policy(ip, "trusted")
    assert "get_ipython" not in ip.run_line_magic("who_ls", "")


def test_sandboxed_cells_leave_the_shared_builtins_module_alone(ip, events):
    seen = {}

    def probe() -> str:
        shared = vars(builtins)
        own = ip.user_ns["__builtins__"]
        seen.update(shared_get_ipython=shared.get("get_ipython"),
                    shared_exit="exit" in shared, own_get_ipython="get_ipython" in own,
                    own_exit="exit" in own)
        return "ok"

    before = {k: vars(builtins).get(k) for k in ("get_ipython", "exit", "quit")}
    pyrepl3_ext.set_policy(ip, "restricted")
    pyrepl3_ext.grant(ip, "probe", CustomCapability(probe, {}))
    assert value(ip, events, "probe()") == "'ok'"
    # the trap worked on the session's dict: nothing installed in the shared
    # module for this cell, and no real get_ipython in the session's builtins
    assert seen["shared_get_ipython"] is before["get_ipython"]
    assert seen["shared_exit"] == (before["exit"] is not None)
    assert seen["own_get_ipython"] is False and seen["own_exit"] is False
    assert {k: vars(builtins).get(k) for k in ("get_ipython", "exit", "quit")} == before


def test_guarded_session_builtins_get_the_gate_only(ip, events):
    pyrepl3_ext.set_policy(ip, "guarded")
    own = ip.user_ns["__builtins__"]
    assert type(own) is dict and "get_ipython" in ip.builtin_trap.denied_names
    _, error = run(ip, events, "x = __builtins__['get_ipython']")
    assert error is not None  # neither the AST guard nor the dict lets it through
    assert "get_ipython" not in own
