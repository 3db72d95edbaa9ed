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
from pyrepl3_ext.security import FilesCapability
from pyrepl3_ext.security.builtins import build_builtins
from pyrepl3_ext.security.imports import DEFAULT_ALLOWED_MODULES, Importer
from pyrepl3_ext.security.policy import SecurityPolicy
from pyrepl3_ext.security.rules import PRIVATE_SUFFIX as S

from .helpers import run, session, value

RESTRICTED = SecurityPolicy.preset("restricted")


# -- sanitized builtins --------------------------------------------------------

def test_builtins_mapping_is_a_fresh_dict_and_the_module_is_untouched():
    before = dict(vars(builtins))
    importer = Importer(DEFAULT_ALLOWED_MODULES, "restricted")
    mapping = build_builtins(RESTRICTED, importer)
    assert type(mapping) is dict and mapping is not vars(builtins)
    for name in ("open", "eval", "exec", "compile", "globals", "breakpoint", "input"):
        assert name not in mapping
        assert name in vars(builtins)
    assert mapping["__import__"] is importer
    assert mapping["__build_class__"] is builtins.__build_class__
    assert mapping["len"] is len
    assert dict(vars(builtins)) == before


def test_guarded_attribute_functions():
    mapping = build_builtins(RESTRICTED, None)
    getattr_, setattr_, hasattr_ = mapping["getattr"], mapping["setattr"], mapping["hasattr"]
    assert getattr_([], "append") is not None
    assert getattr_(1, "nope", 5) == 5
    for name in ("__globals__", "__subclasses__", "gi_frame", "f_back", "co_code",
                 "format", "__builtins__"):
        with pytest.raises(SecurityError, match=repr(name)):
            getattr_(len, name)
    with pytest.raises(SecurityError):
        hasattr_(len, "__self__")
    # a private name is the session's spelling of it: the host object's own
    # _x is not what getattr reads
    with pytest.raises(AttributeError, match=f"'_x{S}'"):
        getattr_(types.SimpleNamespace(_x=1), "_x")
    with pytest.raises(SecurityError, match="writing the attribute '__class__'"):
        setattr_(types.SimpleNamespace(), "__class__", int)


def test_guarded_attribute_functions_use_the_session_spelling():
    mapping = build_builtins(RESTRICTED, None)
    ns: dict = {"__builtins__": mapping}
    exec("class A:\n    pass\na = A()\nsetattr(a, '_x', 1)\n"
         "r = (getattr(a, '_x'), hasattr(a, '_x'), getattr(a, '_y', 2))\n"
         "delattr(a, '_x')\nafter = hasattr(a, '_x')", ns)
    assert ns["r"] == (1, True, 2) and ns["after"] is False
    a = ns["A"]()
    mapping["setattr"](a, "_x", 3)
    assert vars(a) == {"_x" + S: 3}
    assert mapping["getattr"](a, "_x" + S) == 3  # already spelled: the same name
    with pytest.raises(SecurityError, match="writing the attribute '__x'"):
        mapping["setattr"](a, "__x", 1)


# -- AST guard -----------------------------------------------------------------

@pytest.fixture
def restricted(ip, tmp_path):
    """``ip`` under ``restricted`` with a ``files`` capability granted: the
    guard's questions (protected names, the magics gate, imports) are
    answered by the real session, not a stand-in.  Names the cells define
    are removed afterwards (the shell is shared by the whole run)."""
    pyrepl3_ext.set_policy(ip, "restricted")
    pyrepl3_ext.grant(ip, "files", FilesCapability(str(tmp_path)))
    before = set(ip.user_ns)
    yield ip
    for name in set(ip.user_ns) - before:
        ip.user_ns.pop(name, None)


def guard(code, shell):
    """The AST guard of ``shell``'s security session applied to ``code``."""
    return SecurityGuard(session(shell)).visit(ast.parse(code))


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
def test_ast_guard_refuses(code, restricted, events):
    log = session(restricted).log
    logged = len(log)
    _, error = run(restricted, events, code)
    assert error is not None and error["kind"] == "security", error
    message = error["evalue"]
    assert message.startswith("refused by security policy 'restricted': ")
    assert REFUSED[code] in message
    assert "(line " in message
    assert [e["message"] for e in log[logged:] if e["action"] == "refused"] == [message]


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
def test_ast_guard_allows(code, restricted, events):
    """Not refused before running (the cells may still fail at run time:
    most use names they never define)."""
    log = session(restricted).log
    logged = len(log)
    guard(code, restricted)
    _, error = run(restricted, events, code)
    assert error is None or not error["evalue"].startswith("refused by security policy"), error
    assert [e for e in log[logged:] if e["action"] == "refused"] == []


def test_denied_builtin_names_bound_by_the_user_are_fine(restricted, events):
    restricted.user_ns["compile"] = lambda s: s
    assert value(restricted, events, "compile('x')") == "'x'"


def test_private_attributes_get_the_session_spelling(restricted):
    tree = guard("class A:\n    _count = 0\n    def __init__(self):\n        self._x = 1\n"
                 "    def _helper(self, other):\n        return other._x + A._count\n"
                 "a = A()\nresult = a._x\nlistener._state\ngetattr(a, '_x')\n"
                 "match a:\n    case A(_x=1): pass", restricted)
    source = ast.unparse(tree)
    assert f"_count{S} = 0" in source and f"def _helper{S}(self, other)" in source
    for spelled in (f"self._x{S} = 1", f"other._x{S} + A._count{S}", f"result = a._x{S}",
                    f"listener._state{S}", f"case A(_x{S}=1)"):
        assert spelled in source
    assert "getattr(a, '_x')" in source  # the guarded getattr spells it at run time
    assert "_x =" not in source and "._x " not in source and "._x\n" not in source


def test_class_scope_spelling_follows_python_scoping(restricted):
    source = ast.unparse(guard(
        "class A:\n    global _g\n    _g = 1\n    _a = 1\n    _b = [_a for _ in range(2)]\n"
        "    _c = [_a for _ in _b]\n    def m(self, v=_a) -> None:\n        _a = 2\n"
        "        return _a\n    class _In:\n        pass\n    try:\n        pass\n"
        "    except ValueError as _e:\n        pass\n    match 1:\n        case _m:\n"
        "            pass", restricted))
    assert "_g = 1" in source  # declared global: the module's name
    assert f"_a{S} = 1" in source and f"v=_a{S}" in source
    assert f"_b{S} = [_a for _ in range(2)]" in source  # comprehension body: own scope
    assert f"_c{S} = [_a for _ in _b{S}]" in source  # its first iterable: class scope
    assert "        _a = 2\n        return _a" in source  # the method's local
    assert f"class _In{S}:" in source
    assert f"except ValueError as _e{S}:" in source and f"case _m{S}:" in source


def test_private_attributes_at_run_time(restricted):
    mapping = build_builtins(RESTRICTED, None)
    code = compile(SecurityGuard(session(restricted)).visit(ast.parse(
        "class A:\n    _k = 5\n    def __init__(self):\n        self._x = 1\n"
        "    def get(self):\n        'doc'\n        return self._x\n"
        "    def put(self, v):\n        self._x = v\n"
        "class B(A):\n    pass\n"
        "ok = (A().get(), B().get(), A()._x, A._k, B._k, hasattr(A, '_x'))\n"
        "try:\n    A.get(foreign)\nexcept AttributeError as e:\n    hidden = e\n"
        "A.put(foreign, 'mine')\n")),
        "<cell>", "exec")
    foreign = types.SimpleNamespace(_x="secret")
    ns = {"__builtins__": mapping, "foreign": foreign}
    exec(code, ns)
    assert ns["ok"] == (1, 1, 1, 5, 5, False)
    assert ns["A"].get.__doc__ == "doc"
    # a method called with a foreign self reaches only session-spelled names:
    # the host object's own _x is neither read nor written
    assert ns["hidden"].name == "_x" + S
    assert foreign._x == "secret" and getattr(foreign, "_x" + S) == "mine"


PRIVATE_STATE_CELLS = [
    # (cell, value under restricted); each is the ordinary way to keep state
    ("import dataclasses\n@dataclasses.dataclass\nclass Acc:\n    _total: int = 0\n"
     "    def add(self, x):\n        self._total += x\n        return self\n"
     "Acc().add(2).add(3)._total", "5"),
    ("class Reg:\n    _all = []\n    @classmethod\n    def add(cls, x):\n"
     "        cls._all.append(x)\n        return len(Reg._all)\nReg.add(1), Reg.add(2)",
     "(1, 2)"),
    ("class Base:\n    def _helper(self):\n        return 'base'\n"
     "class Child(Base):\n    def _helper(self):\n        return 'child+' + super()._helper()\n"
     "Child()._helper()", "'child+base'"),
    ("class Mangled:\n    def __init__(self):\n        self.__secret = 7\n"
     "    def get(self):\n        return self.__secret\nMangled().get()", "7"),
    ("class P:\n    def __init__(self):\n        self._v = 1\n"
     "    def __eq__(self, other):\n        return self._v == other._v\n"
     "P() == P(), getattr(P(), '_v'), hasattr(P(), '_w')",
     "(True, 1, False)"),
    # a session class with a host base keeps private state of its own; the
    # base's private state stays out of reach
    ("import random\nclass R(random.Random):\n    def __init__(self):\n"
     "        super().__init__(3)\n        self._draws = 0\n    def draw(self):\n"
     "        self._draws += 1\n        return self._draws\n"
     "    def peek(self):\n        return self._randbelow\nr = R()\n"
     "r.draw(), r.draw(), hasattr(r, '_randbelow')", "(1, 2, False)"),
]


@pytest.mark.parametrize("code, expected", PRIVATE_STATE_CELLS,
                         ids=[c.split("\n")[-1][:30] for c, _ in PRIVATE_STATE_CELLS])
def test_private_state_of_session_classes_works_under_restricted(ip, events, code, expected):
    pyrepl3_ext.set_policy(ip, RESTRICTED)
    assert value(ip, events, code) == expected


def test_display_hooks_keep_their_names(ip, events):
    pyrepl3_ext.set_policy(ip, RESTRICTED)
    mine, error = run(ip, events, "class Card:\n    def _repr_html_(self):\n"
                                  "        return '<b>card</b>'\nCard()")
    assert error is None, error
    result = next(e for e in mine if e["type"] == "result")
    assert result["data"]["text/html"] == "<b>card</b>"


def test_a_host_base_private_state_is_hidden(ip, events):
    pyrepl3_ext.set_policy(ip, RESTRICTED)
    _, error = run(ip, events, "import random\nclass R(random.Random):\n"
                               "    def peek(self):\n        return self._randbelow(5)\n"
                               "R().peek()")
    assert error["ename"] == "AttributeError"
    assert error["evalue"].startswith("'R' object has no attribute '_randbelow' (security")
    assert S not in "".join(error["traceback"][-1:])


def test_guarded_preset_does_not_restrict_imports_or_private_names(ip):
    pyrepl3_ext.set_policy(ip, "guarded")
    tree = guard("import os\nos._exit\nx._y", ip)
    assert S not in ast.unparse(tree)
    with pytest.raises(InputRejected, match="'__globals__'"):
        guard("f.__globals__", ip)


def test_nfkc_spellings_are_the_same_names(restricted):
    with pytest.raises(InputRejected, match="'__import__'"):
        guard("__\U0001d62a\U0001d62e\U0001d631\U0001d630\U0001d633\U0001d635__('os')",
              restricted)


def test_an_internal_error_fails_closed(monkeypatch, restricted):
    from pyrepl3_ext.security import ast_guard

    def broken(self, node):
        raise RuntimeError("boom")

    monkeypatch.setitem(ast_guard._DISPATCH, ast.Name, broken)
    with pytest.raises(InputRejected, match="the security check failed on this cell"):
        guard("x", restricted)


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
