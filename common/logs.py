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


# The ServerApp (and any app) logs an error the user can fix as ONE line with this prefix;
# ``fedvault simulate`` picks it out of Flower's log stream and prints it as its own one-line
# error, instead of the traceback fragments Flower adds around it.
USER_ERROR_PREFIX = "fedvault error: "


def user_error_line(err: BaseException) -> str:
    """The one line an app logs for an error the user can fix."""
    return USER_ERROR_PREFIX + one_line(err)


def find_user_error(line: str) -> str | None:
    """The message of a :func:`user_error_line` inside a log line, else None."""
    _, sep, message = line.partition(USER_ERROR_PREFIX)
    return message.strip() or None if sep else None
