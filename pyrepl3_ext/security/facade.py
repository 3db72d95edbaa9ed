"""Opaque objects for cell code: capability facades and the magics gate.

A facade is the only thing of a capability that cell code holds.  It is an
instance of a class made for it, with no instance state (``__slots__ = ()``)
and no attribute that leads back to the host:

* every function on the class is rebuilt with an empty globals dict
  (``{'__builtins__': {}}``): ``cap.read.__globals__`` holds nothing;
* the methods are *sealed* (:mod:`.sealed`): no closure; the dispatch
  function that leads to the grant is a keyword-only default, and reading
  it (``__kwdefaults__``, ``__code__``) raises an audit event the hook
  refuses whenever a session's rules apply, whoever reads it;
* ``type(cap)(...)`` and subclassing raise ``TypeError``; pickling and
  copying raise; attributes cannot be set.

The remaining closures (refusals, constants) hold only exception types and
strings.  Under ``trusted`` nothing is opaque (cell code could import the
host's modules anyway).
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Iterable

from .sealed import seal


def _inert(fn: Callable) -> types.FunctionType:
    """``fn`` rebuilt with globals that hold nothing (closures kept)."""
    code = fn.__code__
    for name in code.co_names:
        # every free name must come from the closure; co_names may only hold
        # attribute names, which we list explicitly to keep this honest
        if name not in _ATTRIBUTE_NAMES:
            raise RuntimeError(f"facade function {fn.__name__} uses the global {name!r}")
    return types.FunctionType(code, {"__builtins__": {}}, fn.__name__,
                              fn.__defaults__, fn.__closure__)


_ATTRIBUTE_NAMES = frozenset()


def _call(self, *args, _dispatch=None, _method="", **kwargs):
    return _dispatch(_method, args, kwargs)


_ANY = inspect.Signature([
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
    inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
    inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


def _method(dispatch: Callable, method: str, signature: Any = None) -> Callable:
    """A sealed method: the dispatch function is out of cell code's reach.

    ``signature`` (without ``self``) is what ``inspect.signature`` and
    ``help()`` show.
    """
    if signature is None:
        full = _ANY
    else:
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        full = signature.replace(parameters=[self_param, *signature.parameters.values()])
    return seal(_call, method, full, _dispatch=dispatch, _method=method)


def _refusing(exc_type: type, message: str, name: str) -> Callable:
    def refuse(*args, **kwargs):
        raise exc_type(message)
    refuse.__name__ = name
    return _inert(refuse)


def _constant(value: Any, name: str) -> Callable:
    def constant(self, *args):
        return value
    constant.__name__ = name
    return _inert(constant)


def make_facade(kind: str, label: str, methods: Iterable[str],
                dispatch: Callable[[str, tuple, dict], Any],
                callable_: bool = False, signatures: dict | None = None) -> Any:
    """A new opaque object whose ``methods`` call ``dispatch(method, args, kwargs)``.

    ``signatures`` maps a method (or ``__call__``) to the signature its
    callers see, without ``self``.
    """
    signatures = signatures or {}
    methods = tuple(methods)
    forge = (f"{kind} objects are granted by the host; they cannot be created "
             f"or subclassed from a cell")
    ns: dict = {"__slots__": (), "__module__": "pyrepl3.capabilities",
                "__doc__": f"The {label!r} {kind} (opaque; methods: "
                           f"{', '.join(methods) or 'call it'})."}
    for method in methods:
        ns[method] = _method(dispatch, method, signatures.get(method))
    if callable_:
        ns["__call__"] = _method(dispatch, "__call__", signatures.get("__call__"))
    ns["__new__"] = _refusing(TypeError, forge, "__new__")
    ns["__init_subclass__"] = classmethod(_refusing(TypeError, forge, "__init_subclass__"))
    read_only = f"{kind} objects are read-only"
    ns["__setattr__"] = _refusing(AttributeError, read_only, "__setattr__")
    ns["__delattr__"] = _refusing(AttributeError, read_only, "__delattr__")
    no_copy = f"{kind} objects cannot be pickled or copied"
    for name in ("__reduce__", "__reduce_ex__", "__copy__", "__deepcopy__",
                 "__getstate__"):
        ns[name] = _refusing(TypeError, no_copy, name)
    ns["__repr__"] = _constant(f"<{kind} {label!r}>", "__repr__")
    ns["__dir__"] = _constant(sorted(methods), "__dir__")
    cls = type(f"{label}_{kind}".replace(" ", "_").replace(".", "_"), (), ns)
    return object.__new__(cls)
