"""Each enforcement layer on its own: builtins mapping, AST guard, import views."""

from __future__ import annotations

import ast
import builtins
import sys
import types

import pytest
from IPython.core.error import InputRejected

import pyrepl3_ext
from pyrepl3_ext.errors import SecurityError
from pyrepl3_ext.security.ast_guard import SecurityGuard
from pyrepl3_ext.security.builtins import (OWNED_NAME, PRIVATE_CHECK_NAME, TYPE_NAME,
                                           PrivateGuard, build_builtins)
from pyrepl3_ext.security.imports import DEFAULT_ALLOWED_MODULES, Importer
from pyrepl3_ext.security.policy import SecurityPolicy

from .helpers import run, value

RESTRICTED = SecurityPolicy.preset("restricted")


# -- sanitized builtins --------------------------------------------------------

def test_builtins_mapping_is_a_fresh_dict_and_the_module_is_untouched():
    before = dict(vars(builtins))
    importer = Importer(DEFAULT_ALLOWED_MODULES, "restricted")
    guard = PrivateGuard("restricted")
    mapping = build_builtins(RESTRICTED, importer, guard)
    assert type(mapping) is dict and mapping is not vars(builtins)
    for name in ("open", "eval", "exec", "compile", "globals", "breakpoint", "input"):
        assert name not in mapping
        assert name in vars(builtins)
    assert mapping["__import__"] is importer
    assert mapping[PRIVATE_CHECK_NAME] == guard.check
    assert mapping["len"] is len
    assert dict(vars(builtins)) == before


def test_guarded_attribute_functions():
    mapping = build_builtins(RESTRICTED, None, PrivateGuard("restricted"))
    getattr_, setattr_, hasattr_ = mapping["getattr"], mapping["setattr"], mapping["hasattr"]
    assert getattr_([], "append") is not None
    assert getattr_(1, "nope", 5) == 5
    for name in ("__globals__", "__subclasses__", "gi_frame", "f_back", "co_code",
                 "format", "__builtins__"):
        with pytest.raises(SecurityError, match=repr(name)):
            getattr_(len, name)
    with pytest.raises(SecurityError):
        hasattr_(len, "__self__")
    with pytest.raises(SecurityError, match="private attribute '_x'"):
        getattr_(types.SimpleNamespace(_x=1), "_x")
    with pytest.raises(SecurityError, match="writing the attribute '__class__'"):
        setattr_(types.SimpleNamespace(), "__class__", int)


def test_private_guard_knows_the_cells_classes():
    guard = PrivateGuard("restricted")
    ns: dict = {"__builtins__": {**vars(builtins), "__build_class__": guard.build_class}}
    exec("class Mine:\n    def __init__(self):\n        self._x = 1\n"
         "class Sub(Mine):\n    pass\nclass Err(ValueError):\n    pass", ns)
    assert {ns["Mine"], ns["Sub"], ns["Err"]} <= guard.owned
    for obj in (ns["Mine"](), ns["Sub"](), ns["Mine"], ns["Err"]()):
        assert guard.check(obj, "_x") is obj
    import warnings

    with pytest.raises(SecurityError):
        guard.check(warnings.catch_warnings(), "_module")
    with pytest.raises(SecurityError):
        guard.check(types.SimpleNamespace(), "_x")

    class Foreign(ns["Mine"]):  # defined by the host, not by a cell
        pass

    with pytest.raises(SecurityError):
        guard.check(Foreign(), "_x")


# -- AST guard -----------------------------------------------------------------

class FakeSession:
    """What the guard asks of a session, without a shell."""

    def __init__(self, policy=RESTRICTED, protected=("files",), user_ns=None):
        self.policy = policy
        self.importer = Importer(policy.allowed_modules, policy.name) \
            if policy.allowed_modules is not None else None
        self._protected = frozenset(protected)
        self.user_ns = {"get_ipython": object(), **(user_ns or {})}
        self.refusals: list[str] = []

    def protected_names(self):
        return self._protected | {"get_ipython"}

    def gate_active(self):
        return True

    def record_refusal(self, layer, message):
        self.refusals.append(message)


def guard(code, session=None):
    session = session or FakeSession()
    return SecurityGuard(session).visit(ast.parse(code))


REFUSED = {
    "import os": "import of 'os' is refused",
    "from subprocess import run": "import of 'subprocess' is refused",
    "from json import *": "import *",
    "from .x import y": "relative imports",
    "from json import _default_encoder": "private name",
    "().__class__.__base__": "'__base__'",
    "f.__globals__": "'__globals__'",
    "g.gi_frame": "'gi_frame'",
    "tb.tb_frame.f_back": "'f_back'",
    "c.co_code": "'co_code'",
    "x.__class__ = int": "writing the attribute '__class__'",
    "__builtins__": "'__builtins__'",
    "__import__('os')": "'__import__'",
    "eval('1')": "eval() is not available",
    "open('/etc/passwd')": "open() is not available",
    "breakpoint()": "breakpoint() is not available",
    "globals()": "globals() is not available",
    "files = 1": "rebinding or deleting 'files'",
    "del files": "rebinding or deleting 'files'",
    "for files in []: pass": "rebinding or deleting 'files'",
    "import json as files": "rebinding or deleting 'files'",
    "def f():\n    global files": "rebinding or deleting 'files'",
    "def files(): pass": "rebinding or deleting 'files'",
    "class files: pass": "rebinding or deleting 'files'",
    "try:\n    pass\nexcept E as files:\n    pass": "rebinding or deleting 'files'",
    "(files := 1)": "rebinding or deleting 'files'",
    "get_ipython = None": "rebinding or deleting 'get_ipython'",
    "def __getattr__(n): pass": "outside a class body",
    "class A:\n    def __del__(self): pass": "'__del__'",
    "'{0.__class__}'.format(1)": "str.format is refused",
    "'{0.x._y}'.format(1)": "str.format is refused",
    "fmt.format(1)": "'format' is refused",
    "asyncio.gather().get_loop()": "hands out the host's event loop",
    "s.format_map({})": "'format_map' is refused",
    "match p:\n    case C(__globals__=k): pass": "'__globals__'",
    "match p:\n    case C(_state=k): pass": "private attribute '_state'",
    "def f(x: '().__class__.__base__'): pass": "'__base__'",
    "get_ipython().system('ls')": "shell escapes",
    "get_ipython().getoutput('ls')": "shell escapes",
    "get_ipython().run_line_magic('run', 'x.py')": "the magic %run is refused",
    "get_ipython().run_cell_magic('bash', '', 'ls')": "the magic %%bash is refused",
    "get_ipython().run_line_magic('env', 'A=1')": "the magic %env is refused",
    "get_ipython().ex('1')": "get_ipython().ex is refused",
    "get_ipython().user_ns": "get_ipython().user_ns is refused",
}


@pytest.mark.parametrize("code", list(REFUSED))
def test_ast_guard_refuses(code):
    session = FakeSession()
    with pytest.raises(InputRejected) as info:
        guard(code, session)
    message = str(info.value)
    assert message.startswith("refused by security policy 'restricted': ")
    assert REFUSED[code] in message
    assert "(line " in message
    assert session.refusals == [message]


ALLOWED = [
    "import json\njson.dumps(1)",
    "from collections import namedtuple, Counter",
    "class A:\n    def __init__(self):\n        super().__init__()\n    def __repr__(self): return 'a'",
    "type(1).__name__",
    "'{} {:.2f} {0[1]} {x}'.format(1, 2.0, x=3)",
    "f'{x!r:>{width}}'",
    "async def f():\n    await g()\n    async for i in h(): pass\n    async with k(): pass",
    "await something()",
    "match p:\n    case {'a': 1, **rest}: pass\n    case [x, *others]: pass",
    "try:\n    pass\nexcept* ValueError:\n    pass" if hasattr(ast, "TryStar") else "pass",
    "lambda a, /, b, *c, d=1, **e: 0",
    "_ + __ + ___ + _i1 + _1",
    "__name__ == '__main__'",
    "files.read('a')",
    "def f(files):\n    return files",
    "get_ipython().run_line_magic('time', 'x = 1')",
    "p._asdict()",
    "def open():\n    pass\nopen()",
    "math.pi.__round__(2) + (7).__index__() + x.__trunc__() + x.__floor__()",
]


@pytest.mark.parametrize("code", ALLOWED)
def test_ast_guard_allows(code):
    guard(code)


def test_denied_builtin_names_bound_by_the_user_are_fine():
    guard("compile('x')", FakeSession(user_ns={"compile": lambda s: s}))


def test_private_attributes_are_rewritten_to_a_runtime_check():
    tree = guard("class A:\n    def __init__(self):\n        self._x = 1\n"
                 "a = A()\nresult = a._x\nlistener._state")
    source = ast.unparse(tree)
    assert (f"if {TYPE_NAME}(self) not in {OWNED_NAME}:\n"
            f"            {PRIVATE_CHECK_NAME}(self, '_x')\n"
            f"        self._x = 1") in source
    assert f"{PRIVATE_CHECK_NAME}(a, '_x')._x" in source
    assert f"{PRIVATE_CHECK_NAME}(listener, '_state')._state" in source


@pytest.mark.parametrize("body", [
    "self = other\n        return self._x",           # rebound
    "f = lambda: self._x\n        return self._x",    # captured by an inner scope
    "return [self._x for _ in ()]",                   # used in a comprehension
])
def test_fast_path_only_for_plain_local_self(body):
    source = ast.unparse(guard(f"class A:\n    def m(self, other):\n        {body}"))
    assert f"{TYPE_NAME}(self) not in" not in source
    assert f"{PRIVATE_CHECK_NAME}(self, '_x')._x" in source


def test_private_check_at_run_time():
    session = FakeSession()
    private_guard = PrivateGuard("restricted")
    mapping = build_builtins(RESTRICTED, None, private_guard)
    code = compile(SecurityGuard(session).visit(ast.parse(
        "class A:\n    def __init__(self):\n        self._x = 1\n"
        "    def get(self):\n        'doc'\n        return self._x\n"
        "class B(A):\n    pass\n"
        "ok = (A().get(), B().get(), A()._x, A._x if hasattr(A, '_x') else None)\n"
        "try:\n    A.get(foreign)\nexcept Exception as e:\n    refused = str(e)\n")),
        "<cell>", "exec")
    ns = {"__builtins__": mapping, "foreign": types.SimpleNamespace(_x="secret")}
    exec(code, ns)
    assert ns["ok"] == (1, 1, 1, None)
    assert ns["A"].get.__doc__ == "doc"  # the flag goes after the docstring
    assert "private attribute '_x' of a 'SimpleNamespace'" in ns["refused"]


def test_guarded_preset_does_not_restrict_imports_or_private_names():
    session = FakeSession(SecurityPolicy.preset("guarded"))
    tree = guard("import os\nos._exit\nx._y", session)
    assert PRIVATE_CHECK_NAME not in ast.unparse(tree)
    with pytest.raises(InputRejected, match="'__globals__'"):
        guard("f.__globals__", session)


def test_nfkc_spellings_are_the_same_names():
    with pytest.raises(InputRejected, match="'__import__'"):
        guard("__\U0001d62a\U0001d62e\U0001d631\U0001d630\U0001d633\U0001d635__('os')")


def test_an_internal_error_fails_closed(monkeypatch):
    from pyrepl3_ext.security import ast_guard

    def broken(self, node):
        raise RuntimeError("boom")

    monkeypatch.setitem(ast_guard._DISPATCH, ast.Name, broken)
    with pytest.raises(InputRejected, match="the security check failed on this cell"):
        guard("x")


# -- import views -----------------------------------------------------------------

def test_views_expose_listed_names_only():
    importer = Importer(DEFAULT_ALLOWED_MODULES, "restricted")
    json_view = importer("json")
    assert type(json_view) is types.ModuleType and importer.is_view(json_view)
    assert json_view.dumps({"a": 1}) == '{"a": 1}'
    for leak in ("codecs", "decoder", "scanner", "__builtins__", "_default_encoder"):
        assert not hasattr(json_view, leak)
    statistics = importer("statistics")
    assert statistics.mean([1, 2, 3]) == 2 and not hasattr(statistics, "sys")
    re_view = importer("re")
    assert not hasattr(re_view, "enum") and not hasattr(re_view, "sys")
    typing_view = importer("typing")
    assert not hasattr(typing_view, "get_type_hints") and not hasattr(typing_view, "sys")
    operator = importer("operator")
    assert operator.add(1, 2) == 3 and not hasattr(operator, "attrgetter")


def test_views_are_exact_modules_cached_and_separate_from_the_real_module():
    import json

    importer = Importer(DEFAULT_ALLOWED_MODULES, "restricted")
    view = importer("json")
    # exact ModuleType: LOAD_ATTR specialises attribute reads on it
    assert type(view) is types.ModuleType
    assert importer("json") is view and view is not json and view is not sys.modules["json"]
    assert view not in sys.modules.values()


def test_a_write_to_a_view_stays_in_that_sessions_copy():
    import json
    import math

    real_sqrt, real_dumps, real_encoder = math.sqrt, json.dumps, json.JSONEncoder
    mine, other = (Importer(DEFAULT_ALLOWED_MODULES, "restricted") for _ in range(2))
    view = mine("math")
    view.sqrt = lambda x: "replaced"
    view.injected = "x"
    del view.floor
    json_view = mine("json")
    json_view.JSONEncoder = None  # the real dumps' globals are the real module's
    assert mine("math").sqrt(4) == "replaced" and not hasattr(mine("math"), "floor")
    # not the real module, not the host, not another session
    assert math.sqrt is real_sqrt and math.sqrt(4) == 2.0 and not hasattr(math, "injected")
    assert math.floor(1.5) == 1 and sys.modules["math"] is math
    assert other("math").sqrt(4) == 2.0 and not hasattr(other("math"), "injected")
    assert json.JSONEncoder is real_encoder and json_view.dumps is real_dumps
    assert json_view.dumps([1]) == "[1]" and other("json").JSONEncoder is real_encoder


def test_a_cell_writing_a_view_changes_only_its_session(ip, events):
    import math

    real_sqrt = math.sqrt
    pyrepl3_ext.set_policy(ip, RESTRICTED)
    mine, error = run(ip, events, "import math\nmath.sqrt = len\nmath.pi = 3\n"
                                  "r = (math.sqrt('ab'), math.pi)")
    assert error is None, error
    assert ip.user_ns["r"] == (2, 3)
    assert math.sqrt is real_sqrt and math.pi != 3 and sys.modules["math"] is math
    # the same session sees its own copy again; a new policy (a new session
    # importer) starts from the real module
    assert value(ip, events, "import math\nmath.sqrt('abc')") == "3"
    pyrepl3_ext.set_policy(ip, RESTRICTED)
    assert value(ip, events, "import math\nmath.sqrt(9)") == "3.0"
    # the dunder attributes of a view stay out of reach
    for code in ("import math\nmath.__dict__", "import math\nmath.__getattr__ = len",
                 "import math\nsetattr(math, '__getattr__', len)",
                 "import math\nmath.__class__ = type(math)"):
        mine, error = run(ip, events, code)
        assert error is not None and error["kind"] == "security", code


def test_importer_refusals():
    importer = Importer(DEFAULT_ALLOWED_MODULES, "restricted")
    with pytest.raises(SecurityError, match="import of 'os' is refused"):
        importer("os")
    with pytest.raises(SecurityError, match="relative imports"):
        importer("json", {}, {}, ("x",), 1)
    with pytest.raises(SecurityError, match=r"import \*"):
        importer("json", {}, {}, ("*",), 0)


def test_allowed_submodules_are_views_too():
    importer = Importer(DEFAULT_ALLOWED_MODULES, "restricted")
    top = importer("collections.abc")
    assert type(top.abc) is types.ModuleType and top.abc.Mapping is not None
    only_sub = Importer({"os.path": frozenset({"join"})}, "p")("os.path")
    assert type(only_sub) is types.ModuleType and only_sub.path.join("a", "b") == "a/b"
    assert not hasattr(only_sub, "system")
