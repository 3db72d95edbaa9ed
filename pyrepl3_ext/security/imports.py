"""Import allowlist: ``import x`` hands out views of allowed modules.

Stdlib modules leak ``sys``, ``os`` and ``builtins`` through public
attributes (``json.codecs.sys``, ``statistics.sys``, ``re.enum.bltns``...),
and a real module object shared with the host can be poisoned
(``json.codecs.sys.modules['math'] = os``).  So cell code never receives a
real module: it gets a view, a fresh (exact) module object holding only
the listed attributes (submodules are never copied; an allowed submodule
is itself a view).  Writing a view's attribute changes only that session's
copy, never the real module (see :func:`_new_view`).  Views are cached per
session, so ``import json`` is the same object twice.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from typing import Any, Mapping

from ..errors import SecurityError
from . import audit, gadgets

#: Modules a ``restricted`` session may import.  ``None``: the module's
#: public API (``__all__`` or its public names), minus submodules and minus
#: :data:`GADGETS`.  A frozenset lists the exact names.
DEFAULT_ALLOWED_MODULES: Mapping[str, Any] = types.MappingProxyType({
    "math": None, "cmath": None, "json": frozenset({
        "dumps", "loads", "JSONDecodeError", "JSONEncoder", "JSONDecoder"}),
    "re": None, "datetime": None, "statistics": None, "random": None,
    "collections": None, "collections.abc": None, "itertools": None,
    "functools": None, "operator": None, "dataclasses": None, "typing": None,
    "enum": None, "fractions": None, "decimal": None, "string": None,
    "textwrap": None, "copy": None, "heapq": None, "bisect": None,
    "numbers": None, "pprint": frozenset({"pprint", "pformat", "PrettyPrinter"}),
    "time": frozenset({"time", "time_ns", "perf_counter", "perf_counter_ns",
                       "monotonic", "monotonic_ns", "sleep", "strftime",
                       "gmtime", "localtime", "mktime", "struct_time"}),
    "asyncio": frozenset({"sleep", "gather", "wait_for", "create_task", "Queue",
                          "Event", "Lock", "Semaphore", "TimeoutError",
                          "CancelledError", "wait", "as_completed",
                          "iscoroutine", "shield"}),
    "base64": None, "hashlib": frozenset({"sha256", "sha1", "md5", "sha512",
                                         "blake2b", "new"}),
    "uuid": frozenset({"uuid4", "uuid5", "uuid3", "UUID", "NAMESPACE_DNS",
                       "NAMESPACE_URL"}),
    "contextlib": frozenset({"contextmanager", "suppress", "nullcontext",
                             "asynccontextmanager", "closing", "ExitStack"}),
    "array": None, "struct": None, "zlib": None, "unicodedata": None,
    "difflib": None,
    # the everyday part of these (docs/security.md, "The allowlist"): not
    # warnings' filters or catch_warnings (process-wide state; recorded
    # warnings carry the host's objects), not csv's dialect registry and
    # field_size_limit (process-wide), not io's files
    "warnings": frozenset({"warn"}),
    "io": frozenset({"StringIO", "BytesIO"}),
    "csv": frozenset({"reader", "writer", "DictReader", "DictWriter", "Error",
                      "Dialect", "excel", "excel_tab", "unix_dialect", "Sniffer",
                      "QUOTE_ALL", "QUOTE_MINIMAL", "QUOTE_NONE", "QUOTE_NONNUMERIC"}),
})

#: Attributes never exposed, even when a module's API is exposed whole:
#: each evaluates strings as code, resolves attribute paths given as data,
#: or walks frames.
GADGETS = frozenset({
    ("typing", "get_type_hints"), ("typing", "ForwardRef"),
    ("operator", "attrgetter"), ("operator", "methodcaller"),
    ("string", "Formatter"), ("functools", "singledispatch"),
    ("functools", "singledispatchmethod"), ("dataclasses", "make_dataclass"),
    ("enum", "global_enum"), ("enum", "global_enum_repr"),
    ("enum", "global_str"), ("enum", "global_flag_repr"),
})


def _new_view(name: str, doc: Any = None) -> types.ModuleType:
    """A fresh *exact* module object: the session's own copy, never the real module.

    Exact, not a subclass: CPython's ``LOAD_ATTR`` specialises attribute
    reads on exact modules only (a ``ModuleType`` subclass cost ``math.sqrt``
    in a loop 12-17 ns per access).  So a view is writable, but a write by a
    cell only changes that session's copy: the view's functions keep the
    real module's globals, the view is not in ``sys.modules`` and no other
    session or host code ever sees it (``tests/security/test_layers.py``).
    Dunder attributes (``__dict__``, ``__class__``, ``__getattr__``) cannot be
    written from cells under ``block_dunder_access``.
    """
    return types.ModuleType(name, doc)


def _public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return [n for n in names if isinstance(n, str) and not n.startswith("_")]


class Importer:
    """The ``__import__`` of one session: allowlist in, module views out."""

    def __init__(self, allowed: Mapping[str, Any], policy_name: str,
                 owned: "gadgets.Ownership | None" = None):
        self._allowed = dict(allowed)
        self.policy_name = policy_name
        #: what the session's cells made (:func:`gadgets.owns`)
        self._owned = owned if owned is not None else gadgets.Ownership({})
        self._views: dict[str, types.ModuleType] = {}
        self._lock = threading.RLock()

    def refusal(self, name: str) -> str:
        allowed = ", ".join(sorted(self._allowed)) or "none"
        return (f"import of {name!r} is refused: it is not in the allowed modules "
                f"(allowed: {allowed})")

    def _error(self, message: str) -> SecurityError:
        return SecurityError(f"refused by security policy {self.policy_name!r}: {message}")

    def is_view(self, obj: Any) -> bool:
        """Whether ``obj`` is one of this session's module views."""
        return any(obj is v for v in self._views.values())

    def is_allowed(self, name: str) -> bool:
        return name in self._allowed

    def view(self, name: str) -> types.ModuleType:
        """The session's view of allowed module ``name``."""
        with self._lock:
            view = self._views.get(name)
            if view is not None:
                return view
            if name not in self._allowed:
                raise self._error(self.refusal(name))
            module = importlib.import_module(name)
            listed = self._allowed[name]
            names = _public_names(module) if listed is None else sorted(listed)
            view = _new_view(name, getattr(module, "__doc__", None))
            content = vars(view)
            # helpers that take attribute names as data: rebound (gadgets.py)
            with audit.trusted():  # new functions of the host's, made for the view
                safer = gadgets.session_helpers(name, module, self._owned,
                                                self.policy_name)
            for attr in names:
                if (name, attr) in GADGETS:
                    continue
                try:
                    value = getattr(module, attr)
                except AttributeError:
                    continue
                if isinstance(value, types.ModuleType):
                    sub = f"{name}.{attr}"
                    if sub in self._allowed and value is sys.modules.get(sub):
                        value = self.view(sub)
                    else:
                        continue  # submodules are where sys/os/builtins leak
                content[attr] = safer.get(attr, value)
            # allowed submodules are reachable as attributes of their parent view
            prefix = name + "."
            for other in self._allowed:
                if other.startswith(prefix) and "." not in other[len(prefix):]:
                    content[other[len(prefix):]] = self.view(other)
            self._views[name] = view
            return view

    def __call__(self, name: str, globals: Any = None, locals: Any = None,
                 fromlist: Any = (), level: int = 0) -> types.ModuleType:
        if level:
            raise self._error("relative imports are refused: cells are not part "
                              "of a package")
        if type(name) is not str:
            raise self._error("import of a non-str module name is refused")
        if fromlist:
            for item in fromlist:
                if item == "*":
                    raise self._error(f"'from {name} import *' is refused: it can "
                                      f"rebind any name; import the names you need")
            return self.view(name)
        if name not in self._allowed:
            raise self._error(self.refusal(name))
        head = name.partition(".")[0]
        if head in self._allowed:
            return self.view(head)
        # ``import a.b`` with only ``a.b`` allowed: a view of ``a`` holding ``b``
        view = self.view(name)
        top = _new_view(head)
        node = top
        parts = name.split(".")
        for i, part in enumerate(parts[1:], 1):
            dotted = ".".join(parts[:i + 1])
            child = view if dotted == name else _new_view(dotted)
            vars(node)[part] = child
            node = child
        return top
