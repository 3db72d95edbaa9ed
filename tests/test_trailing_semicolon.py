"""A trailing ``;`` hides the value of the cell that ends with it, and only of that one.

IPython's check reads the last cell stored in history; hosts run cells unstored
(tools, ``%%timeout``'s body), so pyrepl3 makes the check read the running cell
(``pyrepl3_ext/trailing_semicolon.py``).
"""

from __future__ import annotations

import pytest

import pyrepl3_ext


def value(ip, code: str, **kw):
    result = pyrepl3_ext.run_cell(ip, code, **kw)
    assert result.error_before_exec is None and result.error_in_exec is None, \
        (result.error_before_exec or result.error_in_exec)
    return result.result


def test_an_unstored_cell_keeps_its_value_after_a_stored_cell_ending_in_a_semicolon(ip):
    ip.run_cell("sc_x = 1;", store_history=True)
    assert value(ip, "42", store_history=False) == 42


def test_an_unstored_cell_ending_in_a_semicolon_hides_its_value(ip):
    ip.run_cell("sc_y = 2", store_history=True)
    assert value(ip, "43;", store_history=False) is None
    assert value(ip, "44  # no semicolon; only in a comment", store_history=False) == 44


def test_a_stored_cell_that_does_not_tokenize_breaks_no_later_cell(ip, capsys):
    ip.run_cell("sc_z = (1,\n  2", store_history=True)  # stored, then refused
    assert value(ip, "45", store_history=False) == 45
    assert value(ip, "46;", store_history=False) is None


@pytest.mark.parametrize("store", [True, False])
def test_a_timeout_cells_body_is_judged_by_its_own_last_line(ip, store):
    ip.run_cell("sc_w = 3;", store_history=True)
    assert value(ip, "%%timeout 30\n47", store_history=store) == 47
    assert value(ip, "%%timeout 30\n48;", store_history=store) is None


def test_stored_cells_behave_as_in_ipython(ip):
    assert value(ip, "49", store_history=True) == 49
    assert value(ip, "50;", store_history=True) is None
    assert value(ip, "[51,\n 52]", store_history=True) == [51, 52]
