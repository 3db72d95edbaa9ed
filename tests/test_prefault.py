"""Copy-on-write pre-faulting (``engine/prefault.py``): the pages a process
wrote while a fork of it lived are found, and copying them ahead means the
next writes to them do not fault.  Fault counts, not times: deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="pagemap and MADV_POPULATE_WRITE are Linux's")

SCRIPT = textwrap.dedent("""
    import ctypes, json, mmap, os, resource, signal, time
    from pyrepl3_ext.engine import prefault

    if not prefault.supported():
        print(json.dumps({"supported": False})); raise SystemExit
    PAGE = mmap.PAGESIZE
    area = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area[:] = b"a" * len(area)            # all present, all ours
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    written = [2, 5, 9, 10, 17, 21, 30, 33, 41, 50, 57, 60]  # scattered: no bulk run

    def sleeper():
        pid = os.fork()
        if pid == 0:
            time.sleep(60); os._exit(0)
        return pid

    def faults_writing(pages):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for p in pages:
            area[p * PAGE] = 98
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    first = sleeper()                      # everything shared with it now
    faults_writing([])                     # the interpreter's own pages, copied first
    cold = faults_writing(written)         # each write copies a page
    found = {(a - base) // PAGE for a, n in prefault.written_pages()
             for a in range(a, a + n * PAGE, PAGE) if base <= a < base + len(area)}
    second = sleeper()                     # shared again, with a newer copy
    copied = prefault.prefault([(base + p * PAGE, 1) for p in written])
    faults_writing([])
    warm = faults_writing(written)         # already ours: no fault
    for pid in (first, second):
        os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
    print(json.dumps({"supported": True, "cold": cold, "warm": warm, "copied": copied,
                      "found": sorted(found), "written": written}))
""")


def test_the_pages_written_since_a_fork_are_found_and_copied_ahead():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    if not result["supported"]:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux 5.14) or no pagemap")
    # every write to a shared page faults; after the copy ahead none does
    # (a few faults of the interpreter's own pages may come on top of both)
    assert result["cold"] >= len(result["written"])
    assert result["found"] == result["written"]  # exactly those, in this area
    assert result["copied"] == len(result["written"])
    assert result["warm"] < len(result["written"]) // 2, result
