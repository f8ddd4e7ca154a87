"""Logging set-up: plain lines on stderr; under journald no timestamps and syslog priority prefixes."""

from __future__ import annotations

import logging
import os
import sys
import threading
from types import TracebackType

# sd-daemon(3) prefixes: journald reads "<N>" at the start of a line as that line's priority.
SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``; journald adds the time, the unit and the pid itself."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        # Every line of a traceback gets the prefix, or journald would log its tail at the default priority.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def under_journald() -> bool:
    """Whether stderr goes to journald, which reads a ``<N>`` line prefix as the priority.

    systemd sets JOURNAL_STREAM to the ``device:inode`` of the stream it connected to the journal; the variable
    alone is not enough (it is inherited, and set when only stdout goes to the journal, with
    ``StandardError=file:...``), so stderr must be that very stream, as systemd's documentation says to check.
    """
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):  # unset, malformed, or no stderr to look at
        return False


def with_priority(text: str, priority: int) -> str:
    """``text`` with every line prefixed ``<priority>`` under journald (else as it is): a line without one gets
    the default priority, info, and ``journalctl -p err`` would not show it."""
    if not under_journald():
        return text
    return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def print_error(message: str) -> None:
    """A command's fatal error on stderr, with the err priority under journald."""
    print(with_priority(message, SYSLOG_PRIORITY[logging.ERROR]), file=sys.stderr, flush=True)


def log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """sys.excepthook: an exception nothing caught goes through logging at CRITICAL, its traceback included, so
    that under journald every line carries a priority (the default hook prints it as plain info lines)."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    if not logging.getLogger().handlers:  # a command that never set logging up: journald's format all the same
        setup_logging()
    logging.getLogger("eyed").critical("uncaught exception: %s", exc, exc_info=(exc_type, exc, tb))


def log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: likewise for a thread's, at ERROR (the thread ends, the process goes on)."""
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    if not logging.getLogger().handlers:
        setup_logging()
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("eyed").error(
        "uncaught exception in thread %s: %s",
        name,
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def install_excepthooks() -> None:
    """Route uncaught exceptions through logging; hooks someone else installed (a debugger, pytest) stay."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = log_uncaught
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = log_uncaught_in_thread


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once for a command-line run."""
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
    # Third-party chatter that is not about eyed's work: the hub client logs every HTTP request at INFO, and a
    # replay streamed from the hub makes one every few megabytes. (huggingface_hub 2 uses httpx2.)
    names = ("httpx", "httpcore", "httpx2", "httpcore2", "urllib3", "filelock", "fsspec", "datasets", "huggingface_hub")
    for name in names:
        logging.getLogger(name).setLevel(max(logging.WARNING, getattr(logging, level)))
