"""Protocol server: round trip, cancel and timeout latency, event throughput,
with a Jupyter kernel measured in the same run as the reference.

Run: ``python bench/bench_server.py [--samples N] [--quick] [--base-src DIR] [--codecs]``.

Starts ``pyrepl3 serve --unix`` and drives it with a raw blocking socket
client (one JSON line out, lines in until the response: what the server
costs, not what an asyncio client adds), for an in-process session and a
process-isolated one (``isolation: "process"``), interleaved in rounds with
in-process ``Session.execute`` and with a Jupyter kernel (ipykernel driven by
jupyter_client's blocking client) so the load of a shared machine hits every
column alike.  Figures (p50 / p99 ms):

- ``x = 1`` from request to response, all its events received;
- cancel request -> execute response of ``while True: pass`` (Jupyter:
  ``interrupt_kernel()`` -> ``execute_reply``), of a loop 900 frames deep,
  of an ``await asyncio.sleep(100)`` cell, and of ``time.sleep(100)`` in a
  process session;
- ``timeout=`` and ``%%timeout`` expiry -> response, counted from the
  deadline: request sent + timeout (an upper bound, it includes the start
  of the cell) and the ``started`` event's ``ts`` + timeout (the deadline
  itself, on the server's clock, which is this machine's);
- events per second of a cell that prints many lines (the asyncio client);
  with ``--base-src DIR`` (an older checkout, e.g. ``git archive``), that
  server is measured in the same run, interleaved (round trips, cancels of a
  loop and of an ``await``, events/s), for a before/after; with
  ``--switch-intervals 0.00025,...`` so is this server with each GIL switch
  interval; with ``--codecs`` so is this server
  with the stdlib JSON codec (``PYREPL3_JSON=stdlib``), with asyncio's
  own loop (``PYREPL3_LOOP=asyncio``) instead of uvloop, and with the
  interpreter's 5 ms GIL switch interval (``PYREPL3_SWITCH_INTERVAL=0.005``).

Writes JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import write_results  # noqa: E402
from pyrepl3_ext.client import Client, ServerProcess  # noqa: E402

LOOP = "while True: pass"
DEEP = ("def down(n):\n"
        "    if n == 0:\n"
        "        while True:\n"
        "            pass\n"
        "    return down(n - 1)\n"
        "down(900)")
SLEEP = "import time\ntime.sleep(100)"
AWAIT = "import asyncio\nawait asyncio.sleep(100)"
TIMEOUT = 0.05


def percentiles(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50_ms": statistics.median(s) * 1e3,
            "p99_ms": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))] * 1e3,
            "n": len(s)}


class Raw:
    """A minimal blocking JSON-lines client of ``pyrepl3 serve``."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.ids = 0

    def send(self, method: str, **params: object) -> int:
        self.ids += 1
        self.sock.sendall(json.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method,
                                      "params": params}).encode() + b"\n")
        return self.ids

    def message(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def until_response(self, id_: int, event: str | None = None) -> dict:
        """Read until the response to ``id_`` (or, with ``event``, until an
        execution event of that type)."""
        while True:
            m = self.message()
            if m.get("id") == id_:
                if "error" in m:
                    raise RuntimeError(m["error"])
                return m["result"]
            if event and m.get("method") == "execution.event" \
                    and m["params"]["event"]["type"] == event:
                return m

    def call(self, method: str, **params: object) -> dict:
        return self.until_response(self.send(method, **params))

    def close(self) -> None:
        self.sock.close()


class PyrepSession:
    def __init__(self, raw: Raw, isolation: str):
        self.raw = raw
        self.sid = raw.call("session.create", isolation=isolation)["session"]
        self.n = 0

    def round_trip(self) -> float:
        t0 = time.perf_counter()
        self.raw.call("execute", session=self.sid, code="x = 1")
        return time.perf_counter() - t0

    def cancel(self, code: str) -> float:
        self.n += 1
        eid = f"c{self.n}"
        rid = self.raw.send("execute", session=self.sid, code=code, execution_id=eid)
        self.raw.until_response(-1, event="started")
        time.sleep(0.02)  # let it run into the loop
        t0 = time.perf_counter()
        cid = self.raw.send("cancel", session=self.sid, execution_id=eid)
        # the cancel's own answer may come before or after the execute response
        answered = None
        while True:
            m = self.raw.message()
            if m.get("id") == rid:
                t1 = time.perf_counter()
                assert m["result"]["status"] == "cancelled", m
                break
            if m.get("id") == cid:
                answered = m
        while answered is None:
            m = self.raw.message()
            if m.get("id") == cid:
                answered = m
        return t1 - t0

    def timeout(self, directive: bool) -> tuple[float, float]:
        """Response time after the deadline, counted from the request's sending
        (an upper bound: it includes the cell's start) and from the deadline
        itself: the cell's start, which the ``started`` event's ``ts`` records
        (the server's wall clock, this machine's; the event's arrival is no
        bound, the server may hold it back for its response)."""
        code = f"%%timeout {TIMEOUT}\n{LOOP}" if directive else LOOP
        extra = {} if directive else {"timeout": TIMEOUT}
        t0 = time.perf_counter()
        rid = self.raw.send("execute", session=self.sid, code=code, **extra)
        started = self.raw.until_response(-1, event="started")["params"]["event"]["ts"]
        result = self.raw.until_response(rid)
        t1, wall = time.perf_counter(), time.time()
        assert result["status"] in ("cancelled", "error") and result["error"], result
        return t1 - t0 - TIMEOUT, wall - started - TIMEOUT


class Jupyter:
    """ipykernel through jupyter_client's blocking client."""

    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3")

    def _idle(self, msg_id: str) -> None:
        while True:
            m = self.kc.get_iopub_msg(timeout=30)
            if m["parent_header"].get("msg_id") == msg_id and \
                    m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                return

    def _reply(self, msg_id: str) -> dict:
        while True:
            m = self.kc.get_shell_msg(timeout=30)
            if m["parent_header"].get("msg_id") == msg_id:
                return m

    def round_trip(self) -> float:
        t0 = time.perf_counter()
        msg_id = self.kc.execute("x = 1")
        self._reply(msg_id)
        self._idle(msg_id)
        return time.perf_counter() - t0

    def cancel(self, code: str) -> float:
        msg_id = self.kc.execute(code)
        while True:  # running: its execute_input was broadcast
            m = self.kc.get_iopub_msg(timeout=30)
            if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "execute_input":
                break
        time.sleep(0.02)
        t0 = time.perf_counter()
        self.km.interrupt_kernel()
        reply = self._reply(msg_id)
        t1 = time.perf_counter()
        assert reply["content"]["status"] == "error", reply["content"]
        self._idle(msg_id)
        return t1 - t0

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def in_process_session():
    from pyrepl3_ext.engine import Engine

    engine = Engine()
    session = engine.create_session()

    def once() -> float:
        t0 = time.perf_counter()
        session.execute("x = 1", on_event=lambda e: None)
        return time.perf_counter() - t0

    return engine, once


async def event_rate(path: str, lines: int) -> float:
    async with await Client.connect_unix(path) as client:
        session = await client.create_session()
        await client.run(session, "x = 1")
        t0 = time.perf_counter()
        _response, events = await client.run(session, f"for i in range({lines}):\n    print(i)")
        return len(events) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400, help="round trips per path")
    parser.add_argument("--cancels", type=int, default=40, help="cancels/timeouts per case")
    parser.add_argument("--lines", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5, help="events/s measurements")
    parser.add_argument("--base-src", help="an older source tree: its server measured too")
    parser.add_argument("--codecs", action="store_true",
                        help="also this server with the stdlib JSON codec, asyncio's loop, "
                             "the 5 ms switch interval")
    parser.add_argument("--switch-intervals", default="",
                        help="comma-separated GIL switch intervals (s): this server "
                             "measured with each too")
    parser.add_argument("--no-jupyter", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.cancels, args.lines, args.rounds = 100, 8, 2000, 2
    rng = random.Random(1234)
    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    # servers measured beside this one: name -> extra environment
    others: dict[str, dict] = {}
    if args.base_src:
        others["base tree"] = {"PYTHONPATH": os.path.abspath(args.base_src)}
    # `python -m` puts the working directory first on sys.path: an older tree
    # is only what runs if the server starts in it (in this checkout, its own
    # pyrepl3_ext would shadow the PYTHONPATH one)
    cwds = {"base tree": os.path.abspath(args.base_src)} if args.base_src else {}
    if args.base_src:  # and say so if it still would not
        import subprocess

        found = subprocess.run(
            [sys.executable, "-c", "import pyrepl3_ext; print(pyrepl3_ext.__file__)"],
            env=dict(os.environ, **others["base tree"]), cwd=cwds["base tree"],
            capture_output=True, text=True, check=True).stdout.strip()
        if not found.startswith(cwds["base tree"] + os.sep):
            parser.error(f"--base-src: the server would import {found}, not the base tree")
    if args.codecs:
        others["stdlib json"] = {"PYREPL3_JSON": "stdlib"}
        others["asyncio loop"] = {"PYREPL3_LOOP": "asyncio"}
        others["5 ms switch interval"] = {"PYREPL3_SWITCH_INTERVAL": "0.005"}
    for interval in filter(None, args.switch_intervals.split(",")):
        others[f"{float(interval) * 1e3:g} ms switch interval"] = \
            {"PYREPL3_SWITCH_INTERVAL": interval}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.sock")
        procs, raws, paths = [], {}, {"this server": path}
        try:
            for i, (name, env) in enumerate(others.items()):
                paths[name] = os.path.join(tmp, f"other{i}.sock")
                procs.append(ServerProcess("--unix", paths[name], env=dict(os.environ, **env),
                                           cwd=cwds.get(name)))
                raws[name] = Raw(paths[name])
            procs.append(ServerProcess("--unix", path))
            raw = Raw(path)
            info = raw.call("server.info")
            inproc = PyrepSession(raw, "in-process")
            proc = PyrepSession(raw, "process")
            engine, local = in_process_session()
            jup = None if args.no_jupyter else Jupyter()
            try:
                trips = {"unix, in-process session": inproc.round_trip,
                         "unix, process session": proc.round_trip,
                         "in process Session.execute": local}
                if jup:
                    trips["Jupyter kernel"] = jup.round_trip
                cases = {
                    "cancel loop: in-process": lambda: inproc.cancel(LOOP),
                    "cancel loop: process": lambda: proc.cancel(LOOP),
                    "cancel loop 900 deep: in-process": lambda: inproc.cancel(DEEP),
                    "cancel loop 900 deep: process": lambda: proc.cancel(DEEP),
                    "cancel time.sleep(100): process": lambda: proc.cancel(SLEEP),
                    "cancel await: in-process": lambda: inproc.cancel(AWAIT),
                    "cancel await: process": lambda: proc.cancel(AWAIT),
                    "timeout=: in-process": lambda: inproc.timeout(False),
                    "timeout=: process": lambda: proc.timeout(False),
                    "%%timeout: in-process": lambda: inproc.timeout(True),
                    "%%timeout: process": lambda: proc.timeout(True),
                }
                if jup:
                    cases["Jupyter interrupt loop"] = lambda: jup.cancel(LOOP)
                    cases["Jupyter interrupt 900 deep"] = lambda: jup.cancel(DEEP)
                for name, other in raws.items():
                    o_in, o_proc = PyrepSession(other, "in-process"), PyrepSession(other, "process")
                    trips[f"[{name}] unix, in-process session"] = o_in.round_trip
                    trips[f"[{name}] unix, process session"] = o_proc.round_trip
                    cases[f"[{name}] cancel loop: in-process"] = \
                        lambda o=o_in: o.cancel(LOOP)  # type: ignore[misc]
                    cases[f"[{name}] cancel loop: process"] = \
                        lambda o=o_proc: o.cancel(LOOP)  # type: ignore[misc]
                    cases[f"[{name}] cancel await: in-process"] = \
                        lambda o=o_in: o.cancel(AWAIT)  # type: ignore[misc]
                    cases[f"[{name}] timeout=: in-process"] = \
                        lambda o=o_in: o.timeout(False)  # type: ignore[misc]
                    cases[f"[{name}] timeout=: process"] = \
                        lambda o=o_proc: o.timeout(False)  # type: ignore[misc]
                for fn in trips.values():  # warm
                    for _ in range(30):
                        fn()
                batch = 20
                for _ in range(max(1, args.samples // batch)):
                    order = list(trips)
                    rng.shuffle(order)
                    for name in order:
                        for _ in range(batch):
                            add("trip: " + name, trips[name]())
                for fn in cases.values():  # warm (first tracebacks, imports)
                    fn()
                for _ in range(args.cancels):
                    order = list(cases)
                    rng.shuffle(order)
                    for name in order:
                        value = cases[name]()
                        if isinstance(value, tuple):  # a timeout: both counts
                            add(name + " (from request)", value[0])
                            add(name + " (from deadline)", value[1])
                        else:
                            add(name, value)
            finally:
                raw.close()
                for other in raws.values():
                    other.close()
                engine.close()
                if jup:
                    jup.close()
            for _ in range(args.rounds):
                order = list(paths)
                rng.shuffle(order)
                for name in order:
                    add("events/s: " + name, asyncio.run(event_rate(paths[name], args.lines)))
        finally:
            for server in procs:
                server.stop()

    out = {k: percentiles(v) for k, v in res.items() if not k.startswith("events/s")}
    for k, v in res.items():
        if k.startswith("events/s"):
            out[k] = {"median": statistics.median(v), "all": v}
    load = os.getloadavg()
    out["loadavg"] = load
    out["server_info"] = info
    print(f"pyrepl3 serve --unix ({info['build']} IPython {info['ipython']}, Python "
          f"{info['python']}, json: {info['json']}, loop: {info['event_loop']}), raw client; "
          f"{args.samples} round trips and {args.cancels} cancels/timeouts per row, "
          f"interleaved; load average {load[0]:.2f} {load[1]:.2f}")
    print(f"{'figure':<40}{'p50 ms':>9}{'p99 ms':>9}{'n':>6}")
    for k, v in sorted(out.items(), key=lambda kv: ("[" in kv[0], kv[0])):
        if isinstance(v, dict) and "p50_ms" in v:
            print(f"{k:<40}{v['p50_ms']:>9.3f}{v['p99_ms']:>9.3f}{v['n']:>6}")
    u = out["trip: unix, in-process session"]["p50_ms"]
    p = out["trip: unix, process session"]["p50_ms"]
    loc = out["trip: in process Session.execute"]["p50_ms"]
    print(f"round trip over in-process Session.execute at p50: in-process session "
          f"{u / loc:.2f}x ({u - loc:+.3f} ms), process session {p / loc:.2f}x "
          f"({p - loc:+.3f} ms); target <= 0.5 ms and <= 2x")
    c = out["cancel loop: in-process"]
    t = out["timeout=: in-process (from deadline)"]["p50_ms"]
    mt = out["%%timeout: in-process (from deadline)"]["p50_ms"]
    print(f"cancel -> response of a busy loop, in-process session: p50 {c['p50_ms']:.2f} / "
          f"p99 {c['p99_ms']:.2f} ms (target <= 2 / <= 10); deadline -> response: "
          f"timeout= {t:.2f}, %%timeout {mt:.2f} ms p50 (target <= 2)")
    if "trip: Jupyter kernel" in out:
        j = out["trip: Jupyter kernel"]["p50_ms"]
        jc = out["Jupyter interrupt loop"]["p50_ms"]
        c = out["cancel loop: in-process"]["p50_ms"]
        print(f"vs Jupyter at p50: round trip {j / u:.1f}x faster, "
              f"cancel of a loop {jc / c:.1f}x faster (in-process session)")
    for k, v in out.items():
        if k.startswith("events/s"):
            print(f"{k} (a cell printing {args.lines} lines): median {v['median']:,.0f} "
                  f"(of {len(v['all'])}: {', '.join(f'{x:,.0f}' for x in v['all'])})")
    print(f"wrote {write_results('server', out)}")


if __name__ == "__main__":
    main()
