"""The text of every kind of refusal: what was refused, why, and by which policy."""

from __future__ import annotations

import pytest

import pyrepl3_ext
from pyrepl3_ext.security import FilesCapability

from ..conftest import hook_snapshot
from .helpers import run

PREFIX = "refused by security policy 'restricted': "


@pytest.fixture
def restricted(ip, tmp_path):
    pyrepl3_ext.set_policy(ip, "restricted")
    pyrepl3_ext.grant(ip, "files", FilesCapability(str(tmp_path)))
    return ip


# (cell, ename, exact text the message must contain)
REFUSALS = [
    # AST guard: refused before anything ran
    ("import os", "InputRejected",
     PREFIX + "import of 'os' is refused: it is not in the allowed modules (allowed: "),
    ("len.__self__", "InputRejected",
     PREFIX + "access to the attribute '__self__' is refused: dunder attributes reach "
              "interpreter internals (globals, builtins, subclasses, code objects) (line 1)"),
    ("def g():\n    yield\ng().gi_frame", "InputRejected",
     PREFIX + "access to the attribute 'gi_frame' is refused: frame, code, generator "
              "and traceback internals lead to other frames' globals (line 3)"),
    ("open('x')", "InputRejected",
     PREFIX + "open() is not available: files are reached through the 'files' "
              "capability (files.read, files.write, files.list) (line 1)"),
    ("exec('1')", "InputRejected",
     PREFIX + "exec() is not available: it runs strings as code, outside the security "
              "checks (line 1)"),
    ("files = None", "InputRejected",
     PREFIX + "rebinding or deleting 'files' is refused: it is a capability or a name "
              "the session depends on (line 1)"),
    ("'{0.__class__}'.format(1)", "InputRejected",
     PREFIX + "str.format is refused here: the format template field {0.__class__} "
              "reaches the attribute '__class__' (line 1)"),
    ("!ls", "InputRejected",
     PREFIX + "shell escapes (!cmd, !!cmd, %sx, %system, %%bash, %%script) are refused: "
              "they run programs outside the Python process, where no policy applies"),
    ("%%bash\nls", "InputRejected",
     PREFIX + "the magic %%bash is refused: it runs programs outside the Python process, "
              "where no policy applies (line 1)"),
    ("%load_ext os", "InputRejected",
     PREFIX + "the magic %load_ext is refused: it is not in the allowed magics (allowed: "
              "capture, "),
    ("%run script.py", "InputRejected", PREFIX + "the magic %run is refused"),
    ("%env HOME", "InputRejected", PREFIX + "the magic %env is refused"),
    # runtime: the sanitized builtins, import views and private-attribute check
    ("getattr(len, '__self__')", "SecurityError",
     "getattr: access to the attribute '__self__' is refused: dunder attributes reach "
     "interpreter internals (globals, builtins, subclasses, code objects) (security "
     "policy 'restricted')"),
    # a private attribute of a host object is not there for the cell
    ("import random\nrandom.Random()._randbelow(3)", "AttributeError",
     "'Random' object has no attribute '_randbelow' (security policy 'restricted': a "
     "cell reaches only the _private attributes that cell code set)"),
    ("class A:\n    def m(self):\n        return self._state\n"
     "import random\nA.m(random.Random())", "AttributeError",
     "'Random' object has no attribute '_state' (security policy 'restricted': a "
     "cell reaches only the _private attributes that cell code set)"),
    ("import random\ngetattr(random.Random, '_randbelow')", "AttributeError",
     "type object 'Random' has no attribute '_randbelow' (security policy 'restricted'"),
    ("name = 'sy' + 'stem'\nget_ipython().run_line_magic(name, 'ls')", "SecurityError",
     PREFIX + "the magic %system is refused"),
    # capabilities
    ("files.read('../etc/passwd')", "SecurityError",
     "files: path '../etc/passwd' refused: '..' could leave the granted root"),
    ("files.read('/etc/passwd')", "SecurityError",
     "files: absolute path '/etc/passwd' refused: paths are relative to the granted root"),
    ("type(files)()", "TypeError",
     "capability objects are granted by the host; they cannot be created or subclassed "
     "from a cell"),
]


@pytest.mark.parametrize("code, ename, text", REFUSALS,
                         ids=[r[0].split("\n")[0][:40] for r in REFUSALS])
def test_refusal_message(restricted, events, code, ename, text):
    _, error = run(restricted, events, code)
    assert error is not None
    assert error["ename"] == ename
    assert text in error["evalue"], error["evalue"]
    if ename in ("InputRejected", "SecurityError"):
        assert error["kind"] == "security"


def test_a_missed_private_name_reads_as_written_in_the_terminal_too(ip, capsys):
    """No subscriber: IPython prints the traceback itself, already reworded."""
    pyrepl3_ext.set_policy(ip, "restricted")
    result = ip.run_cell("import random\nrandom.Random()._randbelow(3)")
    printed = capsys.readouterr().out
    assert isinstance(result.error_in_exec, AttributeError)
    assert "has no attribute '_randbelow' (security policy 'restricted'" in printed
    assert "_randbelow\u00b7" not in printed
    # a plain AttributeError is left as it is
    ip.run_cell("import random\nrandom.Random().nope")
    assert "has no attribute 'nope'\n" in capsys.readouterr().out.replace("\x1b[0m", "")


def test_audit_denial_message(ip, events, tmp_path):
    pyrepl3_ext.set_policy(ip, "guarded")
    _, error = run(ip, events, f"open({str(tmp_path / 'x')!r}, 'w')")
    assert error["ename"] == "AuditDenied" and error["kind"] == "security"
    assert error["evalue"] == (f"writing {str(tmp_path / 'x')!r} (outside the granted "
                               f"roots) is refused by security policy 'guarded' "
                               f"(audit event 'open')")
    _, error = run(ip, events, "import os\nos.putenv('A', 'B')")
    assert error["evalue"] == ("changing the process environment is refused by "
                               "security policy 'guarded' (audit event 'os.putenv')")


@pytest.mark.parametrize("code, text", [
    ("%config PyREPL3.security_policy = 'trusted'",
     "the magic %config is refused: it changes the session's policy or configuration, "
     "runs code outside the security checks, or exposes live frames"),
    ("%%bash\nls", "the magic %%bash is refused: it runs programs outside the Python "
                   "process, where no policy applies"),
    ("%load_ext os", "the magic %load_ext is refused"),
])
def test_guarded_refuses_policy_changing_and_shell_magics(ip, events, code, text):
    pyrepl3_ext.set_policy(ip, "guarded")
    _, error = run(ip, events, code)
    assert error["kind"] == "security"
    assert error["evalue"].startswith("refused by security policy 'guarded': " + text)
    assert pyrepl3_ext.get_policy(ip).name == "guarded"


def test_revoked_message(restricted, events):
    run(restricted, events, "keep = files")
    pyrepl3_ext.revoke(restricted, "files")
    _, error = run(restricted, events, "keep.list()")
    assert error["evalue"] == "the capability 'files' was revoked by the host"


def test_unload_removes_every_layer(shell, tmp_path):
    before = hook_snapshot(shell)
    builtins_before = shell.user_ns["__builtins__"]
    gate_before = shell.user_ns.get("get_ipython")
    pyrepl3_ext.load_ipython_extension(shell)
    pyrepl3_ext.set_policy(shell, "restricted")
    pyrepl3_ext.grant(shell, "files", FilesCapability(str(tmp_path)))
    assert shell.user_ns["__builtins__"] is not builtins_before
    shell.run_cell("x_probe = files.list()")
    pyrepl3_ext.unload_ipython_extension(shell)
    shell.user_ns.pop("x_probe", None)
    after = hook_snapshot(shell)
    for snap in (before, after):
        snap["user_ns_keys"] = {k for k in snap["user_ns_keys"] if not k.startswith("_")}
    assert after == before
    assert shell.user_ns["__builtins__"] is builtins_before
    assert shell.user_ns.get("get_ipython") is gate_before
