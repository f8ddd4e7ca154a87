"""Logging set-up: plain lines on stderr; no timestamps under journald, which adds its own."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once for a command-line run."""
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=True)
    # Third-party chatter that is not about eyed's work.
    for name in ("httpx", "httpcore", "urllib3", "filelock", "fsspec", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(max(logging.WARNING, getattr(logging, level)))
