"""Errors that map onto livesplice's exit statuses, the same for every command.

0 done, 1 internal error, 2 bad input, 3 refused by a safety check, 4 nothing to do, 5 the test
bed's guest kernel died (panicked, hung, or its QEMU ended) while `livesplice vm ...` used it.
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3
EXIT_NOTHING = 4
EXIT_GUEST_DIED = 5


class LivespliceError(Exception):
    """Base class; `exit_status` says how the CLI ends."""

    exit_status = EXIT_INTERNAL


class BadInput(LivespliceError):
    """The user asked for something that cannot be done as asked (or the host lacks a tool)."""

    exit_status = EXIT_BAD_INPUT


class Refused(LivespliceError):
    """A safety check said no. `reasons` lists every reason found."""

    exit_status = EXIT_REFUSED

    def __init__(self, message: str, reasons: list[str] | None = None):
        super().__init__(message)
        self.reasons = list(reasons or [])


class NothingToDo(LivespliceError):
    exit_status = EXIT_NOTHING


class GuestDied(LivespliceError):
    """The test bed's guest kernel died: `console` holds the end of its console log."""

    exit_status = EXIT_GUEST_DIED

    def __init__(self, message: str, console: str = ""):
        super().__init__(message)
        self.console = console


# What a refusal of changed data or struct layouts points to (create).
DATA_CHANGE_HINT = ("data and struct layouts are not rewritten live: change live data with hooks "
                    "that run at switch time, and give existing objects new fields with shadow "
                    "data (#include <livesplice.h>), see docs/writing-updates.md")
