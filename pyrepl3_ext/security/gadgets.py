"""Allowed library helpers that read, write or paste attribute names for a cell.

The AST guard checks the names cell code writes.  Some allowed functions
take a name as *data* and do the attribute access themselves, in their own
frame, where no check of the cell applies:

* ``functools.update_wrapper``/``wraps``: ``getattr(wrapped, n)`` and
  ``setattr(wrapper, n, ...)`` for every name in ``assigned``/``updated``;
* ``copy.copy``/``deepcopy``: ``setattr(y, key, value)`` for the slot state
  an object's ``__reduce__`` returns, on an object made by a callable the
  reduce value chose;
* ``dataclasses``: ``getattr(cls, name)`` for every annotation key,
  ``getattr(obj, field.name)`` in ``replace``/``asdict``/``astuple``
  (``Field.name`` is writable), ``setattr(cls, ...)`` on the class it is
  given, and names pasted into the source it executes (see
  :func:`_check_dataclass`).

A session's view of these modules holds *rebound* copies of the module's
functions (:func:`rebind`): the same code over a copy of the module's
globals in which ``getattr``, ``hasattr``, ``setattr`` and ``delattr``
apply the session's rules (:class:`_LibraryNames`).  A name is what cell
code could have written itself, or one of the library's own fixed names
(``__dataclass_fields__``, ``__wrapped__``, ...); a write goes only to an
object the session made, never to a host function, class or module.  The
module's classes, constants and registries are the real ones (a
``Field`` is a ``Field``); only functions are rebound, so nothing costs
more at run time than the checked calls themselves.

Invariant: every module-level function of such a module that a session
can call runs with the checked attribute builtins, because every reference
between the module's functions goes through the rebound globals.  Methods
of the module's classes keep the real globals; none of them takes an
attribute name from its caller (``Field.__set_name__``,
``cached_property.__get__``, ``partialmethod.__get__`` use fixed names or
write to the instance's own ``__dict__``).
"""

from __future__ import annotations

import builtins as _builtins
import keyword
import sys
import types
import weakref
from typing import Any

from ..errors import SecurityError
from . import audit
from .rules import attribute_refusal, is_dunder, session_private_name

#: The dunder names each module uses itself, as literals (any Python
#: 3.10-3.13); a cell passing one of them gets what the library would read
#: or write anyway.
LIBRARY_NAMES = {
    "functools": frozenset({
        "__module__", "__name__", "__qualname__", "__doc__", "__annotations__",
        "__type_params__", "__dict__", "__wrapped__", "__isabstractmethod__",
        "__get__", "__lt__", "__le__", "__gt__", "__ge__"}),
    "copy": frozenset({"__copy__", "__deepcopy__", "__reduce__", "__reduce_ex__",
                       "__setstate__", "__replace__"}),
    "dataclasses": frozenset({
        "__annotations__", "__dataclass_fields__", "__dataclass_params__",
        "__delattr__", "__dict__", "__doc__", "__eq__", "__ge__", "__getstate__",
        "__gt__", "__hash__", "__init__", "__le__", "__lt__", "__match_args__",
        "__post_init__", "__qualname__", "__replace__", "__repr__", "__set_name__",
        "__setattr__", "__setstate__", "__slots__", "__weakref__", "__module__",
        "__name__"}),
}

_real_getattr = _builtins.getattr
_real_setattr = _builtins.setattr
_real_delattr = _builtins.delattr
_real_hasattr = _builtins.hasattr


class Ownership:
    """What one session's cells made, for library writes (:func:`owns`).

    Classes are registered when a cell's ``class`` statement builds them
    (the session's ``__build_class__``, :func:`make_build_class`); a class
    made by a three-argument ``type()`` is not, so library code does not
    rewrite it (``dataclasses.dataclass(type(...))`` is refused).
    """

    def __init__(self, namespace: dict):
        self.namespace = namespace
        self.classes: "weakref.WeakSet[type]" = weakref.WeakSet()


def owns(owned: Ownership, obj: Any) -> bool:
    """Whether ``obj`` is something the session's cells made, for writes.

    A function is the session's when its globals are the session's
    namespace; a class when a cell's ``class`` statement built it.
    Modules, builtins and bound methods never are (a module view is the
    session's copy, but no library needs to write to one).  Anything else
    (instances) is writable, as attribute syntax in a cell would allow.
    """
    if isinstance(obj, types.FunctionType):
        return obj.__globals__ is owned.namespace
    if isinstance(obj, type):
        return obj in owned.classes
    return not isinstance(obj, (types.ModuleType, types.BuiltinFunctionType,
                                types.MethodType))


def make_build_class(owned: Ownership) -> Any:
    """The session's ``__build_class__``: registers what it builds."""
    real = _builtins.__build_class__

    def __build_class__(func, name, *bases, **kwargs):
        cls = real(func, name, *bases, **kwargs)
        if isinstance(cls, type):
            owned.classes.add(cls)
        return cls
    return __build_class__


def exported(cls: type) -> bool:
    """Whether ``cls`` is what its module exports under its name: a host class
    (a cell can copy ``__module__`` and ``__qualname__``, not the export).
    A session's own module, which IPython may put in ``sys.modules``, does
    not count."""
    module = sys.modules.get(getattr(cls, "__module__", None) or "")
    if module is None or any(vars(module) is ns for ns, _ in audit._origins):
        return False  # IPython may register a session's own module (__main__)
    target: Any = module
    for part in str(getattr(cls, "__qualname__", "")).split("."):
        target = getattr(target, part, None) if target is not None else None
    return target is cls


class _LibraryNames:
    """The attribute builtins of a rebound module, for one session."""

    def __init__(self, module: str, owned: Ownership, policy_name: str):
        self.fixed = LIBRARY_NAMES.get(module, frozenset())
        self.module = module
        self.owned = owned
        self.policy_name = policy_name
        #: classes a checked entry point accepted, while it works on them
        #: (dataclasses adds generated methods, whose globals are not the
        #: session's, so ownership is decided once, before the first write)
        self.accepted: list = []

    def name(self, name: Any, verb: str, write: bool = False) -> str:
        """The name to use: refused dunders raise (every dunder but the
        library's own for a write, as in cell code), private names are
        spelled."""
        if type(name) is not str:
            return name  # the real builtin raises TypeError
        if name in self.fixed:
            return name
        reason = attribute_refusal(name)
        if reason is None and write and is_dunder(name):
            reason = f"writing the attribute {name!r} is refused"
        if reason is not None:
            raise SecurityError(f"{self.module}: {verb} with a name from cell code: "
                                f"{reason} (security policy {self.policy_name!r})")
        return session_private_name(name)

    def target(self, obj: Any, verb: str) -> None:
        if not any(obj is c for c in self.accepted) and not owns(self.owned, obj):
            raise SecurityError(f"{self.module}: {verb} on {type(obj).__name__} "
                                f"{getattr(obj, '__qualname__', '')!s} is refused: cells "
                                f"cannot change host functions, classes or modules "
                                f"(security policy {self.policy_name!r})")

    def builtins(self) -> dict:
        names = self

        def getattr(obj, name, *default):  # noqa: A001
            return _real_getattr(obj, names.name(name, "getattr"), *default)

        def hasattr(obj, name):  # noqa: A001
            return _real_hasattr(obj, names.name(name, "hasattr"))

        def setattr(obj, name, value):  # noqa: A001
            names.target(obj, "setattr")
            _real_setattr(obj, names.name(name, "setattr", write=True), value)

        def delattr(obj, name):  # noqa: A001
            names.target(obj, "delattr")
            _real_delattr(obj, names.name(name, "delattr", write=True))

        return {"getattr": getattr, "hasattr": hasattr, "setattr": setattr,
                "delattr": delattr}


def rebind(module: types.ModuleType, overrides: dict) -> dict:
    """The module's globals, copied, with ``overrides`` and every function of
    the module rebuilt over the copy (dicts of such functions are copied too:
    ``copy``'s dispatch tables)."""
    original = vars(module)
    new: dict = dict(original)
    new.update(overrides)
    rebuilt: dict[int, types.FunctionType] = {}

    def again(value: Any) -> Any:
        if isinstance(value, types.FunctionType) and value.__globals__ is original:
            fn = rebuilt.get(id(value))
            if fn is None:
                fn = types.FunctionType(value.__code__, new, value.__name__,
                                        value.__defaults__, value.__closure__)
                fn.__kwdefaults__ = value.__kwdefaults__
                fn.__qualname__ = value.__qualname__
                fn.__doc__ = value.__doc__
                fn.__dict__.update(value.__dict__)
                rebuilt[id(value)] = fn
            return fn
        return value

    for key, value in original.items():
        if key in overrides:
            continue
        if type(value) is dict and any(isinstance(v, types.FunctionType)
                                       and v.__globals__ is original
                                       for v in value.values()):
            new[key] = {k: again(v) for k, v in value.items()}
        else:
            new[key] = again(value)
    return new


def _check_dataclass(names: _LibraryNames, real: Any) -> Any:
    """``dataclasses._process_class`` that first checks what it will paste.

    dataclasses writes field names into the source of ``__init__``,
    ``__repr__``, ``__eq__``, ``__hash__``... and executes it with the
    globals of ``sys.modules[cls.__module__]``.  So the class must be the
    session's own (built by a cell's ``class`` statement, so its module is
    the session's: no other module's globals, no host class rewritten) and every field name it adds must be a plain
    identifier that is not a dunder, which makes the pasted text inert, as
    ``collections.namedtuple`` requires of its field names.
    """
    owned, policy_name = names.owned, names.policy_name

    def process(cls, *args, **kwargs):
        if not isinstance(cls, type) or not owns(owned, cls):
            raise SecurityError(f"dataclasses: {getattr(cls, '__qualname__', cls)!s} is "
                                f"not a class of this session; cells cannot rewrite "
                                f"host classes (security policy {policy_name!r})")
        annotations = vars(cls).get("__annotations__", {})
        for name in annotations:
            if type(name) is not str or not name.isidentifier() or keyword.iskeyword(name) \
                    or is_dunder(name):
                raise SecurityError(f"dataclasses: the field name {name!r} is refused: "
                                    f"field names are pasted into generated code and "
                                    f"must be plain identifiers (security policy "
                                    f"{policy_name!r})")
        names.accepted.append(cls)
        try:
            return real(cls, *args, **kwargs)
        finally:
            names.accepted.remove(cls)
    return process


def session_helpers(name: str, module: types.ModuleType, owned: Ownership,
                    policy_name: str) -> dict:
    """Replacements for the view of ``name`` (empty: the module needs none)."""
    if name not in LIBRARY_NAMES:
        return {}
    names = _LibraryNames(name, owned, policy_name)
    globals_ = rebind(module, names.builtins())
    if name == "dataclasses":
        globals_["_process_class"] = _check_dataclass(names, globals_["_process_class"])
    return {attr: value for attr, value in globals_.items()
            if isinstance(value, types.FunctionType) and value.__globals__ is globals_}
