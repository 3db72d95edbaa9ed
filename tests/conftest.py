"""Shared fixtures: one IPython shell per test process, the extension fresh per test."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

import pyrepl3_ext


@pytest.fixture(scope="session")
def shell():
    """The process's IPython shell (stock IPython supports one per process well)."""
    return InteractiveShell.instance()


@pytest.fixture
def ip(shell):
    """``shell`` with pyrepl3_ext freshly loaded; unloaded (and checked) afterwards."""
    pyrepl3_ext.load_ipython_extension(shell)
    try:
        yield shell
    finally:
        pyrepl3_ext.unload_ipython_extension(shell)


@pytest.fixture
def events(ip):
    """Every event of ``ip`` during the test, in arrival order."""
    received: list[dict] = []
    unsubscribe = pyrepl3_ext.subscribe(ip, received.append)
    yield received
    unsubscribe()


def by_execution(events: list[dict], execution_id: str) -> list[dict]:
    return [e for e in events if e["execution_id"] == execution_id]
