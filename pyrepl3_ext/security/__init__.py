"""Capabilities and the security policy (``docs/security.md``).

One module per layer: :mod:`.policy` (presets and settings),
:mod:`.builtins` (the sanitized builtins mapping), :mod:`.ast_guard`
(refusal before anything runs), :mod:`.imports` (allowlist and read-only
module views), :mod:`.audit` (the PEP 578 tripwire), :mod:`.capabilities`
and :mod:`.facade` (what the host grants and what cells hold), and
:mod:`.component` (applies a session's policy to its shell).
"""

from __future__ import annotations

from .audit import AuditDenied
from .capabilities import CustomCapability, FilesCapability
from .policy import PRESETS, SecurityPolicy

__all__ = ["AuditDenied", "CustomCapability", "FilesCapability", "PRESETS",
           "SecurityPolicy"]
