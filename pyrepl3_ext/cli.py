"""The ``pyrepl3`` command: IPython with the pyrepl3_ext extension preloaded,
and ``pyrepl3 serve``, the protocol server (``server.py``).

Every argument other than ``--version``/``--help``/``serve`` goes to IPython
unchanged (``pyrepl3 -c "1 + 1"``, ``pyrepl3 --profile=work``,
``pyrepl3 script.py``), so the command is a drop-in ``ipython``.
"""

from __future__ import annotations

import sys
from typing import Any

HELP = """\
usage: pyrepl3 [--version] [--help] [IPYTHON-ARGS...]
       pyrepl3 serve (--stdio | --tcp HOST:PORT | --unix PATH) [options]
       pyrepl3 serve --mcp [--http 127.0.0.1:PORT] [options]
       pyrepl3 kernel install [--user] [--name NAME] [--policy P] [--timeout S]

IPython turned into a controllable execution engine: starts IPython with the
pyrepl3_ext extension loaded (execution events, cell timeouts and cancel,
%%timeout / %%transaction, %pyrepl3 to see the settings).

  --version, -V   print the pyrepl3, IPython and Python versions and exit
  --help, -h      this text; `ipython --help` lists the IPython arguments,
                  which pyrepl3 accepts unchanged
  serve           the JSON-RPC 2.0 protocol server (`pyrepl3 serve --help`);
                  with --mcp, the MCP server for LLM agents (`pyrepl3 serve --mcp
                  --help`, docs/agents.md)
  kernel install  a Jupyter kernelspec running ipykernel with the extension
                  loaded (`pyrepl3 kernel install --help`, docs/jupyter.md)

Settings: c.PyREPL3.<name> in ipython_config.py, or %config PyREPL3.<name>.
"""


def version_text() -> str:
    import platform

    import IPython

    from . import _compat
    from ._version import __version__

    build = "patched (multi-shell)" if _compat.is_patched_build() else "stock"
    return (f"pyrepl3 {__version__}\n"
            f"IPython {IPython.__version__} ({build})\n"
            f"Python {platform.python_version()}")


def serve_parser() -> "argparse.ArgumentParser":
    import argparse

    parser = argparse.ArgumentParser(
        prog="pyrepl3 serve",
        description="Serve pyrepl3 sessions over JSON-RPC 2.0, one JSON object per line "
                    "(docs/protocol.md; `--schema` prints every method).")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--stdio", action="store_true",
                       help="one client on stdin/stdout (cell output goes to stderr)")
    where.add_argument("--tcp", metavar="HOST:PORT",
                       help="listen on TCP (use 127.0.0.1; port 0 picks a free one); "
                            "clients must authenticate with the token")
    where.add_argument("--unix", metavar="PATH", help="listen on a unix socket (mode 0600)")
    where.add_argument("--schema", action="store_true",
                       help="print the protocol's JSON schema and exit")
    parser.add_argument("--token", help="the TCP token (default: generated and printed on "
                                        "stderr); also required on a unix socket if given. "
                                        "Or set PYREPL3_TOKEN")
    parser.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024,
                        help="longest request accepted (default 16 MiB)")
    parser.add_argument("--max-event-bytes", type=int, default=4 * 1024 * 1024,
                        help="events larger than this are truncated (default 4 MiB)")
    parser.add_argument("--auth-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="close a connection that has not authenticated this long "
                             "after it opened (TCP; a unix socket with --token; default 10)")
    parser.add_argument("--max-unauthenticated", type=int, default=64, metavar="N",
                        help="at most N connections may wait to authenticate at once; "
                             "more are refused and closed (default 64)")
    parser.add_argument("--files-root", metavar="DIR", action="append", default=[],
                        help="let clients grant sessions the files capability inside DIR "
                             "(repeatable; session.create's default root is "
                             "DIR/<session id>)")
    parser.add_argument("--snapshot-dir", metavar="DIR", default=None,
                        help="let clients save snapshots to signed files in DIR and load "
                             "them back (snapshot.save/snapshot.load), across sessions and "
                             "server restarts")
    parser.add_argument("--snapshot-key-file", metavar="PATH", default=None,
                        help="the key that signs those files (created 0600 if missing; "
                             "default: the per-user key, <ipython_dir>/pyrepl3/snapshot.key)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow --tcp on a non-loopback address")
    parser.add_argument("--isolation", choices=("in-process", "process"),
                        default="in-process",
                        help="where new sessions live unless session.create says: in the "
                             "server's process (dense, for trusted code) or each in a "
                             "supervised process of its own (docs/isolation.md)")
    parser.add_argument("--limits", metavar="KEY=VALUE,...", default=None,
                        help="process sessions: default resource limits, which are also "
                             "the most a client may ask for (memory, cpu_seconds, "
                             "cell_seconds, processes, open_files, file_size, output_bytes; "
                             "e.g. memory=512M,cell_seconds=60; 'none' for unlimited)")
    parser.add_argument("--confine", choices=("auto", "on", "off"), default="auto",
                        help="process sessions: OS confinement; auto (default): for the "
                             "restricted policy or when the client asks; on: always, a "
                             "client cannot turn it off; off: only when the client asks")
    parser.add_argument("--kill-grace", type=float, default=3.0, metavar="SECONDS",
                        help="process sessions: how long a cell may ignore a cancel before "
                             "its process is killed (default 3)")
    parser.add_argument("--shutdown-grace", type=float, default=None, metavar="SECONDS",
                        help="on SIGTERM/SIGINT or the end of stdio: how long cancelled "
                             "executions may take to end before they are answered as "
                             "cancelled and the server exits (default: kill grace + 2)")
    scale = parser.add_argument_group(
        "scale-out", "place sessions on a cluster's nodes (docs/scale-out.md); the server "
                     "becomes a gateway, clients see the same protocol")
    scale.add_argument("--placement", choices=("local", "ray"), default="local",
                       help="local (default): sessions live with this server; ray: each "
                            "session in a process on a Ray node chosen by Ray (needs "
                            "pip install 'pyrepl3[ray]')")
    scale.add_argument("--ray-address", metavar="ADDRESS", default=None,
                       help="the Ray cluster (default: $RAY_ADDRESS, else a running local "
                            "one); 'local' starts a Ray of this machine")
    scale.add_argument("--session-cpus", type=float, default=0.1, metavar="CPUS",
                       help="the CPUs Ray reserves for each session (default 0.1); its "
                            "memory limit is reserved as Ray memory")
    return parser


def mcp_parser() -> "argparse.ArgumentParser":
    import argparse

    parser = argparse.ArgumentParser(
        prog="pyrepl3 serve --mcp",
        description="Serve pyrepl3 sessions to LLM agents over the Model Context Protocol "
                    "(docs/agents.md). Everything a session may do is set here, by the "
                    "operator; agents only choose what to run.")
    parser.add_argument("--mcp", action="store_true", required=True, help="serve MCP")
    parser.add_argument("--stdio", action="store_true",
                        help="serve one client on stdin/stdout (the default)")
    parser.add_argument("--http", metavar="HOST:PORT",
                        help="serve the streamable HTTP transport at http://HOST:PORT/mcp "
                             "on a loopback address; clients send 'Authorization: Bearer "
                             "TOKEN'")
    parser.add_argument("--token", help="the HTTP bearer token (default: $PYREPL3_TOKEN, "
                                        "else generated and printed on stderr)")
    parser.add_argument("--policy", choices=("trusted", "guarded", "restricted"), default=None,
                        help="security policy of every session (default: trusted; "
                             "docs/security.md)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="cell timeout of every session; agents may ask for less, "
                             "never more (default: none)")
    parser.add_argument("--isolation", choices=("in-process", "process"), default="in-process",
                        help="where sessions live (docs/isolation.md; default in-process)")
    parser.add_argument("--limits", metavar="KEY=VALUE,...", default=None,
                        help="process sessions: resource limits, as for `pyrepl3 serve`")
    parser.add_argument("--confine", choices=("auto", "on", "off"), default="auto",
                        help="process sessions: OS confinement (as for `pyrepl3 serve`)")
    parser.add_argument("--kill-grace", type=float, default=3.0, metavar="SECONDS",
                        help="process sessions: seconds a cell may ignore a cancel before "
                             "its process is killed (default 3)")
    parser.add_argument("--max-sessions", type=int, default=8, metavar="N",
                        help="sessions open at once (default 8)")
    parser.add_argument("--max-output-chars", type=int, default=20_000, metavar="N",
                        help="longest text a tool returns; longer output keeps its head and "
                             "tail with a note of what was dropped (default 20000)")
    return parser


def serve_mcp(args: list[str]) -> int:
    import ipaddress
    import os

    options = mcp_parser().parse_args(args)
    try:
        from . import mcp_server
    except ImportError as exc:
        print(f"pyrepl3 serve --mcp needs the MCP SDK: pip install 'pyrepl3[mcp]' ({exc})",
              file=sys.stderr)
        return 2
    try:
        if options.timeout is not None and not options.timeout > 0:
            raise ValueError(f"--timeout must be positive, got {options.timeout}")
        if not options.kill_grace > 0:
            raise ValueError(f"--kill-grace must be positive, got {options.kill_grace}")
        if options.max_sessions < 1 or options.max_output_chars < 1000:
            raise ValueError("--max-sessions must be >= 1 and --max-output-chars >= 1000")
        limits = _parse_limits(options.limits)
        if options.isolation != "process" and (limits is not None or options.confine == "on"):
            raise ValueError("--limits and --confine on apply to --isolation process")
    except ValueError as exc:
        print(f"pyrepl3 serve --mcp: {exc}", file=sys.stderr)
        return 2
    settings = mcp_server.Settings(
        policy=options.policy, timeout=options.timeout, isolation=options.isolation,
        limits=limits, confine={"auto": None, "on": True, "off": False}[options.confine],
        kill_grace=options.kill_grace, max_sessions=options.max_sessions,
        max_output_chars=options.max_output_chars)
    if options.http is None:
        return mcp_server.run(settings)
    host, sep, port = options.http.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not port.isdigit() or not loopback:
        print(f"pyrepl3 serve --mcp: --http wants a loopback HOST:PORT (127.0.0.1:8000), "
              f"got {options.http!r}", file=sys.stderr)
        return 2
    token = options.token or os.environ.get("PYREPL3_TOKEN")
    if not token:
        from .server import new_token

        token = new_token()
        print(f"[pyrepl3 serve --mcp] token: {token}", file=sys.stderr, flush=True)
    print(f"[pyrepl3 serve --mcp] listening on http://{host}:{port}/mcp", file=sys.stderr,
          flush=True)
    return mcp_server.run(settings, http=(host, int(port)), token=token)


def serve(args: list[str]) -> int:
    import ipaddress
    import json
    import os

    from . import protocol, server

    if "--mcp" in args:
        return serve_mcp(args)
    options = serve_parser().parse_args(args)
    if options.schema:
        print(json.dumps(protocol.schema(), indent=2))
        return 0
    try:
        limits = server.Limits(max_message_bytes=options.max_message_bytes,
                               max_event_bytes=options.max_event_bytes,
                               auth_timeout=options.auth_timeout,
                               max_unauthenticated=options.max_unauthenticated)
        for root in options.files_root:
            if not os.path.isdir(root):
                raise ValueError(f"--files-root {root!r} is not a directory")
        if options.snapshot_dir is not None and not os.path.isdir(options.snapshot_dir):
            raise ValueError(f"--snapshot-dir {options.snapshot_dir!r} is not a directory")
        if not options.kill_grace > 0:
            raise ValueError(f"--kill-grace must be positive, got {options.kill_grace}")
        if options.shutdown_grace is not None and not options.shutdown_grace >= 0:
            raise ValueError(f"--shutdown-grace must be >= 0, got {options.shutdown_grace}")
        session_limits = _parse_limits(options.limits)
    except ValueError as exc:
        print(f"pyrepl3 serve: {exc}", file=sys.stderr)
        return 2
    if options.placement == "ray":
        if options.isolation != "in-process":
            print("pyrepl3 serve: --placement ray runs every session in a process of its "
                  "own on a node; --isolation does not apply", file=sys.stderr)
            return 2
        if not options.session_cpus > 0:
            print(f"pyrepl3 serve: --session-cpus must be positive, got "
                  f"{options.session_cpus}", file=sys.stderr)
            return 2
    engine_options = {"isolation": options.isolation, "kill_grace": options.kill_grace,
                      "shutdown_grace": options.shutdown_grace,
                      "snapshot_dir": options.snapshot_dir,
                      "snapshot_key_file": options.snapshot_key_file,
                      "session_limits": session_limits,
                      "confine": {"auto": None, "on": True, "off": False}[options.confine]}
    token = options.token or os.environ.get("PYREPL3_TOKEN") or None
    run = server.run
    if options.placement == "ray":
        try:
            run = _ray_gateway(options)
        except ImportError as exc:
            print(f"pyrepl3 serve: --placement ray needs Ray ({exc}): "
                  f"pip install 'pyrepl3[ray]'", file=sys.stderr)
            return 2
    if options.tcp:
        host, sep, port = options.tcp.rpartition(":")
        if not sep or not port.isdigit():
            print(f"pyrepl3 serve: --tcp wants HOST:PORT, got {options.tcp!r}", file=sys.stderr)
            return 2
        host = host.strip("[]") or "127.0.0.1"
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and not options.allow_remote:
            print(f"pyrepl3 serve: {host} is not a loopback address; pass --allow-remote "
                  f"to listen there (the token is then all that protects the sessions)",
                  file=sys.stderr)
            return 2
        if token is None:
            token = server.new_token()
            print(f"[pyrepl3 serve] token: {token}", file=sys.stderr, flush=True)
        return run("tcp", f"{host}:{port}", token=token, limits=limits,
                   files_roots=options.files_root, **engine_options)
    if options.unix:
        return run("unix", options.unix, token=token, limits=limits,
                   files_roots=options.files_root, **engine_options)
    return run("stdio", token=None, limits=limits, files_roots=options.files_root,
               **engine_options)


def _ray_gateway(options: Any) -> Any:
    """``server.run``'s counterpart for ``--placement ray``: connects to Ray
    (ImportError without it) and returns the function that serves the gateway."""
    import os

    from .scaleout import gateway
    from .scaleout.ray_placement import RayPlacement

    def run(transport: str, address: str | None = None, *, token: str | None,
            limits: Any, files_roots: list, isolation: str, kill_grace: float,
            shutdown_grace: float | None, snapshot_dir: str | None,
            snapshot_key_file: str | None, session_limits: Any, confine: Any) -> int:
        # the nodes read these paths: absolute, and on storage every node reaches
        absolute = (lambda path: os.path.abspath(path) if path else path)
        host_options = {"kill_grace": kill_grace, "confine": confine,
                        "session_limits": session_limits.as_dict() if session_limits else None,
                        "files_roots": [absolute(r) for r in files_roots],
                        "snapshot_dir": absolute(snapshot_dir),
                        "snapshot_key_file": absolute(snapshot_key_file),
                        "server_limits": limits.as_dict()}
        address_ = options.ray_address or os.environ.get("RAY_ADDRESS") or "auto"
        placement = RayPlacement(address_, session_cpus=options.session_cpus,
                                 host_options=host_options,
                                 log=lambda text: print(f"[pyrepl3 gateway] {text}",
                                                        file=sys.stderr, flush=True))
        return gateway.run(placement, transport, address, token=token, limits=limits,
                           shutdown_grace=kill_grace + 2.0 if shutdown_grace is None
                           else shutdown_grace)

    return run


def _parse_limits(text: str | None) -> object:
    """``--limits memory=512M,cell_seconds=60`` as ``Limits`` (None: not given)."""
    if text is None:
        return None
    from .engine.limits import Limits

    values: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--limits wants KEY=VALUE items, got {item!r}")
        values[key.strip()] = None if value.strip().lower() == "none" else value.strip()
    return Limits.parse(values)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        return serve(args[1:])
    if args[:1] == ["kernel"]:
        from .kernelspec import main as kernel_main

        return kernel_main(args[1:])
    if args[:1] in (["--version"], ["-V"]):
        print(version_text())
        return 0
    if args[:1] in (["--help"], ["-h"]):
        print(HELP, end="")
        return 0
    import IPython

    from IPython.terminal.ipapp import TerminalIPythonApp

    class PyREPL3TerminalApp(TerminalIPythonApp):
        """IPython's terminal app; its banner says which program this is unless
        the user's config files or command line set ``banner2``."""

        def init_banner(self) -> None:
            chosen = any("banner2" in self.config.get(section, {})
                         for section in ("InteractiveShell", "TerminalInteractiveShell"))
            if self.shell is not None and not chosen:
                self.shell.banner2 = banner()
            super().init_banner()

    # start_ipython's steps; --ext appends to the extensions the user's config loads
    app = PyREPL3TerminalApp.instance()
    app.initialize(["--ext=pyrepl3_ext", *args])
    app.start()
    return 0


def banner() -> str:
    """The line under IPython's banner: pyrepl3, its build, where to look."""
    from . import _compat
    from ._version import __version__

    build = "patched build, concurrent sessions" if _compat.is_patched_build() \
        else "stock IPython"
    return (f"pyrepl3 {__version__} ({build}): %pyrepl3 shows the settings; "
            f"%%timeout N and %%transaction as a cell's first line.\n")


if __name__ == "__main__":
    sys.exit(main())
