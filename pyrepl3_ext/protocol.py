"""The pyrepl3 wire protocol: JSON-RPC 2.0, one JSON object per line.

This module is the contract, with no I/O: the method and notification
schemas (JSON Schema, shipped as data so clients can read them with
``pyrepl3 serve --schema``), the error codes, request validation, and the
encoding of messages.  ``server.py`` does the transport and calls the
engine; ``client.py`` speaks the same protocol from the other end.

Validation implements the small subset of JSON Schema the schemas below use
(``type``, ``properties``, ``required``, ``additionalProperties: false``,
``enum``, ``minimum``, ``exclusiveMinimum``, ``minLength``, ``items``) by
hand: it runs on every request, and a general validator would be a
dependency and slower for no gain on schemas this small.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable

JSONRPC = "2.0"

# -- error codes --------------------------------------------------------------

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: Application errors (the JSON-RPC "server error" range).
UNKNOWN_SESSION = -32001
UNKNOWN_EXECUTION = -32002
SESSION_BUSY = -32003
SESSION_CLOSED = -32004
MESSAGE_TOO_LARGE = -32005
UNAUTHORIZED = -32006
CONCURRENCY_UNSUPPORTED = -32007
UNKNOWN_NAME = -32008
UNKNOWN_INPUT = -32009
NOT_AVAILABLE = -32010
SESSION_LOST = -32011

ERROR_CODES: dict[int, str] = {
    PARSE_ERROR: "the line is not valid JSON",
    INVALID_REQUEST: "the JSON is not a valid JSON-RPC 2.0 request",
    METHOD_NOT_FOUND: "no such method",
    INVALID_PARAMS: "the params do not match the method's schema",
    INTERNAL_ERROR: "the server failed while handling the request (a bug: please report it)",
    UNKNOWN_SESSION: "no open session with that id",
    UNKNOWN_EXECUTION: "no queued or running execution with that id",
    SESSION_BUSY: "the session is running a cell and the request asked not to queue",
    SESSION_CLOSED: "the session is closed or closing",
    MESSAGE_TOO_LARGE: "the message is longer than the server's limit",
    UNAUTHORIZED: "authenticate first: call `auth` with the server's token",
    CONCURRENCY_UNSUPPORTED: ("another session is running a cell and this IPython is "
                              "stock: sessions run one at a time (use the patched build)"),
    UNKNOWN_NAME: "no such name in the session's namespace (or snapshot)",
    UNKNOWN_INPUT: "no pending input request with that id",
    NOT_AVAILABLE: "this capability is not available in this build or session",
    SESSION_LOST: ("the session's process died (see the session.lost notification); "
                   "session.restart gives it a fresh one"),
}


class RPCError(Exception):
    """An error to send back as the response's ``error`` member."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict:
        error: dict = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


# -- schemas ------------------------------------------------------------------

_ID = {"type": "string", "minLength": 1, "maxLength": 200}
#: what ``session.create`` can grant
CAPABILITIES = ("files", "input")
#: the security presets (``security.policy.PRESETS``)
POLICIES = ("trusted", "guarded", "restricted")
#: where a session can live (``engine.ISOLATIONS``)
ISOLATIONS = ("in-process", "process")
_SESSION = {"session": {**_ID, "description": "the session id (from session.create)"}}
_NAME = {"type": "string", "minLength": 1, "maxLength": 200}
#: a snapshot file's name: letters, digits, ``._-``, not starting with a dot
#: (checked by the server: the schema subset has no ``pattern``)
_FILE = {"type": "string", "minLength": 1, "maxLength": 100}
FILE_NAME = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}"


def _params(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


#: Every method: its params (JSON Schema), what it returns, what it does.
METHODS: dict[str, dict] = {
    "auth": {
        "description": "Authenticate this connection (required first on TCP).",
        "params": _params({"token": {"type": "string", "maxLength": 1000}}, ("token",)),
        "result": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
    },
    "server.info": {
        "description": "Versions, build (stock or patched) and limits of this server.",
        "params": _params({}),
        "result": {"type": "object"},
    },
    "server.schema": {
        "description": "This schema: every method and notification.",
        "params": _params({}),
        "result": {"type": "object"},
    },
    "session.create": {
        "description": "Create an isolated session (one IPython shell) and return its id.",
        "params": _params({
            "session_id": _ID,
            "policy": {"type": "string", "enum": list(POLICIES),
                       "description": "security preset name"},
            "capabilities": {
                "type": "array",
                "description": "capabilities granted to the session's cells: \"input\" "
                               "(input() answered with input.reply, also under "
                               "restricted), {\"name\": \"files\", \"root\"?, "
                               "\"read_only\"?} (files confined to a directory the "
                               "server allows with --files-root; default root: "
                               "<first allowed root>/<session id>)",
                "items": {
                    "type": ["string", "object"],
                    "properties": {"name": {"type": "string", "enum": list(CAPABILITIES)},
                                   "root": {"type": "string", "minLength": 1},
                                   "read_only": {"type": "boolean"}},
                    "required": ["name"],
                    "additionalProperties": False,
                },
            },
            "timeout": {"type": "number", "exclusiveMinimum": 0,
                        "description": "default cell timeout in seconds"},
            "isolation": {"type": "string", "enum": list(ISOLATIONS),
                          "description": "in-process (a shell in the server's process) or "
                                         "process (a supervised process of its own); "
                                         "default: the server's --isolation"},
            "limits": {"type": "object",
                       "description": "process sessions: resource limits (memory, "
                                      "cpu_seconds, cell_seconds, processes, open_files, "
                                      "file_size, output_bytes; numbers or strings like "
                                      "\"512M\", \"30s\"; null = unlimited); "
                                      "docs/isolation.md"},
            "confine": {"type": "boolean",
                        "description": "process sessions: OS confinement (default: on for "
                                       "the restricted policy)"},
        }),
        "result": {"type": "object", "properties": {"session": _ID}},
    },
    "session.restart": {
        "description": "Give a lost process session a fresh process (same id, policy and "
                       "capabilities; an empty namespace, or a durable snapshot or a "
                       "snapshot file restored).  Through a gateway, a session lost with "
                       "its node is placed on another node.",
        "params": _params({**_SESSION, "snapshot": {
            **_NAME, "description": "a snapshot taken with durable: true, restored into "
                                    "the new process"}, "file": {
            **_FILE, "description": "a snapshot file of the server's --snapshot-dir "
                                    "(snapshot.save), restored into the new process"}},
            ("session",)),
        "result": {"type": "object", "properties": {"session": _ID}},
    },
    "session.close": {
        "description": "Close a session; a running cell is cancelled.",
        "params": _params(dict(_SESSION), ("session",)),
        "result": {"type": "object", "properties": {"closed": {"type": "boolean"}}},
    },
    "session.list": {
        "description": "The open sessions.",
        "params": _params({}),
        "result": {"type": "object", "properties": {"sessions": {"type": "array"}}},
    },
    "session.info": {
        "description": "A session's state: busy, running execution, execution count.",
        "params": _params(dict(_SESSION), ("session",)),
        "result": {"type": "object"},
    },
    "execute": {
        "description": ("Run code in a session. Its events stream as `execution.event` "
                        "notifications (correlated by execution_id), then this "
                        "request's response carries the final status."),
        "params": _params({
            **_SESSION,
            "code": {"type": "string"},
            "execution_id": _ID,
            "timeout": {"type": "number", "exclusiveMinimum": 0},
            "transaction": {"type": "boolean"},
            "queue": {"type": "boolean",
                      "description": "wait while the session is busy (default) or fail"},
            "store_history": {"type": "boolean"},
        }, ("session", "code")),
        "result": {"type": "object", "properties": {
            "execution_id": _ID,
            "status": {"enum": ["ok", "error", "cancelled"]},
            "execution_count": {"type": ["integer", "null"]},
            "error": {"type": ["object", "null"]},
        }},
    },
    "cancel": {
        "description": "Cancel a queued or running execution.",
        "params": _params({**_SESSION, "execution_id": _ID,
                           "reason": {"type": "string", "maxLength": 1000}},
                          ("session", "execution_id")),
        "result": {"type": "object", "properties": {
            "cancelled": {"type": "boolean"},
            "state": {"enum": ["dropped", "delivered", "pending", "escalated", "sent"],
                      "description": "dropped: it was queued and never runs; delivered: "
                                     "the cell got its exception; pending: armed, the cell "
                                     "raises at its next safe point (detail says what it "
                                     "waits for when known); escalated: raised from inside "
                                     "a blocking call; sent: to a process session, which "
                                     "interrupts the cell (killed after --kill-grace)"},
            "detail": {"type": "string"}}},
    },
    "input.reply": {
        "description": "Answer an `input_requested` event (or signal EOF).",
        "params": _params({**_SESSION, "input_id": _ID, "text": {"type": "string"},
                           "eof": {"type": "boolean"}}, ("session", "input_id")),
        "result": {"type": "object", "properties": {"delivered": {"type": "boolean"}}},
    },
    "namespace.get": {
        "description": "A variable's repr (and its value when it is JSON-serialisable).",
        "params": _params({**_SESSION, "name": _NAME}, ("session", "name")),
        "result": {"type": "object"},
    },
    "namespace.set": {
        "description": "Bind a name to a JSON value in the session's namespace.",
        "params": _params({**_SESSION, "name": _NAME, "value": {}},
                          ("session", "name", "value")),
        "result": {"type": "object"},
    },
    "namespace.delete": {
        "description": "Delete a name from the session's namespace.",
        "params": _params({**_SESSION, "name": _NAME}, ("session", "name")),
        "result": {"type": "object"},
    },
    "namespace.list": {
        "description": "The user's names (IPython's own are hidden) with their types.",
        "params": _params(dict(_SESSION), ("session",)),
        "result": {"type": "object"},
    },
    "snapshot.take": {
        "description": ("Take a named snapshot: in a process session a checkpoint (a paused "
                        "fork of the whole interpreter), in an in-process session a deep "
                        "copy of the namespace."),
        "params": _params({**_SESSION, "name": _NAME, "durable": {
            "type": "boolean",
            "description": "process sessions: a pickled snapshot instead of a checkpoint, "
                           "with a copy kept in the server (session.restart snapshot)"}},
                          ("session", "name")),
        "result": {"type": "object"},
    },
    "snapshot.restore": {
        "description": ("Restore a named snapshot (a checkpoint: the session continues from "
                        "a fresh copy of it, which can be restored again)."),
        "params": _params({**_SESSION, "name": _NAME}, ("session", "name")),
        "result": {"type": "object"},
    },
    "snapshot.delete": {
        "description": "Delete a named snapshot (a checkpoint's process ends).",
        "params": _params({**_SESSION, "name": _NAME}, ("session", "name")),
        "result": {"type": "object"},
    },
    "snapshot.save": {
        "description": "Write a snapshot (taken with snapshot.take) to a signed file in the "
                       "server's --snapshot-dir, where it outlives the session and the "
                       "server.",
        "params": _params({**_SESSION, "name": _NAME, "file": {
            **_FILE, "description": "the file's name in the snapshot directory "
                                    "(default: the snapshot's name)"}},
                          ("session", "name")),
        "result": {"type": "object"},
    },
    "snapshot.load": {
        "description": "Verify a signed file of the server's --snapshot-dir and hold it as "
                       "a snapshot of the session (then snapshot.restore, or restore: true).",
        "params": _params({**_SESSION, "file": _FILE, "name": {
            **_NAME, "description": "the snapshot's name (default: the one it was saved "
                                    "under)"}, "restore": {
            "type": "boolean", "description": "also restore it now"}},
                          ("session", "file")),
        "result": {"type": "object"},
    },
}

#: Notifications the server sends (never requests; no response expected).
NOTIFICATIONS: dict[str, dict] = {
    "server.shutdown": {
        "description": ("The server is stopping (SIGTERM/SIGINT, or the end of stdio): "
                        "every execution in flight is cancelled and answered, new "
                        "requests are refused (-32004), then the connection closes."),
        "params": {"type": "object", "properties": {"reason": {"type": "string"}}},
    },
    "session.lost": {
        "description": ("A process session's process died: kind names the cause "
                        "(crashed, oom, cpu_limit, killed, exited), message says it in "
                        "words. Its running execution ended with an error event of that "
                        "kind; session.restart gives it a fresh process."),
        "params": {"type": "object", "properties": {
            "session": _ID, "kind": {"type": "string"}, "message": {"type": "string"},
        }},
    },
    "execution.event": {
        "description": ("One execution event (docs/events.md): started, output, display, "
                        "input_requested, result, error, finished. `seq` is gapless "
                        "per execution; all output precedes result/error."),
        "params": {"type": "object", "properties": {
            "session": _ID, "execution_id": _ID,
            "event": {"type": "object", "required": ["type", "execution_id", "seq"]},
        }},
    },
}


def schema() -> dict:
    """The whole protocol as one JSON-serialisable document."""
    return {"protocol": "pyrepl3", "jsonrpc": JSONRPC, "framing": "one JSON object per line",
            "methods": METHODS, "notifications": NOTIFICATIONS,
            "errors": {str(code): text for code, text in ERROR_CODES.items()}}


# -- validation ---------------------------------------------------------------

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                         and math.isfinite(v)),
    "null": lambda v: v is None,
}


def check(value: Any, spec: dict, where: str) -> None:
    """Raise ``RPCError(INVALID_PARAMS)`` naming the first mismatch."""
    kind = spec.get("type")
    if kind is not None and not (_TYPES[kind](value) if isinstance(kind, str)
                                 else any(_TYPES[k](value) for k in kind)):
        kinds = [kind] if isinstance(kind, str) else kind
        raise RPCError(INVALID_PARAMS, f"{where} must be {' or '.join(kinds)}, "
                                       f"got {type(value).__name__}")
    if "enum" in spec and value not in spec["enum"]:
        raise RPCError(INVALID_PARAMS, f"{where} must be one of {spec['enum']}, got {value!r}")
    if isinstance(value, str):
        if len(value) < spec.get("minLength", 0):
            raise RPCError(INVALID_PARAMS, f"{where} must not be empty")
        if "maxLength" in spec and len(value) > spec["maxLength"]:
            raise RPCError(INVALID_PARAMS, f"{where} is longer than {spec['maxLength']} characters")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "exclusiveMinimum" in spec and not value > spec["exclusiveMinimum"]:
            raise RPCError(INVALID_PARAMS, f"{where} must be > {spec['exclusiveMinimum']}")
        if "minimum" in spec and value < spec["minimum"]:
            raise RPCError(INVALID_PARAMS, f"{where} must be >= {spec['minimum']}")
    if isinstance(value, list) and "items" in spec:
        for i, item in enumerate(value):
            check(item, spec["items"], f"{where}[{i}]")
    if isinstance(value, dict) and "properties" in spec:
        props = spec["properties"]
        for name in spec.get("required", ()):
            if name not in value:
                raise RPCError(INVALID_PARAMS, f"{where} is missing {name!r}")
        for name, item in value.items():
            if name in props:
                check(item, props[name], f"{where}.{name}" if where != "params" else name)
            elif spec.get("additionalProperties", True) is False:
                raise RPCError(INVALID_PARAMS, f"unknown parameter {name!r} "
                                               f"(expected: {', '.join(props) or 'none'})")


class Request:
    """A parsed request (``id`` is None for a notification)."""

    __slots__ = ("id", "method", "params")

    def __init__(self, id_: Any, method: str, params: dict):
        self.id = id_
        self.method = method
        self.params = params

    @property
    def is_notification(self) -> bool:
        return self.id is None


def parse(line: bytes | str) -> Request:
    """Parse and validate one line; raises ``RPCError`` with the id when known.

    The raised error carries ``.request_id`` so the caller can answer the
    right request (None when the id itself could not be read), and
    ``.notification``: True when the message was a well-formed notification,
    which gets no answer, error or not.
    """
    try:
        message = decode(line)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _with_id(RPCError(PARSE_ERROR, f"parse error: {exc}"), None) from None
    if not isinstance(message, dict):
        raise _with_id(RPCError(INVALID_REQUEST, "a request must be a JSON object"
                                " (batches are not supported)"), None)
    id_ = message.get("id")
    if not (id_ is None or isinstance(id_, str)
            or (isinstance(id_, (int, float)) and not isinstance(id_, bool))):
        raise _with_id(RPCError(INVALID_REQUEST, "id must be a string, a number or absent"),
                       None)
    if id_ is not None and not valid_id(id_):
        # not echoed: NaN/Infinity are not JSON, and an id is not a payload
        raise _with_id(RPCError(INVALID_REQUEST, f"id must be a string of at most "
                                                 f"{MAX_ID_LENGTH} characters or a finite "
                                                 f"number (at most 30 digits)"), None)
    if message.get("jsonrpc") != JSONRPC:
        raise _with_id(RPCError(INVALID_REQUEST, 'jsonrpc must be "2.0"'), id_)
    method = message.get("method")
    if not isinstance(method, str):
        raise _with_id(RPCError(INVALID_REQUEST, "method must be a string"), id_)
    extra = set(message) - {"jsonrpc", "id", "method", "params"}
    if extra:
        raise _with_id(RPCError(INVALID_REQUEST, f"unknown member(s) {sorted(extra)}"), id_)
    # from here on the message is a well-formed request object: without an
    # id it is a notification, and a notification is never answered, not
    # even with an error (JSON-RPC 2.0, section 4.1)
    notification = id_ is None
    spec = METHODS.get(method)
    if spec is None:
        raise _with_id(RPCError(METHOD_NOT_FOUND, f"unknown method {method[:100]!r}",
                                {"methods": sorted(METHODS)}), id_, notification)
    params = message.get("params", {})
    if isinstance(params, list):
        raise _with_id(RPCError(INVALID_PARAMS, "params must be an object (by-name)"), id_,
                       notification)
    try:
        check(params, spec["params"], "params")
    except RPCError as exc:
        raise _with_id(exc, id_, notification) from None
    return Request(id_, method, params)


def leading_id(prefix: bytes) -> Any:
    """The ``id`` of a request that is too long to parse, read from its start.

    Members are read in order from the top-level object until ``id``, a
    nested value or the end of ``prefix``; clients (ours included) put the
    id before ``params``, so a refused request can still be answered with its
    own id.  None when the prefix does not allow it.
    """
    text = prefix[:4096].decode("utf-8", "ignore")
    decoder = json.JSONDecoder()
    at = len(text) - len(text.lstrip())
    if not text.startswith("{", at):
        return None
    at += 1
    while True:
        at += len(text[at:]) - len(text[at:].lstrip())
        try:
            key, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        rest = text[at:].lstrip()
        if not isinstance(key, str) or not rest.startswith(":"):
            return None
        at = len(text) - len(rest) + 1
        at += len(text[at:]) - len(text[at:].lstrip())
        if text[at:at + 1] in ("{", "["):
            return None  # a nested value (params) before the id
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        rest = text[at:].lstrip()
        if not rest.startswith((",", "}")):
            return None  # the value may be cut short by the end of the prefix
        if key == "id":
            return value if valid_id(value) else None
        if not rest.startswith(","):
            return None
        at = len(text) - len(rest) + 1


def valid_id(id_: Any) -> bool:
    """A request id the server echoes: a string of at most 200 characters or a
    finite number (JSON has no NaN/Infinity; an id is not a payload)."""
    if isinstance(id_, str):
        return len(id_) <= MAX_ID_LENGTH
    if isinstance(id_, bool):
        return False
    if isinstance(id_, int):
        return abs(id_) < 10 ** 30
    return isinstance(id_, float) and math.isfinite(id_)


#: the longest string id the server accepts (and so echoes)
MAX_ID_LENGTH = 200


def _with_id(error: RPCError, id_: Any, notification: bool = False) -> RPCError:
    error.request_id = id_  # type: ignore[attr-defined]
    #: the error belongs to a well-formed notification: it is not sent
    error.notification = notification  # type: ignore[attr-defined]
    return error


# -- encoding -----------------------------------------------------------------

def _default(value: Any) -> Any:
    return repr(value)  # events are JSON already; never fail on a stray object


def _encode_stdlib(message: dict) -> bytes:
    return (json.dumps(message, ensure_ascii=False, separators=(",", ":"),
                       default=_default) + "\n").encode("utf-8", "surrogatepass")


def _orjson_encoder() -> Callable[[dict], bytes] | None:
    """``orjson`` when installed (the ``fast`` extra) and not turned off with
    ``PYREPL3_JSON=stdlib``: every message the server writes is encoded, an
    event costs 6.5 us with the stdlib and 0.3 us with orjson (docs/protocol.md).
    What it cannot write as the stdlib does (a lone surrogate, an integer
    beyond 64 bits, a non-string key) falls back to the stdlib; datetimes and
    dataclasses go to the same ``repr`` default as there."""
    if os.environ.get("PYREPL3_JSON", "").lower() == "stdlib":
        return None
    try:
        import orjson
    except ImportError:
        return None
    dumps, failure = orjson.dumps, orjson.JSONEncodeError
    option = (orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATETIME
              | orjson.OPT_PASSTHROUGH_DATACLASS)

    def encode_fast(message: dict) -> bytes:
        try:
            return dumps(message, default=_default, option=option)
        except failure:
            return _encode_stdlib(message)

    return encode_fast


#: ``encode(message) -> bytes``: one JSON line
encode: Callable[[dict], bytes] = _orjson_encoder() or _encode_stdlib

#: a run of digits that may be an integer beyond 64 bits, which orjson reads
#: as a float where the stdlib keeps it exact (a 30-digit request id)
_LONG_DIGITS = re.compile(rb"\d{19}")


def _orjson_decoder() -> Callable[[bytes | str], Any] | None:
    """``orjson.loads`` when it reads ``line`` as the stdlib does, else the stdlib.

    A request is parsed on the loop, and for a cancel while a cell computes
    that is the loop's first work after it wins the GIL back, when every
    step runs cold: the stdlib's ``json.loads`` (its Python layers, the
    encoding detection of bytes) took 0.1 ms of the parse there.  The
    stdlib stays the authority: whatever orjson refuses (NaN, a lone
    surrogate escape, a BOM, a number beyond a double) or may read
    differently (a run of 19 digits: a long integer) is parsed by the
    stdlib, so the result and the error messages are the stdlib's."""
    if encode is _encode_stdlib:  # PYREPL3_JSON=stdlib, or no orjson
        return None
    import orjson

    loads, failure, long_digits = orjson.loads, orjson.JSONDecodeError, _LONG_DIGITS.search

    def decode_fast(line: bytes | str) -> Any:
        if type(line) is bytes and long_digits(line) is None:
            try:
                return loads(line)
            except failure:
                pass
        return json.loads(line)

    return decode_fast


#: ``decode(line) -> value``: the stdlib's ``json.loads``, sped up by orjson when installed
decode: Callable[[bytes | str], Any] = _orjson_decoder() or json.loads
#: which codec ``encode`` is (``server.info`` reports it)
CODEC = "stdlib" if encode is _encode_stdlib else "orjson"


def response(id_: Any, result: Any) -> dict:
    return {"jsonrpc": JSONRPC, "id": id_, "result": result}


def error_response(id_: Any, error: RPCError) -> dict:
    return {"jsonrpc": JSONRPC, "id": id_, "error": error.to_json()}


def notification(method: str, params: dict) -> dict:
    return {"jsonrpc": JSONRPC, "method": method, "params": params}
