"""Copy-on-write pre-faulting: a cell after a checkpoint without the page copies.

After a fork, the first write to each page shared with the copy faults and
copies that page.  A trivial cell (``x = 1``) writes some 750 pages of an
IPython session (reference counts, the history, the event machinery), about
2 ms of faults on this project's VM: most of what a transaction cell costs.
A standby checkpoint (``worker.py``) is forked while the session is idle;
this module then copies, still while idle, the pages the session wrote
during its last cells, so the next cell finds them already its own.

Which pages: those a session process maps *exclusively* while a checkpoint
forked before its last cell is still alive are the pages it wrote since
(``/proc/self/pagemap``, bit 56), plus pages it allocated since.  Long runs
of them are bulk data a cell rewrote (an array, a buffer): skipped, since
copying them ahead would cost what it saves and double their memory for as
long as the checkpoint lives.  What stays is bounded by ``MAX_PAGES``.

The copy is ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14): a write fault on
each page without writing anything.  Where that or the pagemap is missing,
``supported()`` is False and a standby checkpoint only saves the fork.
Nothing here changes what a session computes; it only moves page copies
out of the cell's way.
"""

from __future__ import annotations

import ctypes
import os
import re

#: madvise advice: populate writable page tables, breaking copy-on-write
MADV_POPULATE_WRITE = 23
#: a run of written pages longer than this is bulk data, not machinery
MAX_RUN_PAGES = 16
#: at most this many pages are copied ahead (16 MiB)
MAX_PAGES = 4096

_PAGE = os.sysconf("SC_PAGE_SIZE")
# the top byte of a little-endian pagemap entry: bit 63 present, bit 56 exclusive
_HOT = bytes(0x31 if byte & 0x81 == 0x81 else 0x30 for byte in range(256))
_RUN = re.compile(rb"1+")
_supported: bool | None = None
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise = fn
    return _madvise


def supported() -> bool:
    """Whether this kernel and process can pre-fault (probed once)."""
    global _supported
    if _supported is None:
        _supported = _probe()
    return _supported


def _probe() -> bool:
    import mmap

    try:
        with open("/proc/self/pagemap", "rb"):
            pass
        scratch = mmap.mmap(-1, _PAGE)
    except OSError:
        return False
    view = ctypes.c_char.from_buffer(scratch)
    try:
        ok = _libc_madvise()(ctypes.addressof(view), _PAGE, MADV_POPULATE_WRITE) == 0
    finally:
        del view  # the buffer export, or the mmap cannot close
        scratch.close()
    return ok


def _writable_private_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of this process's private writable mappings."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            perms = fields[1]
            if perms[1] != "w" or perms[3] != "p":
                continue
            if len(fields) > 5 and fields[5].startswith("[v"):  # [vvar], [vdso]
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def written_pages() -> list[tuple[int, int]]:
    """Runs ``(address, pages)`` this process maps exclusively, bulk runs left
    out, at most ``MAX_PAGES`` pages in all (the first found: low addresses,
    where the interpreter's heap and its first arenas are)."""
    runs: list[tuple[int, int]] = []
    total = 0
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        for start, end in _writable_private_mappings():
            pages = (end - start) // _PAGE
            entries = os.pread(fd, pages * 8, (start // _PAGE) * 8)
            flags = entries[7::8].translate(_HOT)
            for match in _RUN.finditer(flags):
                length = match.end() - match.start()
                if length > MAX_RUN_PAGES:
                    continue
                runs.append((start + match.start() * _PAGE, length))
                total += length
                if total >= MAX_PAGES:
                    return runs
    finally:
        os.close(fd)
    return runs


def prefault(runs: list[tuple[int, int]]) -> int:
    """Copy these pages now; the number copied (a run that is gone is skipped)."""
    madvise = _libc_madvise()
    done = 0
    for address, pages in runs:
        if madvise(address, pages * _PAGE, MADV_POPULATE_WRITE) == 0:
            done += pages
    return done
