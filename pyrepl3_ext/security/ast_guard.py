"""The AST guard: refuse forbidden constructs before any of the cell runs.

An ``ast.NodeTransformer`` in ``shell.ast_transformers``.  IPython runs it on
every cell (and on what ``%time``/``%timeit`` compile), after its own input
transformations, so ``!cmd`` arrives as ``get_ipython().system('cmd')`` and
``%%bash`` as ``get_ipython().run_cell_magic('bash', ...)``.  A refusal
raises IPython's ``InputRejected``: nothing of the cell runs and the
execution's ``error`` event has kind ``security``.

The checks are static (names as written; the parser has already
NFKC-normalised identifiers, so ``__𝘪𝘮𝘱𝘰𝘳𝘵__`` is ``__import__``).  The one
rewrite spells private names the session's way (``obj._x`` -> ``obj._x·``,
see :func:`_spell_private_names`), so cell code never names a host object's
private state.
Dynamic routes to the same attributes (``getattr``) go through the sanitized
builtins, which apply the same :mod:`.rules`.

Why not RestrictedPython's ``RestrictingNodeTransformer``: see
``docs/security.md`` (it rejects ``async``/``await``, ``match`` and every
``_name``, and its runtime guards cost 5x on attribute-heavy code).
"""

from __future__ import annotations

import ast
import re
import string
from typing import Any, Iterable

from IPython.core.error import InputRejected

from .rules import (ALLOWED_DUNDER_NAMES, attribute_refusal, is_dunder, is_private,
                    session_private_name)

#: Attributes of ``get_ipython()`` that IPython's own input transformations
#: produce; the gate object behind ``get_ipython`` exposes only these.
GATE_METHODS = frozenset({"run_line_magic", "run_cell_magic", "system", "getoutput"})

_FIELD_ATTR = re.compile(r"\.([^.\[\]]*)")


class Refusal(Exception):
    """Internal: one refused construct (becomes ``InputRejected``)."""

    def __init__(self, node: ast.AST | None, message: str):
        super().__init__(message)
        self.lineno = getattr(node, "lineno", None)


class SecurityGuard(ast.NodeTransformer):
    """The AST layer of one session's policy (``session`` is a ``SessionSecurity``)."""

    def __init__(self, session: Any):
        super().__init__()
        self.session = session

    # IPython calls visit() on the Module; everything happens from here
    def visit(self, node: ast.AST) -> ast.AST:
        __tracebackhide__ = True  # noqa: F841 - IPython hides this frame in tracebacks
        if not isinstance(node, ast.Module) and not isinstance(node, ast.Expression):
            return super().visit(node)
        session = self.session
        try:
            checker = _Checker(session)
            checker.run(node)
            if checker.saw_private and session.policy.guard_private_attributes:
                _spell_private_names(node)
            if checker.positional_classes:
                if not session.match_check_available():
                    raise Refusal(None, "positional sub-patterns in class patterns "
                                        "(case C(x)) need the session's builtins: use "
                                        "keyword patterns (case C(name=x))")
                _check_positional_patterns(node)
            return node
        except Refusal as refusal:
            where = f" (line {refusal.lineno})" if refusal.lineno else ""
            message = (f"refused by security policy {session.policy.name!r}: "
                       f"{refusal}{where}")
            session.record_refusal("ast", message)
        except InputRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - fail closed, never unregistered
            message = (f"refused by security policy {session.policy.name!r}: the "
                       f"security check failed on this cell ({type(exc).__name__}: "
                       f"{exc}); nothing ran")
            session.record_refusal("ast", message)
        _refuse(message)


def _refuse(message: str) -> None:
    """The last frame of a refusal's traceback, kept this short on purpose."""
    raise InputRejected(message)


def _spell_private_names(tree: ast.AST) -> None:
    """Give every private name cell code writes its session spelling.

    ``obj._x`` becomes ``obj._x·`` (:func:`~.rules.session_private_name`),
    whatever ``obj`` is: the session's private state lives under names no
    host object has, so no test is needed at run time and none is made
    (``self._x`` in a method called in a tight loop costs what it costs
    without the policy).  ``A.m(host_obj)`` reaches only ``host_obj._x·``,
    which is not there.  Class patterns (``case P(_x=0)``) are spelled the
    same way, and so are the names a class body binds (``_count = 0``,
    ``def _helper``), in the class's own scope, so that ``self._count`` and
    ``A._helper`` find them.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            node.attr = session_private_name(node.attr)
        elif isinstance(node, ast.ClassDef):
            _spell_class_scope(node.body)
        elif isinstance(node, ast.MatchClass):
            node.kwd_attrs = [session_private_name(a) for a in node.kwd_attrs]


#: Classes whose class pattern matches the subject itself: ``case int(x)``
#: reads no attribute.
SELF_MATCHING = frozenset({"bool", "bytearray", "bytes", "dict", "float", "frozenset",
                           "int", "list", "set", "str", "tuple"})

#: The builtin that checks a class before a positional class pattern uses it
#: (``builtins.check_match_class``); the cell cannot name it (a dunder).
MATCH_CHECK = "__pyrepl3_match_class__"


def _needs_match_check(node: Any, bound: Iterable[str]) -> bool:
    """A class pattern whose positional sub-patterns read attributes."""
    if not node.patterns:
        return False
    cls = node.cls
    return not (isinstance(cls, ast.Name) and cls.id in SELF_MATCHING
                and cls.id not in bound)


def _check_positional_patterns(tree: ast.AST) -> None:
    """Check, at run time, every class a positional class pattern uses.

    ``case C(v)`` makes the interpreter read ``subject.<C.__match_args__[0]>``
    itself: an attribute name the AST guard never sees.  Before each
    ``match`` statement that has such a pattern, ``C`` is evaluated once and
    handed to :data:`MATCH_CHECK`, which refuses a class whose
    ``__match_args__`` names an attribute cell code could not read, or whose
    metaclass is the session's own (its ``__instancecheck__`` or
    ``__getattr__`` would choose the subject or the names); the pattern then
    uses the checked class (``case _pyrepl3_match·1(v)``).  The class is
    evaluated before the subject, not when its case is tried: the one change
    a cell can see.
    """
    counter = [0]
    for parent in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(parent, field, None)
            if type(stmts) is not list or not any(isinstance(s, ast.Match) for s in stmts):
                continue
            out: list[ast.stmt] = []
            for stmt in stmts:
                if isinstance(stmt, ast.Match):
                    out.extend(_hoist_classes(stmt, counter))
                out.append(stmt)
            setattr(parent, field, out)


def _hoist_classes(match: ast.Match, counter: list) -> list[ast.stmt]:
    hoisted = []
    for case in match.cases:
        for node in ast.walk(case.pattern):
            if isinstance(node, ast.MatchClass) and node.patterns \
                    and not (isinstance(node.cls, ast.Name) and node.cls.id in SELF_MATCHING):
                counter[0] += 1
                name = f"_pyrepl3_match\u00b7{counter[0]}"
                call = ast.Call(ast.Name(MATCH_CHECK, ast.Load()), [node.cls], [])
                assign = ast.Assign([ast.Name(name, ast.Store())], call)
                ast.copy_location(assign, match)
                ast.fix_missing_locations(assign)
                hoisted.append(assign)
                node.cls = ast.copy_location(ast.Name(name, ast.Load()), node.cls)
    return hoisted


def _outer_parts(node: Any) -> list[ast.AST]:
    """What a def or lambda evaluates where it is written, not in its body."""
    args = node.args
    parts: list[ast.AST] = [*args.defaults, *(d for d in args.kw_defaults if d)]
    if not isinstance(node, ast.Lambda):
        parts += [a.annotation for a in _all_args(args) if a.annotation is not None]
        parts += node.decorator_list
        if node.returns is not None:
            parts.append(node.returns)
    return parts


_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _class_scope(body: list[ast.stmt]) -> Iterable[ast.AST]:
    """Every node of a class body that runs in the class's own scope.

    Method and lambda bodies have their own scope; a comprehension's only
    part evaluated in the class scope is its first iterable.
    """
    stack: list[ast.AST] = list(reversed(body))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            children = _outer_parts(node)
        elif isinstance(node, ast.ClassDef):
            children = [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]
        elif isinstance(node, _COMPREHENSIONS):
            children = [node.generators[0].iter]
        else:
            children = list(ast.iter_child_nodes(node))
        stack.extend(reversed(children))


def _binding_field(node: ast.AST) -> str | None:
    """The field of ``node`` that holds a name it binds, if it binds one."""
    if isinstance(node, ast.Name):
        return None if isinstance(node.ctx, ast.Load) else "id"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                         ast.ExceptHandler, ast.MatchAs, ast.MatchStar)):
        return "name"
    if isinstance(node, ast.MatchMapping):
        return "rest"
    if isinstance(node, ast.alias):
        return "asname"
    return None


def _spell_class_scope(body: list[ast.stmt]) -> None:
    """Spell the private names a class body binds, wherever its scope uses them."""
    scope = list(_class_scope(body))
    declared = {name for node in scope if isinstance(node, (ast.Global, ast.Nonlocal))
                for name in node.names}
    bound = {getattr(node, field) for node in scope if (field := _binding_field(node))}
    private = {name for name in bound - declared if name and is_private(name)}
    if not private:
        return
    for node in scope:
        field = "id" if isinstance(node, ast.Name) else _binding_field(node)
        if field and getattr(node, field) in private:
            setattr(node, field, session_private_name(getattr(node, field)))


def _bound_names(tree: ast.AST) -> set[str]:
    """Every name the cell binds anywhere (assignments, defs, imports, args)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).partition(".")[0])
    return names


def _template_refusal(template: str) -> str | None:
    """Why ``template.format(...)`` is refused (attribute paths in fields), or None."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return None  # format() itself will raise
    for _literal, field, spec, _conversion in parsed:
        if field:
            for match in _FIELD_ATTR.finditer(field):
                part = match.group(1)
                if part.startswith("_") or attribute_refusal(part):
                    return (f"the format template field {{{field}}} reaches the "
                            f"attribute {part!r}")
        if spec and "{" in spec:
            nested = _template_refusal(spec)
            if nested:
                return nested
    return None


class _Checker(ast.NodeVisitor):
    """Walks the whole tree and raises :class:`Refusal` at the first violation."""

    def __init__(self, session: Any):
        self.session = session
        self.policy = session.policy
        self.protected = session.protected_names()
        self.class_depth = 0
        self.saw_private = False
        #: a class pattern with positional sub-patterns (checked at run time)
        self.positional_classes = False
        self._tree: ast.AST | None = None
        self._bound: set[str] | None = None

    @property
    def bound(self) -> set[str]:
        """Names the cell binds; computed on first need (a second walk)."""
        if self._bound is None:
            self._bound = _bound_names(self._tree)
        return self._bound

    def run(self, tree: ast.AST) -> None:
        self._tree = tree
        self.visit(tree)

    # The walk itself, without ast.NodeVisitor's per-node getattr dispatch,
    # iter_fields generator and compatibility visit_Constant: this is most
    # of the AST guard's fixed cost per cell (about half, measured).
    def visit(self, node: ast.AST) -> None:
        _DISPATCH.get(type(node), _Checker.generic_visit)(self, node)

    def generic_visit(self, node: ast.AST) -> None:
        visit = self.visit
        for field in node._fields:
            value = getattr(node, field, None)
            if type(value) is list:
                for item in value:
                    if isinstance(item, ast.AST):
                        visit(item)
            elif isinstance(value, ast.AST) and not isinstance(value, ast.expr_context):
                visit(value)

    # -- names -------------------------------------------------------------
    def visit_Name(self, node: ast.Name) -> None:
        name = node.id
        policy = self.policy
        if policy.block_dunder_access and is_dunder(name) and name not in ALLOWED_DUNDER_NAMES:
            raise Refusal(node, f"the name {name!r} is refused: dunder names reach "
                                f"interpreter internals")
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self._check_binding(node, name)
        elif name in policy.denied_builtins and name not in self.bound \
                and name not in self.session.user_ns:
            raise Refusal(node, f"{name}() is not available: {_denied_reason(name)}")

    def _check_binding(self, node: ast.AST, name: str) -> None:
        if self.class_depth and name[0] == "_":
            self.saw_private = True  # a class body's private name gets spelled
        if name in self.protected:
            raise Refusal(node, f"rebinding or deleting {name!r} is refused: it is a "
                                f"capability or a name the session depends on")
        if self.policy.block_dunder_access and is_dunder(name):
            raise Refusal(node, f"binding the name {name!r} is refused: dunder names "
                                f"reach interpreter internals")

    def visit_Global(self, node: ast.Global) -> None:
        for name in node.names:
            self._check_binding(node, name)

    visit_Nonlocal = visit_Global

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self._check_binding(node, node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node: Any) -> None:
        if node.name:
            self._check_binding(node, node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: Any) -> None:
        if node.name:
            self._check_binding(node, node.name)

    def visit_MatchMapping(self, node: Any) -> None:
        if node.rest:
            self._check_binding(node, node.rest)
        self.generic_visit(node)

    def visit_MatchClass(self, node: Any) -> None:
        if self.policy.block_dunder_access and _needs_match_check(node, self.bound):
            self.positional_classes = True
        for attr in node.kwd_attrs:
            self._check_attribute_name(node, attr, store=False)
            if attr[0] == "_":
                self.saw_private = True
        self.generic_visit(node)

    # -- definitions -------------------------------------------------------
    def _visit_function(self, node: Any) -> None:
        name = node.name
        if name in self.protected:
            self._check_binding(node, name)
        if self.class_depth and name[0] == "_":
            self.saw_private = True  # a class body's private name gets spelled
        if self.policy.block_dunder_access and is_dunder(name):
            if not self.class_depth:
                raise Refusal(node, f"defining {name!r} outside a class body is refused: "
                                    f"dunder names reach interpreter internals")
            if name == "__del__":
                raise Refusal(node, "defining '__del__' is refused: finalizers run "
                                    "outside the cell, where the policy cannot follow")
        for arg in _all_args(node.args):
            if arg.annotation is not None:
                self._check_annotation(arg.annotation)
        if node.returns is not None:
            self._check_annotation(node.returns)
        depth, self.class_depth = self.class_depth, 0
        try:
            self.generic_visit(node)
        finally:
            self.class_depth = depth

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_Lambda(self, node: ast.Lambda) -> None:
        depth, self.class_depth = self.class_depth, 0
        try:
            self.generic_visit(node)
        finally:
            self.class_depth = depth

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._check_binding(node, node.name)
        for decorator in node.decorator_list:
            self.visit(decorator)
        for base in node.bases:
            self.visit(base)
        for keyword in node.keywords:
            self.visit(keyword)
        self.class_depth += 1
        try:
            for stmt in node.body:
                self.visit(stmt)
        finally:
            self.class_depth -= 1

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._check_annotation(node.annotation)
        self.generic_visit(node)

    def _check_annotation(self, annotation: ast.AST) -> None:
        # a string annotation is code that typing.get_type_hints & co. eval later
        for sub in ast.walk(annotation):
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                try:
                    parsed = ast.parse(sub.value.strip(), mode="eval")
                except SyntaxError:
                    continue
                for inner in ast.walk(parsed):
                    ast.copy_location(inner, sub)
                self.visit(parsed)

    # -- imports -----------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        importer = self.session.importer
        for alias in node.names:
            bound = alias.asname or alias.name.partition(".")[0]
            self._check_binding(node, bound)
            if importer is not None and not importer.is_allowed(alias.name):
                raise Refusal(node, importer.refusal(alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        importer = self.session.importer
        module = node.module or ""
        if importer is not None:
            if node.level:
                raise Refusal(node, "relative imports are refused: cells are not "
                                    "part of a package")
            if not importer.is_allowed(module):
                raise Refusal(node, importer.refusal(module))
        for alias in node.names:
            if alias.name == "*":
                if importer is not None or self.protected:
                    raise Refusal(node, f"'from {module} import *' is refused: it can "
                                        f"rebind any name; import the names you need")
                continue
            self._check_binding(node, alias.asname or alias.name)
            if self.policy.block_dunder_access:
                self._check_attribute_name(node, alias.name, store=False)
            if self.policy.guard_private_attributes and is_private(alias.name):
                raise Refusal(node, f"importing the private name {alias.name!r} from "
                                    f"{module!r} is refused")

    # -- attributes --------------------------------------------------------
    def _check_attribute_name(self, node: ast.AST, attr: str, *, store: bool) -> None:
        if not self.policy.block_dunder_access:
            return
        if store and is_dunder(attr):
            raise Refusal(node, f"writing the attribute {attr!r} is refused: dunder "
                                f"attributes reach interpreter internals")
        reason = attribute_refusal(attr)
        if reason is not None:
            raise Refusal(node, reason)

    def _is_shell_call(self, node: ast.AST) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "get_ipython" and "get_ipython" not in self.bound)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        attr = node.attr
        if self._is_shell_call(node.value) and self.session.gate_active() \
                and attr not in GATE_METHODS:
            raise Refusal(node, f"get_ipython().{attr} is refused: under this policy "
                                f"get_ipython() only runs allowed magics")
        store = not isinstance(node.ctx, ast.Load)
        if attr in ("format", "format_map") and isinstance(node.ctx, ast.Load) \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            reason = _template_refusal(node.value.value) if self.policy.block_dunder_access else None
            if reason:
                raise Refusal(node, f"str.format is refused here: {reason}")
        else:
            self._check_attribute_name(node, attr, store=store)
        if attr[0] == "_":
            self.saw_private = True
        self.generic_visit(node)

    # -- IPython magics and shell escapes ------------------------------------
    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and self._is_shell_call(func.value):
            self._check_shell_call(node, func.attr)
        self.generic_visit(node)

    def _check_shell_call(self, node: ast.Call, method: str) -> None:
        gate = self.session.gate_active()
        if not gate:
            return
        policy = self.policy
        if method in ("system", "getoutput"):
            if not policy.allow_shell_escapes:
                raise Refusal(node, shell_escape_message())
            return
        if method not in ("run_line_magic", "run_cell_magic"):
            return  # visit_Attribute refuses anything else
        if node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            magic = node.args[0].value
            kind = "cell" if method == "run_cell_magic" else "line"
            for target, target_kind in self.session.magic_chain(magic, kind):
                if not policy.magic_allowed(target):
                    raise Refusal(node, magic_message(policy, target,
                                                      cell=target_kind == "cell"))


def _leaf(self: _Checker, node: ast.AST) -> None:
    """Nodes with nothing to check below them."""


#: ``type(node)`` -> the ``_Checker`` method that visits it (built once).
_DISPATCH: dict = {
    cls: getattr(_Checker, "visit_" + cls.__name__)
    for cls in (c for c in vars(ast).values()
                if isinstance(c, type) and issubclass(c, ast.AST))
    if callable(getattr(_Checker, "visit_" + cls.__name__, None))
    and getattr(_Checker, "visit_" + cls.__name__) is not getattr(
        ast.NodeVisitor, "visit_" + cls.__name__, None)
}
_DISPATCH[ast.Constant] = _leaf


def _all_args(args: ast.arguments) -> Iterable[ast.arg]:
    yield from args.posonlyargs
    yield from args.args
    yield from args.kwonlyargs
    if args.vararg:
        yield args.vararg
    if args.kwarg:
        yield args.kwarg


_DENIED_REASONS = {
    "open": "files are reached through the 'files' capability (files.read, "
            "files.write, files.list)",
    "eval": "it runs strings as code, outside the security checks",
    "exec": "it runs strings as code, outside the security checks",
    "compile": "it builds code objects outside the security checks",
    "breakpoint": "the debugger can run any code and inspect any frame",
    "globals": "it hands out the namespace dict with its builtins",
    "locals": "it hands out frame namespaces",
    "vars": "it hands out namespace dicts",
    "input": "input is a capability the host grants",
    "help": "the help system imports and reads arbitrary modules",
    "exit": "it would end the host's shell",
    "quit": "it would end the host's shell",
    "get_ipython": "the shell object reaches everything",
}


def _denied_reason(name: str) -> str:
    return _DENIED_REASONS.get(name, "the session's security policy removed it from "
                                     "the builtins")


def shell_escape_message() -> str:
    return ("shell escapes (!cmd, !!cmd, %sx, %system, %%bash, %%script) are refused: "
            "they run programs outside the Python process, where no policy applies")


def magic_message(policy: Any, magic: str, *, cell: bool) -> str:
    prefix = "%%" if cell else "%"
    from .policy import SHELL_MAGICS

    allowed = policy.allowed_magics
    if magic in SHELL_MAGICS and not policy.allow_shell_escapes:
        return (f"the magic {prefix}{magic} is refused: it runs programs outside the "
                f"Python process, where no policy applies")
    if magic in policy.denied_magics or allowed is None:
        return (f"the magic {prefix}{magic} is refused: it changes the session's "
                f"policy or configuration, runs code outside the security checks, "
                f"or exposes live frames")
    return (f"the magic {prefix}{magic} is refused: it is not in the allowed magics "
            f"(allowed: {', '.join(sorted(allowed))}); magics can run files, shells or "
            f"change the session's configuration, outside the security checks")
