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

import array
import base64
import json
import os
import socket
import struct
import threading
from typing import Any, Sequence

#: The largest frame either side accepts (an event is cut long before this).
MAX_FRAME = 64 * 1024 * 1024

_HEADER = struct.Struct(">I")
#: The most descriptors held for messages that have not claimed them yet.
MAX_PENDING_FDS = 8
_ANCILLARY = socket.CMSG_SPACE(MAX_PENDING_FDS * array.array("i").itemsize)


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
    """One end of a session channel (thread-safe sends, one reader).

    A message may carry file descriptors (a checkpoint's channel): the
    sender names how many in ``"fds"``, they travel as ``SCM_RIGHTS`` with
    its frame, and :meth:`recv` hands them over in ``message["fds"]``.  The
    reader keeps at most :data:`MAX_PENDING_FDS` descriptors nobody has
    claimed (a peer that sends more has the extra ones closed).
    """

    def __init__(self, sock: socket.socket, *, max_frame: int = MAX_FRAME):
        self.sock = sock
        self.max_frame = max_frame
        self._send_lock = threading.Lock()
        self._closed = False
        # buffered: a burst of frames (a cell's events) costs one read, not two per frame
        self._buffer = bytearray()
        self._fds: list[int] = []

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    @classmethod
    def pair(cls) -> tuple["Channel", "Channel"]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def buffered(self) -> bool:
        """Whether bytes already read wait here (a ``select`` on the socket misses them)."""
        return bool(self._buffer)

    def send(self, message: dict, fds: Sequence[int] = ()) -> None:
        """Send one message (with ``fds``, if any); ``OSError`` when the other end is gone."""
        if fds:
            message = {**message, "fds": len(fds)}
        frame = encode(message)
        with self._send_lock:
            if fds:
                sent = self.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    array.array("i", fds))])
                if sent < len(frame):
                    self.sock.sendall(frame[sent:])
            else:
                self.sock.sendall(frame)

    def _fill(self) -> bool:
        """Read what is there (at least one byte); False at end of stream."""
        data, ancillary, _flags, _addr = self.sock.recvmsg(1 << 16, _ANCILLARY)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        while len(self._fds) > MAX_PENDING_FDS:  # unclaimed: never let a peer fill our table
            os.close(self._fds.pop(0))
        if not data:
            return False
        self._buffer += data
        return True

    def recv(self) -> dict | None:
        """The next message, or ``None`` at end of stream."""
        try:
            while len(self._buffer) < _HEADER.size:
                if not self._fill():
                    return None
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > self.max_frame:
                raise ChannelError(f"frame of {size} bytes exceeds the limit of {self.max_frame}")
            end = _HEADER.size + size
            while len(self._buffer) < end:
                if not self._fill():
                    return None
        except (ConnectionResetError, OSError):
            return None
        body = bytes(self._buffer[_HEADER.size:end])
        del self._buffer[:end]
        message = decode(body)
        wanted = message.get("fds")
        if wanted:
            count = wanted if isinstance(wanted, int) and 0 < wanted <= MAX_PENDING_FDS else 0
            message["fds"], self._fds = self._fds[:count], self._fds[count:]
        return message

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def detach(self) -> None:
        """Forget the socket without touching it (a forked copy that must leave
        its parent's connection alone: no shutdown, only its own descriptor)."""
        self._closed = True
        self.sock.close()
