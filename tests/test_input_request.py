"""input()/getpass over the API: input_requested, reply_input, timeout, EOF, cancel."""

from __future__ import annotations

import builtins
import getpass
import io
import queue
import sys
import textwrap
import threading

import pytest

import pyrepl3_ext
from pyrepl3_ext import CellCancelled

from .conftest import by_execution

WAIT = 30


def run(ip, code, **kw):
    return pyrepl3_ext.run_cell(ip, code, **kw)


def text_of(events):
    return "".join(e["text"] for e in events if e["type"] == "output")


class Host:
    """A host answering input: replies come from ``answers`` (a callable or
    a queue of texts), sent from another thread like a real client would."""

    def __init__(self, ip, answer=None):
        self.ip = ip
        self.events: list[dict] = []
        self.requests: "queue.Queue[dict]" = queue.Queue()
        self.answer = answer
        #: (input_id, what reply_input returned), from the replying threads
        self.replies: list[tuple[str, bool]] = []
        self.threads: list[threading.Thread] = []
        self.unsubscribe = pyrepl3_ext.subscribe(ip, self._on_event, handles_input=True)

    def _on_event(self, event):
        self.events.append(event)
        if event["type"] == "input_requested":
            self.requests.put(event)
            if self.answer is not None:
                text = self.answer(event)
                thread = threading.Thread(target=self._reply, args=(event["input_id"], text))
                self.threads.append(thread)
                thread.start()

    def _reply(self, input_id, text):
        self.replies.append((input_id, pyrepl3_ext.reply_input(self.ip, input_id, text)))

    def of(self, execution_id):
        return by_execution(self.events, execution_id)


@pytest.fixture
def config(ip):
    cfg = pyrepl3_ext.get_state(ip).config
    saved = (cfg.input_timeout, cfg.input_echo)
    yield cfg
    cfg.input_timeout, cfg.input_echo = saved


@pytest.fixture
def host(ip):
    h = Host(ip, answer=lambda e: f"answer to {e['prompt'].strip()}")
    yield h
    h.unsubscribe()
    for thread in h.threads:
        thread.join(WAIT)
    # every reply the host sent was taken (checked here, not in its thread)
    asked = [e["input_id"] for e in h.events if e["type"] == "input_requested"]
    assert sorted(h.replies) == sorted((i, True) for i in asked)


def test_input_is_asked_of_the_host_in_every_cell(host):
    ip = host.ip
    for n in range(1, 4):  # the earlier implementation broke from the 2nd cell on
        result = run(ip, f"_reply = input('Q{n}? ')\n_reply", execution_id=f"in{n}")
        assert result.result == f"answer to Q{n}?"
        evs = host.of(f"in{n}")
        assert [e["type"] for e in evs] == ["started", "output", "input_requested",
                                           "output", "result", "finished"]
        req = evs[2]
        assert req["prompt"] == f"Q{n}? " and req["password"] is False
        assert req["input_id"]
        # the prompt is in the output exactly once, before the echoed reply
        assert text_of(evs) == f"Q{n}? answer to Q{n}?\n"
    assert pyrepl3_ext.get_state(ip).input_request.waiting() == []  # no waiter leaks


def test_input_inside_functions_and_several_prompts(host):
    code = textwrap.dedent("""\
        def ask(what):
            return input(what)
        _a = ask('first: ')
        print('between')
        _b = input('second: ')
        (_a, _b)""")
    result = run(host.ip, code, execution_id="two")
    assert result.result == ("answer to first:", "answer to second:")
    evs = host.of("two")
    reqs = [e for e in evs if e["type"] == "input_requested"]
    assert len({r["input_id"] for r in reqs}) == 2
    assert text_of(evs) == ("first: answer to first:\nbetween\n"
                            "second: answer to second:\n")


def test_prompts_with_odd_characters_appear_once_before_the_reply(host):
    prompt = "line1\n\tTabbed \u2728 emoji: "
    result = run(host.ip, f"input({prompt!r})", execution_id="odd")
    evs = host.of("odd")
    assert result.result == "answer to " + prompt.strip()
    out = text_of(evs)
    assert out.count(prompt) == 1 and out.index(prompt) < out.index("answer to")
    first_request = next(i for i, e in enumerate(evs) if e["type"] == "input_requested")
    assert text_of(evs[:first_request]) == prompt  # all of it before the request


def test_partial_output_is_flushed_before_the_prompt(host):
    run(host.ip, "print('progress...', end='')\ninput('> ')", execution_id="pf")
    evs = host.of("pf")
    kinds = [(e["type"], e.get("text")) for e in evs][1:4]
    assert kinds == [("output", "progress..."), ("output", "> "), ("input_requested", None)]


def test_concurrent_prompts_from_threads_answered_by_id(ip):
    host = Host(ip)
    try:
        code = textwrap.dedent("""\
            import threading
            _got = {}
            def ask(k):
                _got[k] = input(f'thread {k}: ')
            _ts = [threading.Thread(target=ask, args=(k,)) for k in range(3)]
            for t in _ts: t.start()
            for t in _ts: t.join()
            sorted(_got.items())""")
        out = {}
        cell = threading.Thread(target=lambda: out.setdefault("r", run(ip, code, execution_id="thr")))
        cell.start()
        reqs = [host.requests.get(timeout=WAIT) for _ in range(3)]
        for req in reversed(reqs):  # answered in another order than asked
            assert pyrepl3_ext.reply_input(ip, req["input_id"], f"reply {req['prompt']}") is True
        cell.join(WAIT)
        assert out["r"].result == [(k, f"reply thread {k}: ") for k in range(3)]
        assert all(r["execution_id"] == "thr" for r in reqs)
    finally:
        host.unsubscribe()


def test_empty_reply_and_trailing_newline(ip):
    answers = iter(["", "typed\n"])
    host = Host(ip, answer=lambda e: next(answers))
    try:
        assert run(ip, "(input('a'), input('b'))").result == ("", "typed")
    finally:
        host.unsubscribe()


def test_timeout_raises_timeout_error(ip, config):
    config.input_timeout = 0.2
    host = Host(ip)  # never answers
    try:
        result = run(ip, "input('nobody answers: ')", execution_id="to")
        assert isinstance(result.error_in_exec, TimeoutError)
        assert "input_timeout" in str(result.error_in_exec)
        req = host.requests.get(timeout=WAIT)
        assert pyrepl3_ext.reply_input(ip, req["input_id"], "too late") is False
        # the next cell asks again, normally
        config.input_timeout = 0
        host.answer = lambda e: "on time"
        assert run(ip, "input('again: ')").result == "on time"
    finally:
        host.unsubscribe()


def test_host_eof_raises_eof_error(ip):
    host = Host(ip, answer=lambda e: None)
    try:
        result = run(ip, "input('eof? ')", execution_id="eof")
        assert isinstance(result.error_in_exec, EOFError)
        result = run(ip, "try:\n    input('x')\nexcept EOFError:\n    _r = 'caught'\n_r")
        assert result.result == "caught"
    finally:
        host.unsubscribe()


def test_host_leaving_ends_the_wait_with_eof(ip):
    host = Host(ip)
    out = {}
    cell = threading.Thread(target=lambda: out.setdefault("r", run(ip, "input('?')")))
    cell.start()
    host.requests.get(timeout=WAIT)
    host.unsubscribe()
    cell.join(WAIT)
    assert isinstance(out["r"].error_in_exec, EOFError)
    assert "host" in str(out["r"].error_in_exec)


@pytest.mark.parametrize("where", ["main thread", "worker thread", "thread of the cell"])
def test_cancel_wakes_input_at_once(quiet, where):
    ip = quiet
    host = Host(ip)
    try:
        code = "input('wait: ')"
        if where == "thread of the cell":
            code = textwrap.dedent("""\
                import threading
                _err = []
                def ask():
                    try:
                        input('wait: ')
                    except BaseException as e:
                        _err.append(e)
                _t = threading.Thread(target=ask); _t.start(); _t.join()
                raise _err[0]""")

        hit = {}

        def cancel_when_asked():
            req = host.requests.get(timeout=WAIT)
            hit["cancel"] = pyrepl3_ext.cancel(ip, req["execution_id"], "user hit stop")

        canceller = threading.Thread(target=cancel_when_asked)
        canceller.start()
        # store_history=False: IPython formats a stored cell's traceback for
        # history while the cancel may be re-armed, which is slow on 3.12
        # workers (a cancellation matter, not an input one)
        if where == "main thread":
            result = run(ip, code, execution_id="cw", store_history=False)
        else:
            out = {}
            cell = threading.Thread(target=lambda: out.setdefault(
                "r", run(ip, code, execution_id="cw", store_history=False)))
            cell.start()
            cell.join(WAIT)
            assert not cell.is_alive()
            result = out["r"]
        canceller.join(WAIT)
        assert hit == {"cancel": True}
        error = result.error_in_exec or result.error_before_exec
        assert isinstance(error, CellCancelled), repr(error)
        if where == "thread of the cell":  # the waiting thread itself got it
            ip.user_ns.pop("_t").join(WAIT)
            assert isinstance(ip.user_ns.pop("_err")[0], CellCancelled)
        evs = host.of("cw")
        assert evs[-2]["type"] == "error" and evs[-2]["kind"] == "cancelled"
        assert evs[-1]["status"] == "cancelled"
        assert pyrepl3_ext.get_state(ip).input_request.waiting() == []
    finally:
        host.unsubscribe()


def test_getpass_is_a_password_request_and_not_echoed(host):
    result = run(host.ip, "import getpass\n_p = getpass.getpass()\nlen(_p)", execution_id="pw")
    evs = host.of("pw")
    req = next(e for e in evs if e["type"] == "input_requested")
    assert req["password"] is True and req["prompt"] == "Password: "
    assert result.result == len("answer to Password:")
    assert text_of(evs) == "Password: \n"  # the secret is never in the output


def test_reply_from_inside_the_subscriber_and_echo_off(ip, config):
    config.input_echo = False

    replied = []

    def answer_now(event):
        if event["type"] == "input_requested":
            replied.append(pyrepl3_ext.reply_input(ip, event["input_id"], "sync"))

    events: list = []
    unsubscribe = pyrepl3_ext.subscribe(ip, answer_now, handles_input=True)
    unsub_log = pyrepl3_ext.subscribe(ip, events.append)
    try:
        assert run(ip, "input('now: ')", execution_id="sy").result == "sync"
        assert replied == [True]  # answered from inside the subscriber
        assert text_of(by_execution(events, "sy")) == "now: "
    finally:
        unsubscribe()
        unsub_log()


def test_reply_validation(host):
    assert pyrepl3_ext.reply_input(host.ip, "no-such-id", "x") is False
    with pytest.raises(TypeError):
        pyrepl3_ext.reply_input(host.ip, "no-such-id", b"bytes")


def test_without_a_host_input_is_stock(ip, monkeypatch):
    events: list = []
    unsubscribe = pyrepl3_ext.subscribe(ip, events.append)  # listening, not answering
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n"))
    try:
        result = run(ip, "input('stock: ')", execution_id="st")
    finally:
        unsubscribe()
    assert result.result == "from stdin"
    assert all(e["type"] != "input_requested" for e in events)


def test_input_outside_cells_is_stock(ip, monkeypatch):
    host = Host(ip, answer=lambda e: "should not be asked")
    monkeypatch.setattr(sys, "stdin", io.StringIO("outside\n"))
    try:
        assert builtins.input() == "outside"  # not in a cell: the terminal's
        assert host.requests.empty()
    finally:
        host.unsubscribe()


def test_dispatchers_installed_once_and_removed_on_unload(shell):
    original_input, original_getpass = builtins.input, getpass.getpass
    pyrepl3_ext.load_ipython_extension(shell)
    try:
        assert builtins.input is not original_input
        assert getpass.getpass is not original_getpass
    finally:
        pyrepl3_ext.unload_ipython_extension(shell)
    assert builtins.input is original_input and getpass.getpass is original_getpass
