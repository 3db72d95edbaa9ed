"""Reachability: what a ``restricted`` cell can get hold of, walked, not imagined.

Starting from everything such a cell can name (its builtins, every allowed
module's view and its public attributes, the capability handles, IPython's
names in its namespace), the walk follows, to a fixed depth:

* attributes the guard lets cell code read (``rules.attribute_refusal``;
  private names are spelled for cells, so a host object's are never read);
* items of containers (a cell can subscript and iterate them);
* calls with no argument of the allowed modules' functions and classes;
* calls of every allowed callable with a name or a code string as data:
  each probe name (``__globals__``, ``__self__``, ``__code__``...) and code
  probe is passed positionally after each target, as ``assigned``/
  ``updated`` (``update_wrapper``'s shape), and as the field names of a
  class made by ``type()`` (the class-creation hooks: a property setter
  per probe name catches what library code writes);
* ``type()`` classes whose ``__match_args__`` name a probe, through the
  session's class-pattern check.

It fails on reaching ``sys``, ``os``, ``builtins`` (the module),
``importlib``, any real module object or its ``__dict__``, a frame, a code
object, a grant, a policy or its scope, the session, a capability
implementation or the shell, and prints how many objects, edges and calls
it visited.  The calls run inside the session's audit scope, as a cell's
would.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import io
import sys
import types

import pytest

import pyrepl3_ext
from pyrepl3_ext.security import FilesCapability, audit
from pyrepl3_ext.security.ast_guard import MATCH_CHECK
from pyrepl3_ext.security.capabilities import CustomCapability, Grant
from pyrepl3_ext.security.component import SessionSecurity
from pyrepl3_ext.security.gadgets import Ownership, _LibraryNames
from pyrepl3_ext.security.imports import DEFAULT_ALLOWED_MODULES, Importer
from pyrepl3_ext.security.policy import SecurityPolicy
from pyrepl3_ext.security.rules import (ALLOWED_DUNDER_NAMES, attribute_refusal, is_dunder,
                                        is_private)

from .helpers import run, session

#: costly and not about the IPython version (tests/conftest.py)
pytestmark = pytest.mark.heavy

DEPTH = 4
MAX_OBJECTS = 400_000
PROBE_NAMES = ("__globals__", "__self__", "__code__", "__closure__", "__func__",
               "__dict__", "__builtins__", "__subclasses__", "__mro__", "__base__",
               "__kwdefaults__", "__defaults__", "__traceback__", "__loader__",
               "__spec__", "f_globals", "gi_frame", "tb_frame", "cr_frame",
               "_loop", "_root", "_dispatch")
PROBE_CODE = ("__import__('os')", "x=__import__('os'),*,y", "a}{__import__('os')}{b",
              "x,__import__('os')")
_LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None),
           type(Ellipsis), type(NotImplemented), range, memoryview)
#: Bound C methods and slot wrappers: what the guard lets a cell read on them
#: (names, docs, their class) leads nowhere their ``__self__`` would.
_OPAQUE = (types.MethodWrapperType, types.WrapperDescriptorType,
           types.MethodDescriptorType, types.ClassMethodDescriptorType)
#: Results of one callable, kept per result type: probing makes a new object
#: per call, and two of a kind show what that kind leads to.
PER_KIND = 2


def _forbidden_kinds(shell) -> tuple:
    import importlib
    import os

    real_modules = {id(m): name for name, m in list(sys.modules.items()) if m is not None}
    real_dicts = {id(vars(m)): name for name, m in list(sys.modules.items())
                  if m is not None and hasattr(m, "__dict__")}
    named = {id(sys): "sys", id(os): "os", id(importlib): "importlib",
             id(sys.modules["builtins"]): "the builtins module", id(shell): "the shell",
             id(shell.user_ns): "the session's namespace (its globals)"}
    classes = (types.FrameType, types.CodeType, types.TracebackType, Grant,
               SecurityPolicy, audit.AuditScope, SessionSecurity, Importer,
               Ownership, _LibraryNames, FilesCapability, CustomCapability)

    def why(obj) -> str | None:
        if id(obj) in named:
            return named[id(obj)]
        if isinstance(obj, types.ModuleType) and id(obj) in real_modules:
            return f"the real module {real_modules[id(obj)]!r}"
        if type(obj) is dict and id(obj) in real_dicts:
            return f"the real __dict__ of {real_dicts[id(obj)]!r}"
        if isinstance(obj, classes):
            return f"a {type(obj).__name__}"
        if isinstance(obj, type) and obj in classes:
            return None  # the class itself is public; its instances are not
        return None
    return why


def nameable(name: str) -> bool:
    """A name cell code can write (the AST guard refuses other dunder names)."""
    return not is_dunder(name) or name in ALLOWED_DUNDER_NAMES


class Walk:
    def __init__(self, why, match_check):
        self.why = why
        self.match_check = match_check
        self.seen: set[int] = set()
        self.keep: list = []  # keeps probe results alive, so ids stay unique
        self.objects = 0
        self.edges = 0
        self.calls = 0
        self.found: list[str] = []
        self.kinds: collections.Counter = collections.Counter()
        self.frontier: list[tuple[object, str]] = []
        self.truncated = False

    def target(self, obj) -> None:
        """A host object probes pass as data; neither walked nor called (a
        cell cannot name it)."""
        self.seen.add(id(obj))
        self.keep.insert(0, obj)

    def add(self, obj, path: str) -> None:
        self.edges += 1
        if isinstance(obj, _LEAVES) or id(obj) in self.seen:
            return
        if isinstance(obj, _OPAQUE):
            self.seen.add(id(obj))
            self.keep.append(obj)
            self.objects += 1
            return
        self.seen.add(id(obj))
        self.keep.append(obj)
        self.objects += 1
        reason = self.why(obj)
        if reason is not None:
            self.found.append(f"{path} -> {reason}")
            return
        self.frontier.append((obj, path))

    def expand(self, obj, path: str, callables: bool) -> None:
        if isinstance(obj, dict):
            for key, value in list(obj.items())[:200]:
                self.add(key, f"{path}[{key!r}]:key")
                self.add(value, f"{path}[{key!r}]")
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            for i, value in enumerate(list(obj)[:200]):
                self.add(value, f"{path}[{i}]")
        try:
            names = object.__dir__(obj) if not isinstance(obj, type) else dir(obj)
        except Exception:  # noqa: BLE001 - an object without a usable dir()
            names = []
        for name in names:
            if type(name) is not str or attribute_refusal(name) is not None \
                    or is_private(name):
                continue
            try:
                value = getattr(obj, name)
            except Exception:  # noqa: BLE001 - properties may raise
                continue
            self.add(value, f"{path}.{name}")
        if callables and callable(obj) and obj is not print:
            self.probe(obj, path)

    def call(self, fn, path: str, *args, **kwargs) -> None:
        self.calls += 1
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - refusals and misuse alike
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return
        if inspect.iscoroutine(result):
            result.close()
            return
        kind = (id(fn), type(result))
        self.kinds[kind] += 1
        if self.kinds[kind] <= PER_KIND or self.why(result) is not None:
            self.add(result, path)

    def probe(self, fn, path: str) -> None:
        """Names and code strings as data, the shapes name-taking helpers use."""
        self.keep.append(fn)  # its id keys self.kinds
        self.call(fn, f"{path}()")
        targets = [len, self.keep[0]]  # a builtin (its __self__), a host function
        for probe in PROBE_NAMES + PROBE_CODE:
            sink: list = []
            holder = type("H", (), {probe: property(lambda s: None,
                                                    lambda s, v, sink=sink: sink.append(v))})
            annotated = type("A", (), {"__annotations__": {probe: int}, probe: 0})
            instance = holder()
            for own in (holder, annotated, instance):  # the probe's own objects
                self.seen.add(id(own))
                self.keep.append(own)
            for target in targets:
                self.call(fn, f"{path}(<target>, {probe!r})", target, probe)
                self.call(fn, f"{path}(<holder>, <target>, assigned=({probe!r},))",
                          instance, target, assigned=(probe,), updated=())
                self.call(fn, f"{path}(<target>, assigned=({probe!r},))",
                          target, assigned=[probe], updated=[])
            self.call(fn, f"{path}({probe!r})", probe)
            self.call(fn, f"{path}(<type() class with field {probe!r}>)", annotated)
            for value in sink:
                self.add(value, f"{path}: written to {probe!r}")

    def run(self) -> None:
        for depth in range(DEPTH):
            current, self.frontier = self.frontier, []
            for obj, path in current:
                if self.objects > MAX_OBJECTS:
                    self.truncated = True
                    return
                self.expand(obj, path, callables=depth <= 1)


@pytest.fixture
def restricted(ip, tmp_path):
    pyrepl3_ext.set_policy(ip, "restricted")
    pyrepl3_ext.grant(ip, "files", FilesCapability(str(tmp_path)))
    pyrepl3_ext.grant(ip, "search", CustomCapability(lambda query: [query], {"query": str}))
    return ip


def _in_child(work):
    """Run ``work()`` (returning JSON data) in a forked copy of this process.

    The walk calls every allowed callable with probe names and code, which
    changes the objects it reaches (IPython's, the shell's, classes'): in a
    copy, none of that reaches the tests that share this process's shell.
    """
    import json
    import os

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the copy: report, never return into pytest
        code = 1
        try:
            os.close(read)
            try:
                outcome = {"ok": work()}
            except BaseException as exc:  # noqa: BLE001 - carried to the parent
                import traceback

                outcome = {"error": "".join(traceback.format_exception(exc))[-6000:]}
            with os.fdopen(write, "w") as f:
                json.dump(outcome, f)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    outcome = json.loads(data) if data else {"error": "the copy died without a word"}
    if "error" in outcome:
        pytest.fail(f"in the forked copy:\n{outcome['error']}")
    return outcome["ok"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_nothing_forbidden_is_reachable_from_what_a_restricted_cell_names(
        restricted, events, capsys):
    outcome = _in_child(lambda: _walk_from_a_restricted_cell(restricted, events))
    with capsys.disabled():
        print(f"\nreachability (depth {DEPTH}): {outcome['objects']} objects, "
              f"{outcome['edges']} edges, {outcome['calls']} probe calls; forbidden "
              f"reached: {len(outcome['found'])}"
              + (" (stopped at the object limit)" if outcome["truncated"] else ""))
    assert not outcome["found"], "\n".join(outcome["found"][:40])


def _walk_from_a_restricted_cell(restricted, events) -> dict:
    sec = session(restricted)
    ns = restricted.user_ns
    # a fresh session's namespace: IPython's names, the session's, nothing a
    # previous test in this process left behind
    keep = set(restricted.user_ns_hidden) | set(sec.protected_names()) | {"__builtins__"}
    for name in [n for n in ns if n not in keep]:
        del ns[name]
    imports = "\n".join(f"import {name}" for name in DEFAULT_ALLOWED_MODULES)
    mine, error = run(restricted, events, imports + "\nx = 1")
    assert error is None, error
    walk = Walk(_forbidden_kinds(restricted), sec.builtins[MATCH_CHECK])
    # roots: the session's builtins, the views, the capability handles and gate,
    # IPython's names in the namespace (In, Out, _, _i, _oh, _dh, ...)
    walk.target(pyrepl3_ext.run_cell)  # keep[0]: a host function, passed to probes
    for name, value in sec.builtins.items():
        if nameable(name):
            walk.add(value, f"builtins.{name}")
    for name in DEFAULT_ALLOWED_MODULES:
        walk.add(sec.importer.view(name), f"import {name}")
    for name, value in list(ns.items()):
        if nameable(name):
            walk.add(value, f"ns.{name}")
    walk.add(ns["get_ipython"](), "get_ipython()")
    scope = sec.scope
    previous = audit.enter(scope)
    try:
        with contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            walk.run()
    finally:
        audit.leave(previous)
    # class patterns: no probe name passes the session's check
    for probe in PROBE_NAMES:
        cls = type("C", (), {"__match_args__": (probe,)})
        with pytest.raises(Exception):
            walk.match_check(cls)
    return {"objects": walk.objects, "edges": walk.edges, "calls": walk.calls,
            "found": list(walk.found), "truncated": bool(walk.truncated)}


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_the_walk_finds_the_gadgets_the_views_replace(restricted, events):
    """The control: the same walk from the *real* name-taking helpers (what
    the views held before they were rebound) reaches the host at once."""
    import copy
    import dataclasses
    import functools

    def control() -> list:
        walk = Walk(_forbidden_kinds(restricted), None)
        walk.target(pyrepl3_ext.run_cell)
        for fn in (functools.update_wrapper, functools.wraps, copy.copy, dataclasses.replace):
            walk.add(fn, f"real {fn.__module__}.{fn.__name__}")
        walk.run()
        return list(walk.found)

    found = _in_child(control)
    assert "real functools.update_wrapper: written to '__globals__' -> the real " \
        "__dict__ of 'pyrepl3_ext'" in found, found[:10]
    assert any("a code" in item for item in found), found[:10]
