"""The seven weakness classes of issue 16, each at the layer that closes it.

The escape corpus (``escapes/name_gadgets.py`` ... ``hardlinks.py``) proves
the classes end to end; these tests pin each root fix on its own, with the
behaviour benign code relies on kept.
"""

from __future__ import annotations

import gc
import os

import pytest

import pyrepl3_ext
from pyrepl3_ext.errors import SecurityError
from pyrepl3_ext.security import FilesCapability, audit
from pyrepl3_ext.security.facade import make_facade
from pyrepl3_ext.security.sealed import is_sealed

from .helpers import run, session, value


@pytest.fixture
def restricted(ip):
    pyrepl3_ext.set_policy(ip, "restricted")
    return ip


@pytest.fixture
def guarded(ip):
    pyrepl3_ext.set_policy(ip, "guarded")
    return ip


# -- 1. attribute names as data -------------------------------------------------

@pytest.mark.parametrize("code, refused", [
    ("import functools, json\nfunctools.update_wrapper(type('H', (), {})(), json.dumps,"
     " assigned=('__glob' + 'als__',), updated=())", "'__globals__'"),
    ("from functools import wraps\nwraps(len, assigned=['__self__'], updated=[])("
     "type('H', (), {})())", "'__self__'"),
    ("import functools, json\nfunctools.update_wrapper(json.dumps, lambda: 0)",
     "cells cannot change host functions"),
    ("import copy\nclass R:\n    def __reduce__(self):\n"
     "        return (R, (), (None, {'__class__': int}))\ncopy.copy(R())", "'__class__'"),
    ("import dataclasses, json\n@dataclasses.dataclass\nclass D:\n    a: int = 0\n"
     "f = dataclasses.fields(D)[0]\nf.name = '__globals__'\nd = D()\n"
     "dataclasses.replace(d)", "'__globals__'"),
    ("import functools, json\nfunctools.wraps(len)(json.JSONDecoder)",
     "cells cannot change host"),
])
def test_library_helpers_apply_the_name_rules(restricted, events, code, refused):
    _, error = run(restricted, events, code)
    assert error and error["ename"] == "SecurityError", error
    assert refused in error["evalue"]


def test_library_helpers_still_do_their_ordinary_work(restricted, events):
    code = ("import functools, copy, dataclasses\n"
            "def deco(f):\n    @functools.wraps(f)\n    def inner(*a):\n"
            "        return f(*a) + 1\n    return inner\n"
            "@deco\ndef g(x):\n    'doc'\n    return x\n"
            "@functools.total_ordering\nclass V:\n    def __init__(self, v):\n"
            "        self.v = v\n    def __eq__(self, o):\n        return self.v == o.v\n"
            "    def __lt__(self, o):\n        return self.v < o.v\n"
            "@dataclasses.dataclass(frozen=True)\nclass P:\n    x: int\n    _y: int = 0\n"
            "p = dataclasses.replace(P(1), x=2)\n"
            "(g(1), g.__name__, g.__doc__, V(2) >= V(1), copy.deepcopy([p])[0],"
            " dataclasses.asdict(p))")
    assert value(restricted, events, code) == (
        "(2, 'g', 'doc', True, P(x=2, _y\u00b7=0), {'x': 2, '_y\u00b7': 0})")


# -- 2. code generation ----------------------------------------------------------

#: a class statement whose namespace starts with the annotations given
_PREPARED = ("import dataclasses\nclass Meta(type):\n    @classmethod\n"
             "    def __prepare__(mcs, name, bases):\n"
             "        return {'__annot' 'ations__': %s}\n"
             "class C(metaclass=Meta):\n    pass\ndataclasses.dataclass(C)")


@pytest.mark.parametrize("code, refused", [
    (_PREPARED % "{'a b': int}", "field name 'a b'"),
    (_PREPARED % "{'__init__': int}", "field name '__init__'"),
    ("import dataclasses\nC = type('C', (), {'__annotations__': {'a': int}})\n"
     "dataclasses.dataclass(C)", "not a class of this session"),
    ("import dataclasses\nC = type('C', (), {'__module__': 'json', '__annotations__':"
     " {'a': int}})\ndataclasses.dataclass(C)", "not a class of this session"),
    ("import dataclasses, fractions\ndataclasses.dataclass(fractions.Fraction)",
     "not a class of this session"),
])
def test_dataclasses_pastes_only_plain_names_into_a_session_class(restricted, events,
                                                                  code, refused):
    _, error = run(restricted, events, code)
    assert error and error["ename"] == "SecurityError", error
    assert refused in error["evalue"]


# -- 3. class patterns -------------------------------------------------------------

def test_positional_class_patterns_check_the_class(restricted, events):
    _, error = run(restricted, events,
                   "import json\nclass M(type):\n    def __instancecheck__(c, o):\n"
                   "        return True\nC = M('C', (), {'__match_args__': ('x',)})\n"
                   "match json.dumps:\n    case C(v):\n        pass")
    assert error["ename"] == "SecurityError" and "metaclass M" in error["evalue"]
    _, error = run(restricted, events,
                   "C = type('C', (), {'__match_args__': ('__class__', '__dict__')})\n"
                   "match C():\n    case C(a, b):\n        pass")
    assert error["ename"] == "SecurityError" and "'__dict__'" in error["evalue"]
    _, error = run(restricted, events,
                   "import asyncio\nQ = type('Q', (asyncio.Queue,), {'__match_args__': "
                   "('_loop',)})\nmatch Q():\n    case Q(loop):\n        pass")
    assert error["ename"] == "SecurityError" and "'_loop'" in error["evalue"]


def test_ordinary_positional_patterns_still_match(restricted, events):
    code = ("from dataclasses import dataclass\n@dataclass\nclass Pt:\n    x: int\n"
            "    _tag: str = 't'\n"
            "def where(p):\n    match p:\n        case Pt(0, t):\n            return 'y', t\n"
            "        case Pt(x):\n            return 'x', x\n"
            "        case int(n) | str(n):\n            return 'plain', n\n"
            "[where(Pt(0)), where(Pt(3)), where(7)]")
    assert value(restricted, events, code) == "[('y', 't'), ('x', 3), ('plain', 7)]"


# -- 4. process creation -------------------------------------------------------------

def test_fork_exec_raises_an_audit_event_and_is_sealed(guarded, events, tmp_path):
    import _posixsubprocess
    import subprocess

    assert audit.is_installed() and is_sealed(_posixsubprocess.fork_exec)
    if hasattr(subprocess, "_fork_exec"):
        assert subprocess._fork_exec is _posixsubprocess.fork_exec
    marker = tmp_path / "ran"
    _, error = run(guarded, events,
                      "import _posixsubprocess as p, os, subprocess\nr, w = os.pipe()\n"
                      "tail = ((False, False, -1, None, None, None, -1, None, "
                      "subprocess._USE_VFORK) if hasattr(subprocess, '_USE_VFORK') else "
                      "(False, False, None, None, None, -1, None))\n"
                      f"p.fork_exec([b'/bin/touch', {str(marker).encode()!r}], "
                      "[b'/bin/touch'], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w,"
                      " *tail)")
    assert error["ename"] == "AuditDenied" and "pyrepl3.fork_exec" in error["evalue"]
    assert not marker.exists()
    # the host starts programs as before
    assert subprocess.run(["true"]).returncode == 0


# -- 5. origin ----------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_cell_code_run_later_by_the_host_is_under_its_rules(guarded, events, tmp_path):
    marker = tmp_path / "later"
    run(guarded, events,
        f"import os\nclass P:\n    def __str__(self):\n"
        f"        os.system('touch {marker}')\n        return 'p'\n"
        "p = P()\nstash = []\nimport weakref\n"
        f"fin = weakref.finalize(P(), lambda: os.system('touch {marker}'))")
    with pytest.raises(audit.AuditDenied):
        str(guarded.user_ns["p"])  # the host, outside any cell
    gc.collect()
    assert not marker.exists()
    assert any(e["event"] == "os.system" for e in session(guarded).log
               if e.get("action") == "denied")


def test_cells_cannot_change_a_host_functions_code(guarded, events):
    import genericpath

    before = genericpath.exists.__code__
    _, error = run(guarded, events,
                   "import functools, genericpath\ndef evil(path):\n    return True\n"
                   "functools.update_wrapper(genericpath.exists, evil, "
                   "assigned=('__code__',), updated=())")
    assert error["ename"] == "AuditDenied" and "__code__" in error["evalue"]
    assert genericpath.exists.__code__ is before


def test_host_code_outside_cells_is_not_affected(guarded):
    def f():
        return 1
    f.__defaults__ = ()  # the host changing its own function: no session code on the stack
    assert os.path.exists(__file__)


# -- 6. capabilities ------------------------------------------------------------------

def test_a_facade_method_does_not_lead_to_its_dispatch(restricted, events, tmp_path):
    facade = make_facade("capability", "x", ("read",), lambda m, a, k: (m, a, k))
    method = type(facade).read
    assert method.__closure__ is None and method.__globals__ == {"__builtins__": {}}
    assert is_sealed(method)
    assert facade.read(1) == ("read", (1,), {})
    # cell code reading the sealed defaults, even through a helper, is refused
    pyrepl3_ext.grant(restricted, "files", FilesCapability(str(tmp_path)))
    restricted.user_ns["probe"] = lambda f, n: getattr(f, n)  # a host helper
    _, error = run(restricted, events, "probe(type(files).read, '__kwdefaults__')")
    assert error["ename"] == "AuditDenied" and "sealed" in error["evalue"]
    # help() shows the implementation's signature without the sealed defaults
    mine, error = run(restricted, events, "help(files.read)")
    assert error is None, error
    shown = "".join(e["text"] for e in mine if e["type"] == "output")
    assert "read(path: 'str', encoding: 'str' = 'utf-8') -> 'str'" in shown, shown


def test_the_audit_scope_is_read_only(restricted):
    scope = session(restricted).scope
    for name in ("policy", "read_roots", "write_roots", "user_ns", "session"):
        with pytest.raises(AttributeError):
            setattr(scope, name, None)
    with pytest.raises((AttributeError, TypeError)):
        del scope.policy


# -- 7. hard links: tests/security/test_capabilities.py -------------------------------

# -- %alias_magic ---------------------------------------------------------------------

def test_an_alias_of_a_refused_magic_is_refused(guarded, events):
    _, error = run(guarded, events, "%alias_magic cfg config")
    assert error is None
    _, error = run(guarded, events, "%cfg PyREPL3.security_policy = 'trusted'")
    assert error["kind"] == "security" and "%config is refused" in error["evalue"]
    assert "alias" in error["evalue"] or "%config" in error["evalue"]
    assert session(guarded).policy.name == "guarded"
    _, error = run(guarded, events, "name = 'cf' + 'g'\nget_ipython().run_line_magic(name, '')")
    assert error["ename"] == "SecurityError" and "alias of it" in error["evalue"]
