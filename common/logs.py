"""Logging set-up shared by the CLI, the ServerApp and the ClientApp.

All fedvault modules log to children of the ``fedvault`` logger. Inside Flower's app
processes stdout/stderr are mirrored into the run's log stream (``flwr run --stream``,
``flwr log``), so a stderr handler is all it takes for our lines to reach the user.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


def configure_logging(level: int = logging.INFO) -> logging.Logger:
    """Attach one stderr handler to the ``fedvault`` logger (idempotent)."""
    logger = logging.getLogger("fedvault")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def one_line(err: BaseException) -> str:
    """An exception's message on one line (its type when it has none), for the one-line
    user errors fedvault prints: JSON and OS errors can carry newlines."""
    return " ".join(str(err).split()) or type(err).__name__
