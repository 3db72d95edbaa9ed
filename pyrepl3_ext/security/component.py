"""The security component: applies one session's policy to its shell.

``SecurityComponent`` (registered in ``extension.COMPONENTS``) owns a
:class:`SessionSecurity`, which installs the layers the policy asks for and
removes exactly them again: the sanitized ``__builtins__`` dict in
``user_ns``, the AST guard (first in ``shell.ast_transformers``, so it sees
the user's code before any other transformer adds instrumentation), the
magics gate behind ``get_ipython``, the capability facades, and the audit
scope entered around each cell.  One wrapper stays for the component's
life: ``shell.showtraceback`` first words an ``AttributeError`` on a
spelled private name the way the cell wrote it (``rules.explain_private_miss``).

The capability-aware ``user_ns``: injected names are protected by the AST
guard (no binding, deleting or ``global`` of them) and re-checked after
every cell (restored, and reported, if something replaced them anyway).
On a build with patch ``0009-capability-aware-user-ns``
(``_compat.has_protected_names``) they are also in
``shell.protected_names``, so IPython's own namespace operations (``push``,
``del_var``, ``%xdel``, ``reset_selective``, ``drop_by_id``) refuse them and
``reset`` puts them back, and the builtins trap leaves the shared
``builtins`` module alone and never installs the real ``get_ipython`` into
a gated session's builtins dict (``docs/security.md``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from .. import _compat
from ..errors import SecurityError
from ..extension import Component, InstancePatches
from . import audit
from .ast_guard import SecurityGuard, magic_message, shell_escape_message
from .builtins import build_builtins
from .capabilities import FilesCapability, Grant
from .facade import _inert, make_facade
from .gadgets import Ownership
from .imports import Importer
from .policy import SecurityPolicy
from .rules import explain_private_miss

_MAX_LOG = 1000
_MISSING = object()


class SessionSecurity:
    """Everything the policy of one shell installed, and its reports."""

    def __init__(self, state: Any):
        self.state = state
        self.policy = SecurityPolicy.preset("trusted")
        self.grants: dict[str, Grant] = {}
        self.importer: Importer | None = None
        self.scope: audit.AuditScope | None = None
        self.builtins: dict | None = None
        self.guard: SecurityGuard | None = None
        self.gate = None
        self._get_ipython = None
        self._saved: dict[str, Any] = {}
        self._injected: dict[str, Any] = {}
        #: called after every change of what is enforced (the component
        #: keeps its per-cell ``idle`` flag from it)
        self.on_change: Any = None
        #: What this session added to ``shell.protected_names`` and
        #: ``shell.builtin_trap.denied_names`` (patch 0009 only).
        self._protected: frozenset = frozenset()
        self._trap_denied: frozenset = frozenset()
        #: Every refusal, denial and capability call (host-side, bounded).
        self.log: list[dict] = []
        self._lock = threading.RLock()

    @property
    def user_ns(self) -> dict:
        return self.state.shell.user_ns

    # -- what the layers ask -------------------------------------------------
    def protected_names(self) -> frozenset:
        names = set(self._injected)
        if self.gate is not None:
            names.add("get_ipython")
        return frozenset(names)

    def gate_active(self) -> bool:
        return self.gate is not None

    def magic_chain(self, name: str, kind: str) -> list[tuple[str, str]]:
        """``name`` and every magic it is an alias of (``%alias_magic``).

        The gate checks each: an alias runs its target's function directly,
        so checking the alias's own name alone let ``%alias_magic cfg config``
        run ``%config`` under another name.
        """
        from IPython.core.magic import MagicAlias

        chain = [(name, kind)]
        shell = self.state._shell_ref()
        fn = shell.find_magic(name, kind) if shell is not None else None
        while isinstance(fn, MagicAlias) and len(chain) < 16:
            chain.append((fn.magic_name, fn.magic_kind))
            fn = shell.find_magic(fn.magic_name, fn.magic_kind)
        return chain

    def match_check_available(self) -> bool:
        """Whether the session's builtins hold the class-pattern check."""
        from .ast_guard import MATCH_CHECK
        return self.builtins is not None and MATCH_CHECK in self.builtins

    def granted_roots(self) -> list[str]:
        return [g.impl.root for g in self.grants.values()
                if isinstance(g.impl, FilesCapability) and not g.revoked]

    # -- reports ---------------------------------------------------------------
    def _log(self, entry: dict) -> None:
        entry["ts"] = time.time()
        with self._lock:
            self.log.append(entry)
            if len(self.log) > _MAX_LOG:
                del self.log[: len(self.log) - _MAX_LOG]

    def _emit(self, execution: Any, **fields: Any) -> None:
        if execution is None:
            execution = self.state.current_execution()
        if execution is None and self.scope is not None:
            execution = self.scope.execution  # a thread the cell started
        if execution is None or execution.finished:
            return
        with audit.trusted():
            execution.emit("audit", **fields)

    def record_refusal(self, layer: str, message: str) -> None:
        self._log({"action": "refused", "layer": layer, "message": message})

    def record_denial(self, event: str, args: list, message: str, execution: Any) -> None:
        entry = {"action": "denied", "layer": "audit", "event": event, "args": args,
                 "message": message}
        self._log(dict(entry))
        self._emit(execution, **entry)

    def record_capability_call(self, name: str, method: str, args: list,
                               outcome: str, error: str | None) -> None:
        entry = {"action": "capability_call", "layer": "capability",
                 "capability": name, "method": method, "args": args,
                 "outcome": outcome, "message": error}
        self._log(dict(entry))
        self._emit(None, **entry)

    # -- policy ----------------------------------------------------------------
    def apply(self, policy: SecurityPolicy) -> None:
        """Remove the current layers and install ``policy``'s."""
        if not isinstance(policy, SecurityPolicy):
            raise TypeError(f"expected a SecurityPolicy, got {policy!r}")
        with self._lock:
            self.remove_layers()
            self.policy = policy
            shell = self.state.shell
            ns = shell.user_ns
            owned = Ownership(ns)
            if policy.allowed_modules is not None:
                self.importer = Importer(policy.allowed_modules, policy.name, owned)
            if policy.sanitize_builtins:
                self.builtins = build_builtins(policy, self.importer, owned)
                self._save(ns, "__builtins__")
                ns["__builtins__"] = self.builtins
            if policy.allowed_magics is not None or policy.denied_magics \
                    or not policy.allow_shell_escapes:
                self._install_gate(ns)
            # IPython puts some builtins in user_ns itself (exit, quit, and an
            # ``open`` wrapper on 8.x+): denied ones go from there too
            hidden = getattr(shell, "user_ns_hidden", {})
            for name in policy.denied_builtins:
                if name != "get_ipython" and name in ns and name in hidden:
                    self._save(ns, name)
                    ns.pop(name, None)
            # IPython's directory history holds pathlib objects on 3.13
            # (``Path.parser`` is the real ``os.path`` module): with an import
            # allowlist, the session sees the directories as plain strings
            dirs = ns.get("_dh")
            if policy.allowed_modules is not None and type(dirs) is list \
                    and any(type(d) is not str for d in dirs):
                self._save(ns, "_dh")
                ns["_dh"] = [os.fspath(d) if isinstance(d, os.PathLike) else str(d)
                             for d in dirs]
            if policy.ast_guard:
                self.guard = SecurityGuard(self)
                shell.ast_transformers.insert(0, self.guard)
            if policy.audit:
                audit.install()
                self.scope = audit.AuditScope(self)
                audit.watch_origin(ns, self.scope)
            self._inject()
            self._changed()

    def _changed(self) -> None:
        self._sync_protected()
        if self.on_change is not None:
            self.on_change()

    def _sync_protected(self) -> None:
        """Patch 0009: mirror the protected names into the shell (no-op on stock)."""
        shell = self.state._shell_ref()
        if shell is None or not _compat.has_protected_names(shell):
            return
        names = set(self.protected_names())
        if self.builtins is not None:
            names.add("__builtins__")
        denied = set()
        if self.gate is not None or "get_ipython" in self.policy.denied_builtins:
            denied.add("get_ipython")
        protected, trap = shell.protected_names, shell.builtin_trap.denied_names
        protected.difference_update(self._protected - names)
        protected.update(names)
        trap.difference_update(self._trap_denied - denied)
        trap.update(denied)
        self._protected, self._trap_denied = frozenset(names), frozenset(denied)

    def _save(self, ns: dict, name: str) -> None:
        if name not in self._saved:
            self._saved[name] = ns.get(name, _MISSING)

    def _install_gate(self, ns: dict) -> None:
        self.gate = make_facade("shell gate", "get_ipython()",
                                ("run_line_magic", "run_cell_magic", "system",
                                 "getoutput"), self._gate_dispatch)
        gate = self.gate

        def get_ipython():
            return gate

        self._get_ipython = _inert(get_ipython)
        self._save(ns, "get_ipython")
        ns["get_ipython"] = self._get_ipython

    def _gate_dispatch(self, method: str, args: tuple, kwargs: dict) -> Any:
        policy = self.policy
        shell = self.state.shell
        prefix = f"refused by security policy {policy.name!r}: "
        if method in ("system", "getoutput"):
            if not policy.allow_shell_escapes:
                self.record_refusal("magics", prefix + shell_escape_message())
                raise SecurityError(prefix + shell_escape_message())
            return getattr(shell, method)(*args, **kwargs)
        name = args[0] if args else kwargs.get("magic_name")
        if type(name) is not str:
            raise TypeError("the magic name must be a str")
        kind = "cell" if method == "run_cell_magic" else "line"
        for target, target_kind in self.magic_chain(name, kind):
            if not policy.magic_allowed(target):
                message = prefix + magic_message(policy, target, cell=target_kind == "cell")
                if target != name:
                    message += f" (%{name} is an alias of it)"
                self.record_refusal("magics", message)
                raise SecurityError(message)
        if method == "run_line_magic" and "_stack_depth" not in kwargs:
            # the caller's frame is 2 frames further up (facade + dispatch)
            kwargs = {**kwargs, "_stack_depth": 3}
        return getattr(shell, method)(*args, **kwargs)

    def remove_layers(self) -> None:
        with self._lock:
            shell = self.state._shell_ref()
            ns = shell.user_ns if shell is not None else None
            if shell is not None and _compat.has_protected_names(shell):
                shell.protected_names.difference_update(self._protected)
                shell.builtin_trap.denied_names.difference_update(self._trap_denied)
            self._protected = self._trap_denied = frozenset()
            if shell is not None and self.guard is not None:
                try:
                    shell.ast_transformers.remove(self.guard)
                except ValueError:
                    pass
            if ns is not None:
                for name, grant in list(self._injected.items()):
                    if ns.get(name) is grant:
                        del ns[name]
                for name, value in self._saved.items():
                    if value is _MISSING:
                        ns.pop(name, None)
                    else:
                        ns[name] = value
            self._injected.clear()
            self._saved.clear()
            if self.scope is not None:
                audit.watch_origin(self.scope.user_ns, None)
            self.guard = self.gate = self._get_ipython = None
            self.builtins = self.importer = self.scope = None
            if self.on_change is not None:
                self.on_change()

    # -- capabilities ------------------------------------------------------------
    def grant(self, name: str, impl: Any) -> Any:
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"capability names are public identifiers, got {name!r}")
        if not hasattr(impl, "method") or not hasattr(impl, "methods"):
            raise TypeError(f"{impl!r} is not a capability implementation "
                            f"(FilesCapability, CustomCapability)")
        with self._lock:
            old = self.grants.get(name)
            if old is not None:
                old.revoke()
            grant = Grant(name, impl, self)
            self.grants[name] = grant
            self._inject()
            self._changed()
            if self.scope is not None:
                self.scope.refresh_roots()
            return grant.facade

    def revoke(self, name: str) -> bool:
        with self._lock:
            grant = self.grants.pop(name, None)
            if grant is None:
                return False
            grant.revoke()
            ns = self.user_ns
            if ns.get(name) is grant.facade:
                del ns[name]
            self._injected.pop(name, None)
            self._changed()
            if self.scope is not None:
                self.scope.refresh_roots()
            return True

    def _inject(self) -> None:
        ns = self.user_ns
        for name, grant in self.grants.items():
            if self.policy.grants(name):
                ns[name] = grant.facade
                self._injected[name] = grant.facade
            elif self._injected.pop(name, None) is not None and ns.get(name) is grant.facade:
                del ns[name]

    @property
    def enforcing(self) -> bool:
        """Whether anything is applied per cell (not the bare ``trusted`` preset)."""
        return bool(self._injected) or self.builtins is not None \
            or self._get_ipython is not None or self.scope is not None

    def recheck(self) -> list[str]:
        """Put back injected names, builtins and the gate if something replaced them."""
        ns = self.user_ns
        restored = []
        expected = dict(self._injected)
        if self.builtins is not None:
            expected["__builtins__"] = self.builtins
        if self._get_ipython is not None:
            expected["get_ipython"] = self._get_ipython
        for name, value in expected.items():
            if ns.get(name, _MISSING) is not value:
                ns[name] = value
                restored.append(name)
        return restored


class SecurityComponent(Component):
    """Applies the session's SecurityPolicy (``c.PyREPL3.security_policy``)."""

    name = "security"

    #: nothing to do per cell under the bare ``trusted`` preset
    idle = True

    def attach(self) -> None:
        self.session = SessionSecurity(self.state)
        self.session.on_change = self._update_idle
        config = self.state.config
        self.session.apply(SecurityPolicy.preset(config.security_policy))
        if config.files_root:
            self.session.grant("files", FilesCapability(config.files_root))
        config.observe(self._on_policy_change, names="security_policy")
        self._patches = InstancePatches()
        self._patches.wrap(self.state.shell, "showtraceback", self._explaining)

    def _explaining(self, original: Any) -> Any:
        """``shell.showtraceback`` that first words a missed private name as
        the cell wrote it (``rules.explain_private_miss``); errors only."""
        session = self.session

        def showtraceback(exc_tuple: Any = None, *args: Any, **kwargs: Any) -> Any:
            policy = session.policy
            if policy.guard_private_attributes:
                error = exc_tuple[1] if exc_tuple else sys.exc_info()[1]
                if error is not None:
                    explain_private_miss(error, policy.name)
            return original(exc_tuple, *args, **kwargs)
        return showtraceback

    def _on_policy_change(self, change: dict) -> None:
        self.session.apply(SecurityPolicy.preset(change["new"]))

    def _update_idle(self) -> None:
        self.set_idle(not self.session.enforcing)

    def before_cell(self, execution: Any) -> None:
        session = self.session
        if not session.enforcing:
            return  # trusted, nothing injected: nothing to do per cell
        session.recheck()
        scope = session.scope
        if scope is not None:
            scope.execution = execution
            execution.extras["security"] = (scope, audit.enter(scope))

    def after_cell(self, execution: Any, result: Any) -> None:
        entered = execution.extra("security")
        if entered is not None:
            del execution.extras["security"]
            audit.leave(entered[1])
        if not self.session.enforcing:
            return
        restored = self.session.recheck()
        if restored:
            message = (f"the cell replaced {', '.join(sorted(restored))}; restored "
                       f"(security policy {self.session.policy.name!r})")
            self.session.record_refusal("namespace", message)
            self.session._emit(execution, action="restored", layer="namespace",
                               names=sorted(restored), message=message)

    def detach(self) -> None:
        self._patches.undo()
        config = self.state.config
        if config is not None:
            try:
                config.unobserve(self._on_policy_change, names="security_policy")
            except ValueError:
                pass
        session = self.session
        session.remove_layers()
        for grant in list(session.grants.values()):
            grant.revoke()
        session.grants.clear()
