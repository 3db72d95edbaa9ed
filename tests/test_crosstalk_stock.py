"""The cross-talk counter harness (tests/crosstalk.py) on stock IPython.

The patched build must count 0 everywhere (``test_patched.py``); this shows
that the same harness does count cross-talk where the patches are missing,
so that test can fail.
"""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

from pyrepl3_ext._compat import is_patched_build
from tests.crosstalk import run_crosstalk, size_from_env, table

pytestmark = pytest.mark.skipif(is_patched_build(), reason="the patched build counts 0 (test_patched.py)")


def test_stock_ipython_shows_crosstalk(shell):
    if not hasattr(InteractiveShell, "_tee"):
        pytest.skip("the harness's history counter needs IPython 9.1+ (history outputs)")
    counts, left = run_crosstalk(*size_from_env("4x100"))
    print("\n" + table(counts, left))
    total = {name: sum(row[name] for row in counts.values()) for name in next(iter(counts.values()))}
    # Deterministic on stock 9.x: every shell but the last built owns no __main__,
    # IPython.get_ipython() answers the singleton, history outputs are one dict.
    assert total["__main__ wrong"] > 0
    assert total["pickling a cell class"] > 0
    assert total["IPython.get_ipython()"] > 0
    assert total["history outputs mixed"] > 0
    assert "__main__" in left
