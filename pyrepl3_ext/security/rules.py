"""The attribute and name rules shared by the AST guard and the runtime guards.

One function decides whether an attribute name may be touched, so the static
check (``obj.name`` in source) and the dynamic ones (``getattr(obj, name)``)
can never disagree.
"""

from __future__ import annotations

#: ``__dunder__`` attributes cell code may read: names, docs, the type (the
#: same as ``type(x)``), the protocol methods ``super()`` calls reach, and
#: the numeric conversions a builtin or allowed module already calls for
#: any object (``round``, ``math.trunc/floor/ceil``, ``operator.index``,
#: ``complex``): reading them gives cell code nothing it did not have.
ALLOWED_DUNDER_ATTRS = frozenset({
    "__init__", "__name__", "__qualname__", "__doc__", "__class__", "__module__",
    "__repr__", "__str__", "__format__", "__eq__", "__ne__", "__lt__", "__le__",
    "__gt__", "__ge__", "__hash__", "__bool__", "__len__", "__iter__",
    "__next__", "__contains__", "__getitem__", "__setitem__", "__delitem__",
    "__enter__", "__exit__", "__aenter__", "__aexit__", "__call__",
    "__add__", "__sub__", "__mul__", "__truediv__", "__floordiv__", "__mod__",
    "__pow__", "__neg__", "__pos__", "__abs__", "__radd__", "__rmul__",
    "__post_init__", "__members__", "__version__", "__float__", "__int__",
    "__round__", "__trunc__", "__floor__", "__ceil__", "__index__", "__complex__",
})

#: ``__dunder__`` names cell code may use as plain names.
ALLOWED_DUNDER_NAMES = frozenset({"__name__", "__doc__"})

#: Frame, code, generator and traceback internals: each is a step of a
#: known walk from an ordinary object to a frame's globals or builtins.
INSPECT_ATTRS = frozenset({
    "f_back", "f_builtins", "f_code", "f_globals", "f_locals", "f_trace",
    "f_lasti", "f_lineno", "tb_frame", "tb_next", "tb_lasti", "tb_lineno",
    "gi_frame", "gi_code", "gi_yieldfrom", "gi_running", "gi_suspended",
    "cr_frame", "cr_code", "cr_await", "cr_origin", "cr_running", "cr_suspended",
    "ag_frame", "ag_code", "ag_await", "ag_running",
    "func_globals", "func_code", "im_func", "im_self",
})

#: Methods that hand out host objects a cell must not drive: asyncio's
#: ``Future.get_loop()`` is the host's event loop (it can start processes,
#: stop or close the loop, replace signal handlers).
HOST_OBJECT_ATTRS = frozenset({"get_loop"})

#: Attributes that interpret a string as an attribute path.
FORMAT_ATTRS = frozenset({"format", "format_map"})

#: The namedtuple API is underscore-prefixed by design (to avoid clashing
#: with field names); it is public.
PUBLIC_UNDERSCORE_ATTRS = frozenset({
    "_asdict", "_replace", "_fields", "_make", "_field_defaults",
    "_value_", "_name_", "_missing_", "_generate_next_value_", "_ignore_",
    "_order_",
})


#: What a session's ``_private`` names end with at run time (see
#: :func:`session_private_name`): a character host code never puts in an
#: attribute name, and one the compiler accepts in an identifier.
PRIVATE_SUFFIX = "\u00b7"


def is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def is_display_hook(name: str) -> bool:
    """IPython's display protocol (``_repr_html_``, ``_ipython_display_``...).

    IPython calls these on any object it displays, so they are public: a
    session class must be able to define them under their own names.
    """
    return name.endswith("_") and (name.startswith("_repr_") or name.startswith("_ipython_"))


def is_private(name: str) -> bool:
    """``_x`` or ``__x`` (not a dunder, not ``_`` alone, not a public protocol)."""
    return (name.startswith("_") and not is_dunder(name) and name != "_"
            and name not in PUBLIC_UNDERSCORE_ATTRS and not is_display_hook(name))


def session_private_name(name: str) -> str:
    """The run-time spelling of a name cell code wrote: ``_x`` -> ``_x·``.

    Under ``guard_private_attributes`` every private attribute name cell code
    writes (``obj._x``, class-body ``_x = ...``, ``getattr(obj, '_x')``) is
    spelled this way, so the session's private state lives under names no
    host object has: ``asyncio.Queue()._loop`` from a cell reads ``_loop·``,
    which does not exist.  Any other name comes back as it is.  Idempotent,
    so a name already spelled this way (copied from ``dir()``, forwarded by
    a proxy) is the same name.
    """
    if not is_private(name) or name.endswith(PRIVATE_SUFFIX):
        return name
    return name + PRIVATE_SUFFIX


def attribute_refusal(name: str) -> str | None:
    """Why reading ``obj.<name>`` is refused, or None when it is not."""
    if is_dunder(name):
        if name in ALLOWED_DUNDER_ATTRS:
            return None
        return (f"access to the attribute {name!r} is refused: dunder attributes "
                f"reach interpreter internals (globals, builtins, subclasses, "
                f"code objects)")
    if name in INSPECT_ATTRS or name.startswith("co_"):
        return (f"access to the attribute {name!r} is refused: frame, code, "
                f"generator and traceback internals lead to other frames' globals")
    if name in HOST_OBJECT_ATTRS:
        return (f"the attribute {name!r} is refused: it hands out the host's event "
                f"loop")
    if name in FORMAT_ATTRS:
        return (f"the attribute {name!r} is refused: str.format resolves "
                f"attribute paths written in the template; use an f-string")
    return None


def explain_private_miss(error: BaseException, policy_name: str) -> None:
    """Word an ``AttributeError`` on a spelled name as the cell wrote it.

    ``asyncio.gather()._loop`` fails with "... has no attribute '_loop·'";
    this makes it "... has no attribute '_loop' (security policy ...: ...)",
    in place, for the traceback and the ``error`` event alike.  The
    exception and its chain are left as they are otherwise.
    """
    seen = 0
    while error is not None and seen < 8:  # a chain is short; the bound stops a cycle
        name = getattr(error, "name", None) if isinstance(error, AttributeError) else None
        if isinstance(name, str) and name.endswith(PRIVATE_SUFFIX) \
                and len(error.args) == 1 and isinstance(error.args[0], str) \
                and repr(name) in error.args[0]:
            plain = name[:-len(PRIVATE_SUFFIX)]
            error.args = (error.args[0].replace(repr(name), repr(plain))
                          + f" (security policy {policy_name!r}: a cell reaches only "
                            f"the _private attributes that cell code set)",)
            error.name = plain
        error = error.__cause__ or error.__context__
        seen += 1
