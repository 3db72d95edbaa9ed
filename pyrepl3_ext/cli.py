"""The ``pyrepl3`` command: IPython with the pyrepl3_ext extension preloaded.

Every argument other than ``--version``/``--help`` goes to IPython unchanged
(``pyrepl3 -c "1 + 1"``, ``pyrepl3 --profile=work``, ``pyrepl3 script.py``),
so the command is a drop-in ``ipython``.  The protocol server
(``pyrepl3 serve``) is added by the server work (issue 7).
"""

from __future__ import annotations

import sys

HELP = """\
usage: pyrepl3 [--version] [--help] [IPYTHON-ARGS...]

IPython turned into a controllable execution engine: starts IPython with the
pyrepl3_ext extension loaded (execution events, cell timeouts and cancel,
%%timeout / %%transaction, %pyrepl3 to see the settings).

  --version, -V   print the pyrepl3, IPython and Python versions and exit
  --help, -h      this text; `ipython --help` lists the IPython arguments,
                  which pyrepl3 accepts unchanged

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


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["--version"], ["-V"]):
        print(version_text())
        return 0
    if args[:1] in (["--help"], ["-h"]):
        print(HELP, end="")
        return 0
    import IPython

    # --ext appends to the extensions the user's own config loads
    IPython.start_ipython(argv=["--ext=pyrepl3_ext", *args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
