"""Shared helpers of the security tests."""

from __future__ import annotations

import pyrepl3_ext
from pyrepl3_ext import extension


def run(ip, events, code, **kw):
    """Run ``code``; returns (this execution's events, its error event or None)."""
    start = len(events)
    result = pyrepl3_ext.run_cell(ip, code, **kw)
    mine = [e for e in events[start:] if e["execution_id"] == result.pyrepl3_execution_id]
    error = next((e for e in mine if e["type"] == "error"), None)
    return mine, error


def value(ip, events, code):
    """The value of the expression cell ``code`` (its result's text/plain)."""
    mine, error = run(ip, events, code)
    assert error is None, error
    result = next(e for e in mine if e["type"] == "result")
    return result["data"]["text/plain"]


def session(ip):
    return extension.get_state(ip).security.session


def audits(mine, action=None):
    return [e for e in mine if e["type"] == "audit"
            and (action is None or e["action"] == action)]
