"""PERSIA's loggers: ``get_default_logger``, ``get_logger`` and ``setLogger``.

The default logger (named ``"log"`` unless the first caller names it) writes
``time LEVEL [file:line] message`` lines to stderr, optionally also to a file and, from a chosen
level up, to a separate error file, as PERSIA's does (without PERSIA's colours: ctrserve does not
depend on ``colorlog``).

Example:
    >>> from persia.logger import get_default_logger
    >>> logger = get_default_logger()
    >>> logger.info("training starts")  # doctest: +SKIP
"""

from __future__ import annotations

import logging

#: the format of every line (stream and files)
LOG_FORMAT = "%(asctime)s %(levelname)-8s [%(filename)s:%(lineno)d] %(message)s"
STREAM_LOG_FORMAT = LOG_FORMAT
FILE_LOG_FORMAT = LOG_FORMAT
DEFAULT_LOGGER_NAME = "log"
FORMATTER = logging.Formatter(LOG_FORMAT)

_default_logger: logging.Logger | None = None


class levelFilter(logging.Filter):  # noqa: N801 (PERSIA's name)
    """Keeps the records above ``level`` (PERSIA's error-redirect filter).

    Args:
        level: records with a level strictly above it pass.
    """

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > self.level


def setLogger(  # noqa: N802 (PERSIA's name)
    name: str,
    log_level: int = logging.DEBUG,
    log_filename: str = "train.log",
    enable_file_logger: bool = False,
    err_redirect_filepath: str = "error.log",
    enable_err_redirect: bool = False,
    err_redirect_level: int = logging.INFO,
) -> logging.Logger:
    """Set up the logger ``name``: a stderr handler, optionally a file and an error file.

    Args:
        name: the logger's name.
        log_level: its level.
        log_filename: the file every record also goes to when ``enable_file_logger``.
        enable_file_logger: also write to ``log_filename``.
        err_redirect_filepath: the file records above ``err_redirect_level`` go to.
        enable_err_redirect: write those records to ``err_redirect_filepath`` too.
        err_redirect_level: the level above which records are redirected.

    Returns:
        The configured logger.
    """
    logger = logging.getLogger(name)
    stream = logging.StreamHandler()
    stream.setFormatter(FORMATTER)
    logger.addHandler(stream)
    logger.setLevel(log_level)
    if enable_file_logger:
        file_handler = logging.FileHandler(log_filename, mode="a")
        file_handler.setFormatter(FORMATTER)
        logger.addHandler(file_handler)
    if enable_err_redirect:
        error_handler = logging.FileHandler(err_redirect_filepath, mode="a")
        error_handler.setFormatter(FORMATTER)
        error_handler.addFilter(levelFilter(err_redirect_level))
        logger.addHandler(error_handler)
    return logger


def get_logger(name: str) -> logging.Logger:
    """The logger called ``name`` (``logging.getLogger``)."""
    return logging.getLogger(name)


def get_default_logger(name: str | None = None, **kwargs) -> logging.Logger:
    """The process's default logger, set up by the first call (with ``name``, default ``"log"``,
    and :func:`setLogger`'s keyword arguments); later calls return the same logger.
    """
    global _default_logger
    if _default_logger is None:
        _default_logger = setLogger(name or DEFAULT_LOGGER_NAME, **kwargs)
    return _default_logger
