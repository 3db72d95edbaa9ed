"""The ``PyREPL3`` traitlets configurable: every setting of the extension.

Set them in ``ipython_config.py`` (``c.PyREPL3.cell_timeout = 30``) or at
run time (``%config PyREPL3.cell_timeout = 30``).  One configurable per shell
is created on load and listed in ``shell.configurables`` so ``%config`` finds
it.  Settings are grouped by the capability that reads them; a capability
module adds its group here rather than inventing its own section.
"""

from __future__ import annotations

from traitlets import Bool, Enum, Float, Int, TraitError, Unicode, validate

from traitlets import Bool, Enum, Float, TraitError, Unicode, validate
from traitlets.config import Configurable


class PyREPL3(Configurable):
    """Settings of the pyrepl3 extension (execution events, cancellation, I/O, security)."""

    # -- session and events ------------------------------------------------
    session_id = Unicode(
        "",
        help="Name of this shell's session in every execution event. Empty: "
             "a random id is generated when the extension loads.",
    ).tag(config=True)

    event_log = Unicode(
        "",
        help="Write every execution event as one JSON object per line to this "
             "target: a file path (appended to), 'fd:N' for an open file "
             "descriptor, or 'stderr'. Empty disables the log.",
    ).tag(config=True)

    # -- cancellation ------------------------------------------------------
    cell_timeout = Float(
        0.0,
        help="Default deadline in seconds for every cell; 0 means no deadline. "
             "A cell past its deadline is cancelled with an error of kind "
             "'timeout'. Overridden per cell by %%timeout or a per-execute "
             "timeout.",
    ).tag(config=True)

    cancel_grace = Float(
        0.5,
        help="Seconds a cancelled cell may keep running after swallowing the "
             "cancellation before it is cancelled again (cancellation is "
             "level-triggered).",
    ).tag(config=True)

    cancel_signal = Unicode(
        "SIGUSR1",
        help="Signal used to interrupt cells running in the main thread (its "
             "handler is installed at load and chains to a previous handler "
             "for signals pyrepl3 did not send). Change it if the host uses "
             "SIGUSR1 itself.",
    ).tag(config=True)

    cancel_escalate_after = Float(
        0.002,
        help="Seconds to wait for a cancelled main-thread cell to reach a line "
             "boundary before raising directly from the signal handler (at a "
             "safe point too), which also interrupts blocking calls (sleep, "
             "queue.get, input()...). A Python line rarely takes this long, "
             "so waiting longer mostly delays interrupting blocking calls.",
    ).tag(config=True)

    @validate("cell_timeout", "cancel_grace", "cancel_escalate_after")
    def _non_negative(self, proposal):
        value = proposal["value"]
        if value < 0:
            raise TraitError(f"{proposal['trait'].name} must be >= 0, got {value!r}")
        return value

    # -- namespace ---------------------------------------------------------
    transactions = Bool(
        False,
        help="Run every cell as a namespace transaction: when the cell raises "
             "or is cancelled, its changes to the namespace are rolled back. "
             "Per cell: %%transaction, or the execute option.",
    ).tag(config=True)

    snapshot_key_file = Unicode(
        "",
        help="File holding the key that signs (HMAC-SHA256) snapshot files "
             "written by %snapshot save / save_snapshot, and verifies them on "
             "load. Created with 32 random bytes and mode 0600 if missing; "
             "refused if other users can read it. Empty: "
             "<ipython_dir>/pyrepl3/snapshot.key.",
    ).tag(config=True)

    # -- I/O (io_capture.py, input_request.py) --------------------------------
    output_tee = Bool(
        True,
        help="Also write a cell's stdout/stderr to the stream pyrepl3 replaced "
             "(the terminal, a kernel's stream), as without the extension. Turn "
             "it off when a host consumes the output events and the process's "
             "own stdout must stay clean (a stdio protocol server); while nobody "
             "subscribes, output still goes to the terminal.",
    ).tag(config=True)

    output_chunk_size = Int(
        65536,
        help="Largest 'text' of one output event, in characters; a longer line "
             "is split over several events (only the last one ends with the "
             "newline), and a partial line reaching this size is sent at once.",
    ).tag(config=True)

    output_limit = Int(
        32 * 1024 * 1024,
        help="Characters of stdout+stderr delivered as output events per "
             "execution before the overflow policy applies (0: no limit). "
             "Output past it is counted and reported in an output event with a "
             "'dropped' field, never silently lost.",
    ).tag(config=True)

    output_overflow = Enum(
        ["tail", "drop"], "tail",
        help="What happens past output_limit: 'tail' keeps the last output_tail "
             "characters and delivers them at the end of the cell (after the "
             "'dropped' report); 'drop' discards everything after the limit.",
    ).tag(config=True)

    output_tail = Int(
        65536,
        help="Characters kept from the end of a flood under output_overflow='tail'.",
    ).tag(config=True)

    input_timeout = Float(
        0.0,
        help="Seconds input()/getpass wait for the host's reply_input() before "
             "raising TimeoutError in the cell; 0 waits until the reply, EOF, "
             "cancellation or unload. Only for sessions whose host answers "
             "input (subscribe(..., handles_input=True)).",
    ).tag(config=True)

    input_echo = Bool(
        True,
        help="Write the host's reply (and a newline) to the cell's stdout after "
             "the prompt, as a terminal echoes what the user typed; a password "
             "reply echoes only the newline.",
    ).tag(config=True)

    @validate("output_chunk_size", "output_limit", "output_tail", "input_timeout")
    def _io_non_negative(self, proposal):
        name, value = proposal["trait"].name, proposal["value"]
        minimum = 1 if name == "output_chunk_size" else 0
        if value < minimum:
            raise TraitError(f"{name} must be >= {minimum}, got {value!r}")
        return value

    # -- security ------------------------------------------------------------
    security_policy = Enum(
        ["trusted", "guarded", "restricted"], "trusted",
        help="Security preset of this shell: 'trusted' (no restriction), "
             "'guarded' (guardrail against accidents: no shell escapes, no "
             "processes, network or writes outside granted roots, no dunder "
             "access) or 'restricted' (every layer: sanitized builtins, import "
             "allowlist, AST guard, magics allowlist, audit tripwire). Hosts "
             "set custom policies with pyrepl3_ext.set_policy(shell, policy). "
             "A guardrail, not an OS sandbox: see docs/security.md.",
    ).tag(config=True)

    files_root = Unicode(
        "",
        help="Grant the 'files' capability (read/write/list confined to this "
             "directory) to the shell's cells. Empty: not granted.",
    ).tag(config=True)
