"""The sanitized per-session builtins mapping.

A cell's code looks builtins up in ``user_ns['__builtins__']``; IPython puts
the shared ``builtins`` *module* there.  A guarded session gets its own
*dict* instead (the shared module is never mutated, so other sessions and
the host keep every builtin): denied names are absent, ``__import__`` is
the session's allowlist importer, and ``getattr``/``setattr``/``delattr``/
``hasattr`` apply the same attribute rules as the AST guard (private names
included: ``getattr(obj, '_x')`` is ``obj._x·``, see :mod:`.rules`).
"""

from __future__ import annotations

import builtins as _builtins_module
import sys
from typing import Any, Callable

from ..errors import SecurityError
from .rules import PRIVATE_SUFFIX, attribute_refusal, is_private, session_private_name

_real_getattr = _builtins_module.getattr
_real_setattr = _builtins_module.setattr
_real_delattr = _builtins_module.delattr
_real_hasattr = _builtins_module.hasattr


def make_attribute_functions(policy_name: str, spell_private: bool) -> dict:
    """``getattr``/``hasattr``/``setattr``/``delattr`` applying the attribute rules.

    With ``spell_private`` a private name is looked up under its session
    spelling, exactly as the AST guard spells ``obj._x``.
    """

    def checked(name: Any, verb: str) -> str:
        """The name to look up for ``name``: refused ones raise, private ones
        are spelled."""
        if type(name) is not str:
            raise TypeError(f"attribute name must be a str, not {type(name).__name__}")
        reason = attribute_refusal(name)
        if reason is not None:
            raise SecurityError(f"{verb}: {reason} (security policy {policy_name!r})")
        return session_private_name(name) if spell_private else name

    def getattr(obj: Any, name: str, *default: Any) -> Any:  # noqa: A001
        return _real_getattr(obj, checked(name, "getattr"), *default)

    def hasattr(obj: Any, name: str) -> bool:  # noqa: A001
        return _real_hasattr(obj, checked(name, "hasattr"))

    def written(name: Any, verb: str, action: str) -> str:
        spelled = checked(name, verb)
        if name.startswith("__"):
            raise SecurityError(f"{verb}: {action} the attribute {name!r} is refused "
                                f"(security policy {policy_name!r})")
        return spelled

    def setattr(obj: Any, name: str, value: Any) -> None:  # noqa: A001
        _real_setattr(obj, written(name, "setattr", "writing"), value)

    def delattr(obj: Any, name: str) -> None:  # noqa: A001
        _real_delattr(obj, written(name, "delattr", "deleting"))

    return {"getattr": getattr, "hasattr": hasattr, "setattr": setattr,
            "delattr": delattr}


def make_match_check(policy_name: str) -> Callable:
    """The check of a class a positional class pattern uses (``ast_guard``).

    The interpreter reads ``subject.<name>`` for each name in
    ``cls.__match_args__`` and asks ``type(cls).__instancecheck__`` whether
    the subject is an instance.  Both are the cell's to choose unless every
    metaclass between the class and ``type`` is a host class (what its
    module exports under its name: ``ABCMeta``, ``EnumType``); otherwise
    the class is refused.  Then every
    name must be one cell code could read as written (no refused dunder, no
    private name of a host object: a private name is accepted only in its
    session spelling, which a session class's own fields have).
    """
    from .gadgets import exported

    def check(cls: Any) -> Any:
        if not isinstance(cls, type):
            return cls  # the interpreter raises TypeError itself
        for meta in type(cls).__mro__:
            if meta is type:
                break
            if not exported(meta):
                raise SecurityError(
                    f"case {cls.__name__}(...) is refused: its metaclass "
                    f"{meta.__name__} is the session's own and decides what a "
                    f"positional class pattern reads (security policy {policy_name!r})")
        names = getattr(cls, "__match_args__", ())
        if type(names) is tuple:
            for name in names:
                if type(name) is not str:
                    continue  # the interpreter raises TypeError itself
                reason = attribute_refusal(name)
                if reason is None and is_private(name) and not name.endswith(PRIVATE_SUFFIX):
                    reason = (f"the private attribute {name!r} belongs to a host "
                              f"object's state")
                if reason is not None:
                    raise SecurityError(
                        f"case {cls.__name__}(...) is refused: its __match_args__ "
                        f"names {name!r}: {reason} (security policy {policy_name!r})")
        return cls

    return check


def make_help(policy_name: str) -> Callable:
    """``help(obj)`` for a session with an import allowlist.

    The site ``help`` looks names up (``help('os')`` imports the module) and
    may start a pager program; this one only renders what ``help(obj)``
    prints for an object the cell already holds: pydoc's plain text, written
    to the cell's stdout as the non-interactive pager would.
    """
    def help(obj: Any = _NO_ARGUMENT) -> None:  # noqa: A001
        if obj is _NO_ARGUMENT or isinstance(obj, str):
            raise SecurityError(
                f"help() takes the object to document here (help(len)): by name or "
                f"interactively it imports modules outside the allowed ones "
                f"(security policy {policy_name!r})")
        import pydoc

        # as pydoc.Helper.help writes it: the page, then a blank line
        sys.stdout.write(pydoc.plain(pydoc.render_doc(obj, "Help on %s:")) + "\n")
    return help


_NO_ARGUMENT = object()


def build_builtins(policy: Any, importer: Callable | None, owned: Any = None) -> dict:
    """The session's builtins dict for ``policy`` (a fresh dict every call).

    ``owned`` (a :class:`.gadgets.Ownership`) records the classes cells build.
    """
    from .ast_guard import MATCH_CHECK
    from .gadgets import make_build_class

    mapping = dict(vars(_builtins_module))
    for name in policy.denied_builtins:
        mapping.pop(name, None)
    if policy.block_dunder_access:
        mapping.update(make_attribute_functions(policy.name,
                                                policy.guard_private_attributes))
        mapping[MATCH_CHECK] = make_match_check(policy.name)
        if owned is not None:
            mapping["__build_class__"] = make_build_class(owned)
    if importer is not None:
        mapping["__import__"] = importer
        if "help" not in policy.denied_builtins:
            mapping["help"] = make_help(policy.name)
    return mapping
