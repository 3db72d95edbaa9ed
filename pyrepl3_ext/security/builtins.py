"""The sanitized per-session builtins mapping.

A cell's code looks builtins up in ``user_ns['__builtins__']``; IPython puts
the shared ``builtins`` *module* there.  A guarded session gets its own
*dict* instead (the shared module is never mutated, so other sessions and
the host keep every builtin): denied names are absent, ``__import__`` is
the session's allowlist importer, ``getattr``/``setattr``/``delattr``/
``hasattr`` apply the same attribute rules as the AST guard, and
``__build_class__`` records which classes cell code created (the only ones
whose ``_private`` attributes cell code may touch).
"""

from __future__ import annotations

import builtins as _builtins_module
from typing import Any, Callable

from ..errors import SecurityError
from .rules import attribute_refusal, is_private

#: The name under which the AST guard's rewrite finds the private-attribute
#: check (a dunder: cell code itself can never name it).
PRIVATE_CHECK_NAME = "__pyrepl3_private__"
#: The set of owned classes and the real ``type``, for the inline fast path
#: the AST guard emits for ``self._x`` in methods (dunders: unbindable).
OWNED_NAME = "__pyrepl3_owned__"
TYPE_NAME = "__pyrepl3_type__"

_real_getattr = _builtins_module.getattr
_real_setattr = _builtins_module.setattr
_real_delattr = _builtins_module.delattr
_real_hasattr = _builtins_module.hasattr
_real_build_class = _builtins_module.__build_class__


class PrivateGuard:
    """Which classes cell code created, and the ``_private`` attribute check.

    ``owned`` holds the classes defined by the session's cells whose whole
    MRO is cell-defined or builtin (``object``, ``Exception``, ``dict``...):
    only their instances (and themselves) expose ``_private`` attributes.
    It holds strong references (a set is what makes the hot-path test
    ``type(self) in owned`` cheap); classes live as long as the session.
    """

    def __init__(self, policy_name: str):
        self.policy_name = policy_name
        self.owned: set[type] = set()

    def build_class(self, func: Callable, name: str, *bases: Any, **kwargs: Any) -> Any:
        cls = _real_build_class(func, name, *bases, **kwargs)
        if isinstance(cls, type):
            owned = self.owned
            if all(k in owned or k.__module__ == "builtins" for k in cls.__mro__[1:]):
                owned.add(cls)
        return cls

    def check(self, obj: Any, name: str) -> Any:
        """``obj`` itself when cell code may touch ``obj.<name>``; raises otherwise."""
        owned = self.owned
        if type(obj) in owned or (isinstance(obj, type) and obj in owned):
            return obj
        raise SecurityError(
            f"access to the private attribute {name!r} of a "
            f"{type(obj).__name__!r} object is refused by security policy "
            f"{self.policy_name!r}: only classes defined in this session expose "
            f"their _private attributes")


def make_attribute_functions(policy_name: str, guard: PrivateGuard | None) -> dict:
    """``getattr``/``hasattr``/``setattr``/``delattr`` applying the attribute rules."""

    def refuse(name: Any, verb: str) -> None:
        if type(name) is not str:
            raise TypeError(f"attribute name must be a str, not {type(name).__name__}")
        reason = attribute_refusal(name)
        if reason is not None:
            raise SecurityError(f"{verb}: {reason} (security policy {policy_name!r})")

    def getattr(obj: Any, name: str, *default: Any) -> Any:  # noqa: A001
        refuse(name, "getattr")
        if guard is not None and is_private(name):
            guard.check(obj, name)
        return _real_getattr(obj, name, *default)

    def hasattr(obj: Any, name: str) -> bool:  # noqa: A001
        refuse(name, "hasattr")
        if guard is not None and is_private(name):
            guard.check(obj, name)
        return _real_hasattr(obj, name)

    def check_write(obj: Any, name: Any, verb: str, action: str) -> None:
        refuse(name, verb)
        if name.startswith("__"):
            raise SecurityError(f"{verb}: {action} the attribute {name!r} is refused "
                                f"(security policy {policy_name!r})")
        if guard is not None and is_private(name):
            guard.check(obj, name)

    def setattr(obj: Any, name: str, value: Any) -> None:  # noqa: A001
        check_write(obj, name, "setattr", "writing")
        _real_setattr(obj, name, value)

    def delattr(obj: Any, name: str) -> None:  # noqa: A001
        check_write(obj, name, "delattr", "deleting")
        _real_delattr(obj, name)

    return {"getattr": getattr, "hasattr": hasattr, "setattr": setattr,
            "delattr": delattr}


def build_builtins(policy: Any, importer: Callable | None,
                   guard: PrivateGuard | None) -> dict:
    """The session's builtins dict for ``policy`` (a fresh dict every call)."""
    mapping = dict(vars(_builtins_module))
    for name in policy.denied_builtins:
        mapping.pop(name, None)
    if policy.block_dunder_access:
        mapping.update(make_attribute_functions(policy.name, guard))
    if importer is not None:
        mapping["__import__"] = importer
    if guard is not None:
        mapping["__build_class__"] = guard.build_class
        mapping[PRIVATE_CHECK_NAME] = guard.check
        mapping[OWNED_NAME] = guard.owned
        mapping[TYPE_NAME] = type
    return mapping
