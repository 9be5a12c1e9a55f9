"""Each apply and undo, recorded in the system journal (`journalctl -t livesplice`).

Through the syslog socket /dev/log, which systemd-journald serves (and any syslog daemon where
there is no journald). The journal's own Python bindings (systemd-python) build only from source,
with libsystemd's headers and a compiler, which a target of an update need not have. Where nothing
listens (a container, the test-bed guest) the record is dropped silently: an update must not fail,
nor print warnings, for want of a log.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket

SYSLOG_SOCKET = "/dev/log"
IDENTIFIER = "livesplice"

log = logging.getLogger(__name__)
# A logger of its own for the syslog handler: records reach the journal whatever the command
# line's verbosity, and its stderr shows them only with -v (through `log`), not as errors twice.
_syslog = logging.getLogger("livesplice.journal.syslog")
_syslog.setLevel(logging.INFO)
_syslog.propagate = False


class _QuietSysLogHandler(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        pass  # no journal or syslog daemon here: nothing to report


def record(message: str, level: int = logging.INFO) -> None:
    """Send one line to the journal (identifier `livesplice`, with this process's id)."""
    handler = _QuietSysLogHandler(SYSLOG_SOCKET)
    handler.ident = f"{IDENTIFIER}[{os.getpid()}]: "
    # As glibc's syslog(): a datagram is a record, a stream needs the NUL to end one.
    handler.append_nul = handler.socktype != socket.SOCK_DGRAM
    _syslog.addHandler(handler)
    try:
        _syslog.log(level, "%s", message)
    finally:
        _syslog.removeHandler(handler)
        handler.close()
    log.info("recorded in the system journal: %s", message)
