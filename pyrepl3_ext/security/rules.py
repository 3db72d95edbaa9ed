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


def is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def is_private(name: str) -> bool:
    """``_x`` or ``__x`` (not a dunder, not ``_`` alone, not the namedtuple API)."""
    return (name.startswith("_") and not is_dunder(name) and name != "_"
            and name not in PUBLIC_UNDERSCORE_ATTRS)


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

