"""The wire between the engine and a session process: framed JSON, nothing executable.

A :class:`Channel` wraps one end of a ``socketpair``.  Each message is a
JSON object, UTF-8, preceded by its length as 4 big-endian bytes.  JSON and
not pickle because the other end may be running hostile code: whatever a
worker sends, the parent only ever parses data (a pickle could make the
parent call anything).  Bytes, which JSON lacks, travel as
``{"__bytes__": "<base64>"}``.

Invariants:

* ``send`` is atomic per message (one lock): frames of two threads never
  interleave;
* ``recv`` returns ``None`` only at end of stream (the other process closed
  its end or died), and raises :class:`ChannelError` for a frame that is too
  large, not JSON, or not an object (the parent treats that as a broken
  worker, never as data);
* a frame larger than ``max_frame`` is refused on both sides, so a worker
  cannot make the parent allocate without bound.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
from typing import Any

#: The largest frame either side accepts (an event is cut long before this).
MAX_FRAME = 64 * 1024 * 1024

_HEADER = struct.Struct(">I")


class ChannelError(Exception):
    """The other end sent something that is not a message of this protocol."""


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} cannot cross the session channel")


def _hook(obj: dict) -> Any:
    if len(obj) == 1 and "__bytes__" in obj:
        data = obj["__bytes__"]
        if not isinstance(data, str):
            raise ChannelError("malformed bytes value")
        return base64.b64decode(data.encode("ascii"), validate=True)
    return obj


def encode(message: dict) -> bytes:
    """One frame: length header and the JSON body."""
    body = json.dumps(message, default=_default, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8", "surrogatepass")
    if len(body) > MAX_FRAME:
        raise ChannelError(f"message of {len(body)} bytes exceeds the channel's "
                           f"limit of {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict:
    # the hook costs a call per JSON object: only frames carrying bytes need it
    hook = _hook if b'"__bytes__"' in body else None
    try:
        message = json.loads(body.decode("utf-8", "surrogatepass"), object_hook=hook)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChannelError(f"not a JSON message: {exc}") from None
    if not isinstance(message, dict):
        raise ChannelError(f"a message must be a JSON object, got {type(message).__name__}")
    return message


class Channel:
    """One end of a session channel (thread-safe sends, one reader)."""

    def __init__(self, sock: socket.socket, *, max_frame: int = MAX_FRAME):
        self.sock = sock
        self.max_frame = max_frame
        self._send_lock = threading.Lock()
        self._closed = False
        # buffered: a burst of frames (a cell's events) costs one read, not two per frame
        self._reader = sock.makefile("rb", buffering=1 << 16)

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    @classmethod
    def pair(cls) -> tuple["Channel", "Channel"]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: dict) -> None:
        """Send one message; ``OSError`` when the other end is gone."""
        frame = encode(message)
        with self._send_lock:
            self.sock.sendall(frame)

    def _read_exact(self, size: int) -> bytes | None:
        data = self._reader.read(size)
        if data is None or len(data) < size:  # end of stream mid-frame: the peer is gone
            return None
        return data

    def recv(self) -> dict | None:
        """The next message, or ``None`` at end of stream."""
        try:
            header = self._read_exact(_HEADER.size)
        except (ConnectionResetError, OSError):
            return None
        if header is None:
            return None
        (size,) = _HEADER.unpack(header)
        if size > self.max_frame:
            raise ChannelError(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
        try:
            body = self._read_exact(size)
        except (ConnectionResetError, OSError):
            return None
        if body is None:
            return None
        return decode(body)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.close()
        self.sock.close()
