"""Logging set-up: plain lines on stderr; under journald no timestamps and syslog priority prefixes."""

from __future__ import annotations

import logging
import os
import sys

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


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once for a command-line run."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
    # Third-party chatter that is not about eyed's work: the hub client logs every HTTP request at INFO, and a
    # replay streamed from the hub makes one every few megabytes. (huggingface_hub 2 uses httpx2.)
    names = ("httpx", "httpcore", "httpx2", "httpcore2", "urllib3", "filelock", "fsspec", "datasets", "huggingface_hub")
    for name in names:
        logging.getLogger(name).setLevel(max(logging.WARNING, getattr(logging, level)))
