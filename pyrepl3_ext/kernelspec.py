"""``pyrepl3 kernel install``: a Jupyter kernelspec for ipykernel with pyrepl3_ext loaded.

Why: a JupyterHub or notebook user should get timeouts, cancel and the
security policy by picking a kernel, not by remembering ``%load_ext``. The
spec runs ipykernel (``python -m pyrepl3_ext.kernelspec``, see ``launch``)
with *this* interpreter (so the patched IPython build when pyrepl3 was
installed with it), ``--ext=pyrepl3_ext``, and the operator's settings as
``--PyREPL3.<name>=<value>`` traitlets options; a user's
``ipython_config.py`` still applies underneath.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

DEFAULT_NAME = "pyrepl3"


def kernel_spec(*, display_name: str, policy: str | None = None,
                timeout: float | None = None, python: str | None = None) -> dict:
    """The ``kernel.json`` content."""
    argv = [python or sys.executable, "-m", "pyrepl3_ext.kernelspec", "-f", "{connection_file}",
            "--ext=pyrepl3_ext"]
    if policy is not None:
        argv.append(f"--PyREPL3.security_policy={policy}")
    if timeout is not None:
        argv.append(f"--PyREPL3.cell_timeout={timeout:g}")
    return {"argv": argv, "display_name": display_name, "language": "python",
            "interrupt_mode": "signal", "metadata": {"debugger": True, "pyrepl3": {
                "policy": policy, "timeout": timeout}}}


def install(*, name: str = DEFAULT_NAME, display_name: str | None = None, user: bool = False,
            prefix: str | None = None, policy: str | None = None,
            timeout: float | None = None) -> str:
    """Write the kernelspec and return the directory it went to (jupyter_client
    chooses it: the user's data dir with ``user``, ``prefix``'s
    ``share/jupyter/kernels``, else the system-wide one)."""
    from jupyter_client.kernelspec import KernelSpecManager

    if display_name is None:
        settings = ", ".join(part for part in (policy, f"{timeout:g} s timeout"
                                                if timeout is not None else None) if part)
        display_name = f"Python 3 (pyrepl3{': ' + settings if settings else ''})"
    spec = kernel_spec(display_name=display_name, policy=policy, timeout=timeout)
    source = tempfile.mkdtemp(prefix="pyrepl3-kernelspec-")
    try:
        with open(os.path.join(source, "kernel.json"), "w", encoding="utf-8") as file:
            json.dump(spec, file, indent=1)
        _copy_logos(source)
        return KernelSpecManager().install_kernel_spec(source, name, user=user, prefix=prefix)
    finally:
        shutil.rmtree(source, ignore_errors=True)


def _copy_logos(target: str) -> None:
    """ipykernel's Python logos, when it ships them (the launcher looks them up by name)."""
    try:
        from ipykernel.kernelspec import RESOURCES
    except ImportError:
        return
    for logo in ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg"):
        path = os.path.join(RESOURCES, logo)
        if os.path.isfile(path):
            shutil.copy(path, target)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrepl3 kernel install",
        description="Install a Jupyter kernelspec that starts ipykernel on this Python with "
                    "pyrepl3_ext loaded (docs/jupyter.md). `jupyter kernelspec list` shows it.")
    parser.add_argument("--user", action="store_true",
                        help="install for the current user instead of system-wide")
    parser.add_argument("--prefix", metavar="DIR",
                        help="install under DIR/share/jupyter/kernels (e.g. a virtualenv)")
    parser.add_argument("--sys-prefix", action="store_true",
                        help=f"install into this Python's prefix ({sys.prefix})")
    parser.add_argument("--name", default=DEFAULT_NAME,
                        help=f"the kernelspec's name (default {DEFAULT_NAME})")
    parser.add_argument("--display-name", help="the name notebooks show (default says "
                                               "pyrepl3 and the settings)")
    parser.add_argument("--policy", choices=("trusted", "guarded", "restricted"),
                        help="the security policy of every kernel started from this spec "
                             "(default: trusted; docs/security.md)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="cell timeout of every kernel started from this spec "
                             "(%%%%timeout sets one cell's)")
    return parser


def main(args: list[str]) -> int:
    """``pyrepl3 kernel install ...``"""
    if args[:1] != ["install"]:
        print("usage: pyrepl3 kernel install [--user | --prefix DIR | --sys-prefix] "
              "[--name NAME] [--policy P] [--timeout S]", file=sys.stderr)
        return 2
    options = parser().parse_args(args[1:])
    if sum((options.user, options.prefix is not None, options.sys_prefix)) > 1:
        print("pyrepl3 kernel install: choose one of --user, --prefix, --sys-prefix",
              file=sys.stderr)
        return 2
    if options.timeout is not None and not options.timeout > 0:
        print(f"pyrepl3 kernel install: --timeout must be positive, got {options.timeout}",
              file=sys.stderr)
        return 2
    try:
        import ipykernel  # noqa: F401  - the spec is useless without it
        import jupyter_client  # noqa: F401
    except ImportError as exc:
        print(f"pyrepl3 kernel install needs ipykernel: pip install 'pyrepl3[jupyter]' ({exc})",
              file=sys.stderr)
        return 2
    try:
        where = install(name=options.name, display_name=options.display_name,
                        user=options.user,
                        prefix=sys.prefix if options.sys_prefix else options.prefix,
                        policy=options.policy, timeout=options.timeout)
    except (OSError, ValueError) as exc:
        print(f"pyrepl3 kernel install: {exc}", file=sys.stderr)
        return 1
    print(f"Installed kernelspec {options.name} in {where}")
    return 0


def launch() -> None:
    """The kernel's entry point: ipykernel's own, after resolving the temporary
    directory. ipykernel names each cell's code after a file in it and asks
    ``tempfile`` lazily, at the first cell, when a ``guarded``/``restricted``
    policy's audit scope is already active and refuses the probe file
    ``tempfile`` writes: every cell would fail. Asked here, before any cell,
    the answer is cached."""
    import tempfile

    tempfile.gettempdir()
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    launch()
