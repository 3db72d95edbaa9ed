"""Per-shell state of the extension: load/unload, the cell hooks, components.

The extension module is shared by every shell in the process, so nothing
here is module-global except the ``shell -> ShellState`` map.  A
``ShellState`` owns everything the extension adds to one shell (event
callbacks, the input transformer, magics, the ``PyREPL3`` configurable and
the capability components) and removes exactly that on unload.

Capabilities plug in as *components* (see :class:`Component`): objects with
``attach``/``before_cell``/``after_cell``/``detach``.  Each capability module
exposes one; ``COMPONENTS`` lists them in order.  ``before_cell`` runs in
list order after ``started`` is emitted, ``after_cell`` in reverse order
before the ``result``/``error`` event, so a component can still emit the
execution's last output events there.
"""

from __future__ import annotations

import contextvars
import importlib
import itertools
import linecache
import os
import re
import sys
import threading
import time
import traceback
import types
import weakref
from typing import Any, Callable, Iterator, Mapping

from IPython.core.error import InputRejected

from . import _compat
from .config import PyREPL3
from .errors import CellCancelled, CellError, SecurityError, SessionLost
from .events import EventBus, Execution, JSONLinesSink

#: ``(attribute name on ShellState, "module:Class")`` of each capability
#: component, created on load in this order.  A module that cannot be
#: imported on this Python/IPython is reported, not fatal.
COMPONENTS: list[tuple[str, str]] = [
    ("cancellation", "pyrepl3_ext.cancellation.manager:CancellationManager"),
    ("namespace", "pyrepl3_ext.namespace:NamespaceManager"),
    ("io_capture", "pyrepl3_ext.io_capture:OutputCapture"),
    ("input_request", "pyrepl3_ext.input_request:InputRequests"),
    ("security", "pyrepl3_ext.security.component:SecurityComponent"),
]

_states: "weakref.WeakKeyDictionary[Any, ShellState]" = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()

#: Options for the next cell run through :func:`run_cell` in this context.
#: A one-element list so ``pre_run_cell`` can consume it (a nested
#: ``run_cell`` from inside the cell must not reuse the host's id).
_pending_options: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "pyrepl3_pending_options", default=None)

_MAGIC_DIRECTIVES = ("%%timeout", "%%transaction")
#: ``Execution.options`` of a cell that has none (shared: never mutated)
_NO_OPTIONS: "types.MappingProxyType[str, Any]" = types.MappingProxyType({})
_DIRECTIVE_RE = re.compile(r"\s*%%(?:timeout|transaction)\b")
#: appended to a directive's text in the marker statement left on its line
_DIRECTIVE_MARK = "  [pyrepl3 directive]"


class DirectiveNotApplied(InputRejected):
    """A silent cell opened with a directive: IPython runs no ``pre_run_cell``
    for it, so the directive could not apply and the cell was not run."""

    def _render_traceback_(self) -> list[str]:
        # IPython's hook: the message alone, no frame of ours
        return [f"{type(self).__name__}: {self}"]


class _DirectiveCheck:
    """In ``shell.ast_transformers`` (IPython calls ``visit(tree)``) once a
    cell used a directive: removes the marker statements the input
    transformer left, and refuses the cell when its directive cannot apply.

    IPython fires no ``pre_run_cell`` for a silent cell, so its options are
    never read: running it would ignore a ``%%timeout`` without a word.
    Only the first statements are looked at (no tree walk).
    """

    def __init__(self, state: "ShellState"):
        self._state = weakref.ref(state)

    def visit(self, tree: Any) -> Any:
        import ast

        body = getattr(tree, "body", None)
        if not body:
            return tree
        marks = 0
        for node in body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, str) \
                    and node.value.value.endswith(_DIRECTIVE_MARK) \
                    and _DIRECTIVE_RE.match(node.value.value) and node.lineno == marks + 1:
                marks += 1
            else:
                break
        if not marks:
            return tree
        state = self._state()
        execution = state.current_execution() if state is not None else None
        if execution is None or not execution.__dict__.pop("directives_pending", False):
            raise DirectiveNotApplied(
                "%%timeout and %%transaction do not apply to a silent cell (IPython runs "
                "no pre_run_cell hook for it): run it without silent=True, or pass "
                "timeout=/transaction= to pyrepl3_ext.run_cell")
        del body[:marks]
        return tree


class Component:
    """Base of capability components; every hook is optional.

    Per-cell cost: only the hooks a subclass overrides are called, and not
    even those while the component says it has nothing to do:

    * ``idle`` (a plain attribute the component keeps up to date, never a
      property: reading it must not run code): while True, ``before_cell``
      is skipped unless the cell's options name one of ``triggers``;
    * ``needs_listener``: ``before_cell`` is skipped while nobody listens to
      the session's events (no subscriber, no event log);
    * ``after_cell`` runs for an execution when ``before_cell`` ran for it,
      or when the component is neither ``idle`` nor ``needs_listener`` as
      the cell ends.

    So a component whose ``after_cell`` has work that ``before_cell`` did not
    start (a request made while the cell ran) clears ``idle`` when that work
    appears.
    """

    name = "component"
    idle = False
    needs_listener = False
    #: per-cell option names (``execution.options``) that wake an idle component
    triggers: tuple[str, ...] = ()

    def __init__(self, state: "ShellState"):
        self.state = state

    def set_idle(self, idle: bool) -> None:
        """Change ``idle``; the shell's per-cell hook lists follow (from the next cell)."""
        if self.idle != idle:
            self.idle = idle
            self.state._bind_hooks()

    def attach(self) -> None:
        """Install what the capability adds to the shell."""

    def before_cell(self, execution: Execution) -> None:
        """Called after ``started`` was emitted, before the cell's code runs."""

    def after_cell(self, execution: Execution, result: Any) -> None:
        """Called after the cell ran, before its ``result``/``error`` event."""

    def detach(self) -> None:
        """Remove everything ``attach`` installed."""


_ABSENT = object()


class InstancePatches:
    """Wrappers a component sets on instances (a shell's methods), undone on unload.

    Undoing puts back what the instance itself held before (a host's own
    replacement, another extension's wrapper) rather than deleting it, and
    leaves alone an attribute someone replaced after us.
    """

    def __init__(self) -> None:
        self._applied: list[tuple[Any, str, Any, Any]] = []

    def wrap(self, obj: Any, name: str, make: Callable[[Any], Any]) -> None:
        """Set ``obj.name = make(original)`` (nothing if ``obj`` has no ``name``)."""
        original = getattr(obj, name, None)
        if original is None:
            return
        wrapper = make(original)
        wrapper.pyrepl3_original = original
        previous = obj.__dict__.get(name, _ABSENT)
        setattr(obj, name, wrapper)
        self._applied.append((obj, name, wrapper, previous))

    def undo(self) -> None:
        for obj, name, wrapper, previous in reversed(self._applied):
            if obj.__dict__.get(name) is wrapper:
                if previous is _ABSENT:
                    del obj.__dict__[name]
                else:
                    obj.__dict__[name] = previous
        self._applied.clear()


def get_state(shell: Any) -> "ShellState | None":
    """The extension's state for ``shell``, or None when it is not loaded there."""
    return _states.get(shell)


def require_state(shell: Any) -> "ShellState":
    state = _states.get(shell)
    if state is None:
        raise RuntimeError(
            "pyrepl3_ext is not loaded in this shell: run %load_ext pyrepl3_ext "
            "or pyrepl3_ext.load_ipython_extension(shell) first")
    return state


def load(shell: Any) -> "ShellState":
    with _states_lock:
        state = _states.get(shell)
        if state is None:
            state = ShellState(shell)
            _states[shell] = state
        else:
            return state
    try:
        state.attach()
    except BaseException:
        state.detach()
        with _states_lock:
            _states.pop(shell, None)
        raise
    return state


def unload(shell: Any) -> bool:
    with _states_lock:
        state = _states.pop(shell, None)
    if state is None:
        return False
    state.detach()
    return True


def parse_directives(raw_cell: str) -> tuple[dict, int]:
    """Read leading ``%%timeout SECONDS`` / ``%%transaction`` lines of a cell.

    Returns ``(options, number_of_directive_lines)``.  A malformed directive
    raises ``ValueError`` with a message for the user.
    """
    options: dict = {}
    consumed = 0
    for line in raw_cell.splitlines():
        stripped = line.strip()
        if not stripped.startswith(_MAGIC_DIRECTIVES):
            break
        name, _, arg = stripped[2:].partition(" ")
        arg = arg.strip()
        if name == "timeout":
            try:
                seconds = float(arg)
            except ValueError:
                raise ValueError(
                    f"%%timeout expects a number of seconds, got {arg!r}") from None
            if not seconds > 0:
                raise ValueError(f"%%timeout must be > 0 seconds, got {arg!r}")
            options["timeout"] = seconds
        elif name == "transaction":
            if arg:
                raise ValueError(f"%%transaction takes no argument, got {arg!r}")
            options["transaction"] = True
        else:
            break  # e.g. %%timeit: a real cell magic, not ours
        consumed += 1
    return options, consumed


class ShellState:
    """Everything pyrepl3 keeps for one shell."""

    def __init__(self, shell: Any):
        self._shell_ref = weakref.ref(shell)
        self.config: PyREPL3 | None = None
        self.session_id = ""
        self.bus = EventBus(self.report_internal_error)
        self.components: list[Component] = []
        # the per-cell hooks, sorted by when they run (_bind_hooks)
        self._hooks_lock = threading.RLock()
        self._before_always: tuple = ()
        self._before_listened: tuple = ()
        self._before_triggered: tuple = ()
        self._after_always: tuple = ()
        self._after_hooks: tuple = ()
        self.internal_errors: list[tuple[str, BaseException]] = []
        self.last_execution: Execution | None = None
        self._reported: set[str] = set()
        self._local = threading.local()
        self._ids = itertools.count(1)
        self._id_prefix = ""
        self._sink: JSONLinesSink | None = None
        self._sink_unsubscribe = None
        self._magics = None
        self._saved_magics: dict[tuple[str, str], Any] = {}
        self._attached_events: list[tuple[str, Any]] = []
        self._transformer_installed = False
        self._directive_check: "_DirectiveCheck | None" = None
        self._patches = InstancePatches()

    @property
    def shell(self) -> Any:
        shell = self._shell_ref()
        if shell is None:
            raise RuntimeError("the shell of this pyrepl3 state was garbage-collected")
        return shell

    # -- reporting ---------------------------------------------------------
    def report_internal_error(self, where: str, exc: BaseException) -> None:
        """Report a failure of the extension's own code once per place.

        The user's cell is never affected; the report goes to the real
        stderr so it is not captured into a cell's output.
        """
        self.internal_errors.append((where, exc))
        if where in self._reported:
            return
        self._reported.add(where)
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        print(f"[pyrepl3_ext] internal error in {where}: {detail}\n"
              f"[pyrepl3_ext] the cell was not affected; further errors from "
              f"{where} are not shown", file=sys.__stderr__)

    # -- load / unload -----------------------------------------------------
    def attach(self) -> None:
        shell = self.shell
        self.config = PyREPL3(parent=shell)
        shell.configurables.append(self.config)
        self.session_id = self.config.session_id or os.urandom(6).hex()
        self._id_prefix = f"{self.session_id}-{os.urandom(3).hex()}-"
        self.config.observe(self._on_event_log_change, names="event_log")
        self._open_event_log(self.config.event_log)

        shell.input_transformers_cleanup.insert(0, self._strip_directives)
        self._transformer_installed = True
        for event, callback in (("pre_run_cell", self._pre_run_cell),
                                ("post_run_cell", self._post_run_cell)):
            shell.events.register(event, callback)
            self._attached_events.append((event, callback))

        from . import trailing_semicolon
        from .magics import PyREPL3Magics

        trailing_semicolon.install(shell, self._patches)

        self._magics = PyREPL3Magics(shell=shell, state=self)
        for kind, names in self._magics.magics.items():
            for name in names:
                existing = shell.magics_manager.magics[kind].get(name)
                if existing is not None:
                    self._saved_magics[(kind, name)] = existing
        shell.register_magics(self._magics)

        for attr, spec in COMPONENTS:
            module_name, _, class_name = spec.partition(":")
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except ImportError as exc:
                self.report_internal_error(f"loading component {attr}", exc)
                continue
            self.add_component(cls(self))
            setattr(self, attr, self.components[-1])

    def add_component(self, component: Component) -> None:
        """Attach ``component`` and run its cell hooks from the next cell on."""
        component.attach()
        self.components.append(component)
        self._bind_hooks()

    def remove_component(self, component: Component) -> None:
        """Detach ``component`` (added by :meth:`add_component`)."""
        self.components.remove(component)
        self._bind_hooks()
        component.detach()

    def _bind_hooks(self) -> None:
        """Sort the per-cell hooks by when they run (``Component``'s invariant).

        Only hooks a component overrides are listed.  Runs when components
        come and go and when one changes ``idle``; cells read each list once
        (tuples, replaced whole), so a change made while a cell runs applies
        from the next cell, and ``_post_run_cell`` sees that it happened.
        """
        with self._hooks_lock:
            before = [(f"{c.name}.before_cell", c, c.before_cell) for c in self.components
                      if type(c).before_cell is not Component.before_cell]
            after = tuple((f"{c.name}.after_cell", c, c.after_cell)
                          for c in reversed(self.components)
                          if type(c).after_cell is not Component.after_cell)
            self._before_listened = tuple(h for h in before
                                          if not h[1].idle and h[1].needs_listener)
            self._before_triggered = tuple(h for h in before if h[1].idle and h[1].triggers)
            self._after_hooks = after
            self._after_always = tuple(h for h in after
                                       if not h[1].idle and not h[1].needs_listener)
            # assigned last: a cell that sees this tuple sees the others too
            self._before_always = tuple(h for h in before
                                        if not h[1].idle and not h[1].needs_listener)

    def detach(self) -> None:
        shell = self._shell_ref()
        for component in reversed(self.components):
            try:
                component.detach()
            except Exception as exc:  # noqa: BLE001 - unload must finish
                self.report_internal_error(f"{component.name}.detach", exc)
        self.components.clear()
        self._bind_hooks()
        if shell is None:
            return
        for event, callback in self._attached_events:
            try:
                shell.events.unregister(event, callback)
            except ValueError:
                pass
        self._attached_events.clear()
        self._patches.undo()
        if self._transformer_installed:
            try:
                shell.input_transformers_cleanup.remove(self._strip_directives)
            except ValueError:
                pass
            self._transformer_installed = False
        if self._directive_check is not None:
            try:
                shell.ast_transformers.remove(self._directive_check)
            except ValueError:
                pass
            self._directive_check = None
        if self._magics is not None:
            manager = shell.magics_manager
            for kind, names in self._magics.magics.items():
                for name in names:
                    saved = self._saved_magics.get((kind, name))
                    if saved is not None:
                        manager.magics[kind][name] = saved
                    else:
                        manager.magics[kind].pop(name, None)
            if manager.registry.get(type(self._magics).__name__) is self._magics:
                del manager.registry[type(self._magics).__name__]
            # Magics.__init__ lists every Magics instance in shell.configurables
            shell.configurables[:] = [c for c in shell.configurables
                                      if c is not self._magics]
            self._magics = None
        if self.config is not None:
            self.config.unobserve(self._on_event_log_change, names="event_log")
            try:
                shell.configurables.remove(self.config)
            except ValueError:
                pass
        self._close_event_log()

    # -- event log ---------------------------------------------------------
    def _open_event_log(self, target: str) -> None:
        self._close_event_log()
        if not target:
            return
        self._sink = JSONLinesSink(target)
        self._sink_unsubscribe = self.bus.subscribe(self._sink)

    def _close_event_log(self) -> None:
        if self._sink_unsubscribe is not None:
            self._sink_unsubscribe()
            self._sink_unsubscribe = None
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _on_event_log_change(self, change: dict) -> None:
        self._open_event_log(change["new"])

    # -- executions --------------------------------------------------------
    def _stack(self) -> list[Execution]:
        try:
            return self._local.stack
        except AttributeError:
            stack = self._local.stack = []
            return stack

    def current_execution(self) -> Execution | None:
        """The innermost execution running in this thread, if any."""
        stack = self._stack()
        return stack[-1] if stack else None

    def rename(self, session_id: str) -> None:
        """Give the session a new id (a session process forked from a warm
        template takes the id of the session it becomes)."""
        self.session_id = session_id
        self.config.session_id = session_id
        self._id_prefix = f"{session_id}-{os.urandom(3).hex()}-"

    def new_execution_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def _strip_directives(self, lines: list[str]) -> list[str]:
        # runs on every cell: a substring test first, the regex only on a hit
        if not lines or "%%" not in lines[0] or not _DIRECTIVE_RE.match(lines[0]):
            return lines
        try:
            _, consumed = parse_directives("".join(lines))
        except ValueError:
            return lines  # left in place: the magic itself reports the error
        body = lines[consumed:]
        if all(not line.strip() for line in body):
            # Nothing after the directives (yet): left in place, so IPython's
            # completeness check sees a cell magic ("incomplete" until a blank
            # line) instead of an empty list it cannot index, and running it
            # runs the magic on an empty body.
            return lines
        if body[0].lstrip().startswith("%%"):
            return body  # a cell magic must open the cell; its body is not Python
        # Each directive line becomes a marker statement on the same line, so
        # line numbers in tracebacks are those the user typed, and the AST
        # check can tell a directive that pre_run_cell never saw (a silent
        # cell) from one that applies.
        self._install_directive_check()
        return [f"{line.strip() + _DIRECTIVE_MARK!r}\n" for line in lines[:consumed]] + body

    def _install_directive_check(self) -> None:
        if self._directive_check is None:
            self._directive_check = _DirectiveCheck(self)
            self.shell.ast_transformers.append(self._directive_check)

    def _cell_options(self, info: Any, raw: str) -> Mapping[str, Any]:
        """The options of a cell: from ``run_cell``/``execute`` (the pending
        holder), the front end's ``cell_meta``, or a leading directive."""
        holder = _pending_options.get()
        options = dict(holder.pop()) if holder else {}
        meta = getattr(info, "cell_meta", None)
        if meta and isinstance(meta, dict) and isinstance(meta.get("pyrepl3"), dict):
            options = {**meta["pyrepl3"], **options}
        if "%%" in raw and _DIRECTIVE_RE.match(raw):
            try:
                options = {**parse_directives(raw)[0], **options}
            except ValueError:
                pass  # the magic reports it when the cell runs
        return options or _NO_OPTIONS

    def _pre_run_cell(self, info: Any) -> None:
        # Hot path: runs before every cell.  A plain cell (no options from
        # any source) that nobody listens to takes the short branch: one
        # Execution, one push, the always-on hooks.
        try:
            raw = info.raw_cell or ""
            listened = self.bus._subscribers  # truthy when somebody listens
            if _pending_options.get() or "%%" in raw or listened \
                    or (_compat.HAS_CELL_META and info.cell_meta):
                execution = self._new_execution(info, raw, listened)
                announced = True
            else:
                announced = False
                execution = Execution(
                    f"{self._id_prefix}{next(self._ids)}",  # new_execution_id(), inline
                    self.session_id, raw,
                    self._sniff_mode(info) if "await" in raw or "async" in raw else "sync",
                    None, _NO_OPTIONS, self.bus)
            try:
                self._local.stack.append(execution)
            except AttributeError:
                self._local.stack = [execution]
            hooks = execution.hooked = self._before_always
            if announced:
                hooks = self._announce(execution, listened)
        except Exception as exc:  # noqa: BLE001
            self.report_internal_error("pre_run_cell", exc)
            return
        for where, component, hook in hooks:
            try:
                hook(execution)
            except Exception as exc:  # noqa: BLE001
                self.report_internal_error(where, exc)

    def _sniff_mode(self, info: Any) -> str:
        """``async`` for a cell IPython will run as a coroutine (top-level
        ``await``), else ``sync``; called only when the text mentions it."""
        return "async" if _compat.cell_is_async(self._shell_ref(), info) else "sync"

    def _new_execution(self, info: Any, raw: str, listened: Any) -> Execution:
        """The execution of a cell with options, listeners or both."""
        options = self._cell_options(info, raw)
        mode = options.get("mode") or \
            (self._sniff_mode(info) if "await" in raw or "async" in raw else "sync")
        execution = Execution(
            options.get("execution_id") or self.new_execution_id(), self.session_id, raw, mode,
            # the count is for the events: not looked up when nobody listens
            _compat.execution_count_in_pre_run_cell(self._shell_ref(), info)
            if listened else None,
            options, self.bus)
        if "%%" in raw and _DIRECTIVE_RE.match(raw):
            execution.directives_pending = True  # consumed by _DirectiveCheck
        return execution

    def _announce(self, execution: Execution, listened: Any) -> tuple:
        """After the push, for a cell with options or listeners: ``started``
        emitted, and the hooks to run (the usual ones plus those it wakes)."""
        if listened:
            execution.emit("started", code=execution.code, mode=execution.mode,
                           execution_count=execution.execution_count)
        hooks = self._before_always
        if listened and self._before_listened:
            hooks += self._before_listened  # a new tuple: post sees the difference
        options = execution.options
        if options and self._before_triggered:
            woken = tuple(h for h in self._before_triggered
                          if not options.keys().isdisjoint(h[1].triggers))
            if woken:
                hooks += woken
        execution.hooked = hooks
        return hooks

    def _post_run_cell(self, result: Any) -> None:
        try:
            execution = self._local.stack.pop()
        except (AttributeError, IndexError):
            return  # empty cell (IPython skips pre_run_cell) or loaded mid-cell
        after = self._after_always
        if execution.hooked is not self._before_always:
            # some hooks beyond the usual ran, or the lists changed during the
            # cell: every component whose before_cell ran, and every one
            # active now, in the usual order
            wanted = {h[1] for h in execution.hooked} | {h[1] for h in after}
            after = [h for h in self._after_hooks if h[1] in wanted]
        for where, component, hook in after:  # reverse order of load
            try:
                hook(execution, result)
            except Exception as exc:  # noqa: BLE001
                self.report_internal_error(where, exc)
        self.last_execution = execution
        try:
            if result is not None and not self.bus._subscribers \
                    and result.error_before_exec is None and result.error_in_exec is None:
                # the common case, inline: a cell that succeeded, nobody listening
                result.pyrepl3_execution_id = execution.id
                execution.status = "ok"
                execution._closed = True
            else:
                self._finish(execution, result)
        except Exception as exc:  # noqa: BLE001
            self.report_internal_error("post_run_cell", exc)
            execution.emit("finished", status=execution.status or "error",
                           duration=0.0)

    def _finish(self, execution: Execution, result: Any) -> None:
        active = bool(self.bus._subscribers)
        if result is None:
            status = "error"
            execution.emit("error", ename="RuntimeError",
                           evalue="IPython failed while running the cell",
                           traceback=[], kind="exception",
                           execution_count=execution.execution_count,
                           **execution.extras.get("error_fields", {}))
        else:
            result.pyrepl3_execution_id = execution.id
            error = result.error_before_exec or result.error_in_exec
            if error is None:
                status = "ok"
                if active and result.result is not None:
                    data, metadata = self._format(result.result)
                    execution.emit("result", execution_count=result.execution_count,
                                   data=data, metadata=metadata)
            else:
                kind = classify_error(error, before_exec=result.error_before_exec is not None)
                status = "cancelled" if kind in ("cancelled", "timeout") else "error"
                if active:
                    # components add fields to the error (e.g. the namespace's rollback)
                    execution.emit("error", ename=type(error).__name__,
                                   evalue=str(error),
                                   traceback=format_traceback(error, self.shell),
                                   kind=kind, execution_count=result.execution_count,
                                   **execution.extras.get("error_fields", {}))
        execution.status = status
        if active:
            execution.emit("finished", status=status,
                           duration=round(time.monotonic() - execution.t0, 6))
        else:
            execution._closed = True

    def _format(self, value: Any) -> tuple[dict, dict]:
        try:
            data, metadata = self.shell.display_formatter.format(value)
        except Exception:  # noqa: BLE001 - a broken repr must not lose the result
            try:
                text = repr(value)
            except Exception as exc:  # noqa: BLE001
                text = f"<unrepresentable {type(value).__name__}: {exc!r}>"
            data, metadata = {"text/plain": text}, {}
        return dict(data), dict(metadata)


def classify_error(error: BaseException, *, before_exec: bool) -> str:
    """The ``kind`` of an ``error`` event for this exception."""
    if isinstance(error, CellCancelled):
        return error.kind
    if isinstance(error, (CellError, SessionLost)):  # reported by a session process
        return error.kind
    if isinstance(error, SecurityError):
        return "security"
    if isinstance(error, DirectiveNotApplied):
        return "exception"
    if isinstance(error, InputRejected):  # also from %time/%timeit's AST pass
        return "security"
    if before_exec:
        if isinstance(error, SyntaxError):
            return "syntax"
        return "exception"
    if isinstance(error, KeyboardInterrupt):
        return "cancelled"
    return "exception"


_IPYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(
    importlib.import_module("IPython").__file__)))


_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


_CELL_FILE = re.compile(r"<ipython-input-(\d+)-[0-9a-f]+>")


def _cell_label(filename: str, shell: Any) -> str | None:
    """``Cell In[N]`` for a cell's code, as IPython's own tracebacks say it:
    from the shell's compiler (which knows ipykernel's file names too), or
    from IPython's ``<ipython-input-N-hash>`` name."""
    compiler = getattr(shell, "compile", None)
    named = getattr(compiler, "format_code_name", None)
    if named is not None:
        try:
            label = named(filename)
        except Exception:  # noqa: BLE001 - a label is a nicety
            label = None
        if label:
            return f"{label[0]} {label[1]}"
    match = _CELL_FILE.fullmatch(filename)
    return f"Cell In[{match.group(1)}]" if match else None


def format_traceback(error: BaseException, shell: Any = None) -> list[str]:
    """Plain-text traceback lines of a cell error, without IPython's or
    pyrepl3's frames, a cell's frames named as the terminal names them
    (``Cell In[3], line 2, in f``).

    Computed once per exception, traceback and shell: a cell's error is
    rendered for IPython's display, for IPython's history and for the
    ``error`` event, and a cancel's response waits for all three (a
    900-frame stack is milliseconds each).  The memo on the exception holds
    strings and numbers only (no traceback, frame or shell), so the
    exception still pickles and deep-copies as before; it is keyed by the
    identity of the traceback it was made from (alive as long as the
    exception holds it) and of its first frame, and by the shell.
    """
    if isinstance(error, SyntaxError) or error.__traceback__ is None:
        return traceback.format_exception_only(type(error), error)
    tb = error.__traceback__
    key = (id(tb), id(tb.tb_frame), tb.tb_lasti, id(shell))
    memo = getattr(error, "__dict__", {}).get("_pyrepl3_formatted")
    if memo is not None and memo[0] == key:
        return list(memo[1])
    lines = _format_traceback(error, tb, shell)
    try:
        error.__dict__["_pyrepl3_formatted"] = (key, tuple(lines))
    except AttributeError:  # no __dict__: rendered each time
        pass
    return lines


def _format_traceback(error: BaseException, tb: Any, shell: Any) -> list[str]:
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_IPYTHON_DIR) \
            and tb.tb_next is not None:
        tb = tb.tb_next
    etype = type(error)
    if isinstance(error, CellCancelled):
        # the engine's private subclasses are shown as the public class a cell can catch
        while etype.__name__.startswith("_") and etype.__base__ is not BaseException:
            etype = etype.__base__
        _drop_repeated_entries(tb)
    labels: dict[str, str] = {}
    if isinstance(error, CellCancelled) and error.__cause__ is None \
            and error.__context__ is None:
        lines = _format_cancelled(etype, error, tb, shell, labels)
    else:
        lines = _format_general(etype, error, tb, shell, labels)
    if labels:
        for i, line in enumerate(lines):
            for quoted, plain in labels.items():
                line = line.replace(quoted, plain)
            lines[i] = line
    return lines


def _drop_repeated_entries(tb: Any) -> None:
    """Splice out a traceback entry that repeats the one before it (the same
    frame at the same line): on 3.10 a cancel raised from the trace function
    is recorded twice in the frame it lands in."""
    while tb is not None:
        following = tb.tb_next
        if following is not None and following.tb_frame is tb.tb_frame \
                and following.tb_lineno == tb.tb_lineno:
            tb.tb_next = following.tb_next
        else:
            tb = following


def _format_cancelled(etype: type, error: BaseException, tb: Any, shell: Any,
                      labels: dict[str, str]) -> list[str]:
    """A cancelled cell's traceback, for the response a cancel waits on.

    The same text as :func:`_format_general` without what a general
    traceback pays for: no caret lines (``traceback`` parses and compiles
    each frame's source line for them) and no ``stat`` of every file behind
    a frame; the source lines come from ``linecache`` as it stands.  30 us
    instead of 160 us for a three-frame cancel (a cancel's answer over the
    protocol is about 2 ms: the hand-offs between threads dominate it).
    """
    rows = []
    while tb is not None:
        frame = tb.tb_frame
        filename = frame.f_code.co_filename
        if not filename.startswith(_PKG_DIR):
            lineno = tb.tb_lineno
            label = _cell_label(filename, shell)
            if label is not None:
                labels[f'File "{label}", line '] = f"{label}, line "
            source = linecache.getline(filename, lineno, frame.f_globals).strip() \
                if lineno is not None else ""
            rows.append((label or filename, lineno, frame.f_code.co_name, source))
        tb = tb.tb_next
    lines = ["Traceback (most recent call last):\n"] if rows else []
    lines += traceback.StackSummary.from_list(rows).format()
    lines += traceback.TracebackException(etype, error, None).format_exception_only()
    return lines


def _format_general(etype: type, error: BaseException, tb: Any, shell: Any,
                    labels: dict[str, str]) -> list[str]:
    exc = traceback.TracebackException(etype, error, tb)
    seen: set[int] = set()
    part: Any = exc
    while part is not None and id(part) not in seen:  # the chained ones too
        seen.add(id(part))
        frames = [f for f in part.stack if not f.filename.startswith(_PKG_DIR)]
        for f in frames:
            label = _cell_label(f.filename, shell)
            if label is not None:
                labels[f'File "{label}", line '] = f"{label}, line "
                f.filename = label
        part.stack = traceback.StackSummary.from_list(frames)
        part = part.__cause__ or part.__context__
    return list(exc.format())


def iter_states() -> Iterator[ShellState]:
    """Every live shell state (for diagnostics and tests)."""
    return iter(list(_states.values()))
