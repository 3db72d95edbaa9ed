"""Sealed functions: host references cell code cannot follow.

A facade method has to reach its grant, and the audited ``fork_exec`` has to
reach the real one.  A closure would do, but ``__closure__`` raises no audit
event, so any helper that reads an attribute by name could follow it.  A
sealed function keeps those references as keyword-only defaults instead, in
a function with no closure and empty globals.  Reading them
(``__kwdefaults__``, ``__defaults__``) raises ``object.__getattr__``, and
the audit hook refuses that event for a sealed function whenever a
session's rules apply (a cell running, or cell code anywhere on the
stack), whoever the reader is (:func:`is_sealed`).  The code object is a
generic template with no host object in it (``inspect`` reads it), and a
frame of a running sealed function is reachable only through frame
attributes, which the audit hook refuses to cell code.  ``signature``
gives ``inspect.signature`` (``help()``) an answer that does not need the
defaults.

Invariant: a sealed function has no closure, its globals hold nothing but
an empty ``__builtins__``, and its only references to host objects are its
keyword-only defaults.
"""

from __future__ import annotations

import types
import weakref
from typing import Any, Callable

_sealed: "weakref.WeakSet[types.FunctionType]" = weakref.WeakSet()


def seal(fn: Callable, name: str | None = None, signature: Any = None,
         **kwdefaults) -> types.FunctionType:
    """``fn`` rebuilt with empty globals and ``kwdefaults``, registered as sealed.

    ``fn`` must reach everything it uses through its parameters' defaults
    (checked: no closure, no global names).
    """
    from .audit import trusted  # the host's own new function, not a cell's change

    code = fn.__code__
    if fn.__closure__ or code.co_names and not set(code.co_names) <= _ATTRIBUTES:
        raise RuntimeError(f"a sealed function may use only its defaults: "
                           f"{fn.__name__} uses {code.co_names or code.co_freevars}")
    sealed = types.FunctionType(code, {"__builtins__": {}}, name or fn.__name__,
                                fn.__defaults__, None)
    with trusted():
        sealed.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **kwdefaults}
    if signature is not None:
        sealed.__signature__ = signature
    _sealed.add(sealed)
    return sealed


#: attribute names a sealed function's code may use (method calls on its
#: own defaults): ``co_names`` lists attribute names and globals alike
_ATTRIBUTES = frozenset()


def is_sealed(obj: object) -> bool:
    try:
        return obj in _sealed
    except TypeError:  # unhashable: not a function
        return False
