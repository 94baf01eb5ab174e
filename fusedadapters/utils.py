"""Small utilities NeMo programs import by name: ``logging``, ``logging_mode`` and ``instantiate``.

``from nemo.utils import logging, logging_mode`` and ``from hydra.utils import instantiate`` port to
``from fusedadapters.utils import logging, logging_mode, instantiate``.
"""

from __future__ import annotations

import contextlib
import enum
import logging as _stdlib_logging
from typing import Any, Iterator, Set

from .targets import instantiate

__all__ = ["instantiate", "logging", "logging_mode"]


class logging_mode(enum.Enum):  # noqa: N801 - NeMo's name
    """How often a message is logged: every time, or only the first time its text is seen."""

    EVERY = "every"
    ONCE = "once"


class _Logger:
    """NeMo's logging facade (``nemo.utils.logging``) over the standard logger ``fusedadapters``.

    Same surface as NeMo's: the level constants, ``debug``/``info``/``warning``/``error``/``critical``
    with ``mode=logging_mode.ONCE``, ``get_verbosity``/``set_verbosity`` (which also set the level of
    every handler on the logger), ``temp_verbosity``, and the standard logger itself as ``_logger``
    (tests flip its ``propagate``). A message logged ONCE counts as logged only when it is emitted: one
    suppressed by the verbosity is shown the first time the verbosity lets it through.

    Unlike NeMo's logger, this one installs no handler of its own and propagates to the root logger,
    as a library's logger should: configure ``logging`` in the application to see INFO messages
    (without any configuration Python prints warnings and errors to stderr).
    """

    NOTSET = _stdlib_logging.NOTSET
    DEBUG = _stdlib_logging.DEBUG
    INFO = _stdlib_logging.INFO
    WARNING = _stdlib_logging.WARNING
    ERROR = _stdlib_logging.ERROR
    CRITICAL = _stdlib_logging.CRITICAL

    def __init__(self, name: str) -> None:
        self._logger = _stdlib_logging.getLogger(name)
        self._logged_once: Set[str] = set()

    def _log(self, level: int, msg: Any, *args: Any, mode: logging_mode = logging_mode.EVERY, **kwargs: Any) -> None:
        if not self._logger.isEnabledFor(level):
            return
        if mode is logging_mode.ONCE:
            key = str(msg)
            if key in self._logged_once:
                return
            self._logged_once.add(key)
        kwargs.setdefault("stacklevel", 3)  # the caller of debug()/info()/..., not this facade
        self._logger.log(level, msg, *args, **kwargs)

    def debug(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._log(self.DEBUG, msg, *args, **kwargs)

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._log(self.INFO, msg, *args, **kwargs)

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._log(self.WARNING, msg, *args, **kwargs)

    def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._log(self.ERROR, msg, *args, **kwargs)

    def critical(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self._log(self.CRITICAL, msg, *args, **kwargs)

    def getEffectiveLevel(self) -> int:  # noqa: N802 - NeMo's (and the standard library's) name
        return self._logger.getEffectiveLevel()

    def get_verbosity(self) -> int:
        """The level below which messages are dropped (the logger's effective level)."""
        return self._logger.getEffectiveLevel()

    def setLevel(self, level: int) -> None:  # noqa: N802 - NeMo's (and the standard library's) name
        self.set_verbosity(level)

    def set_verbosity(self, level: int) -> None:
        """Set the level of the logger and of every handler attached to it."""
        self._logger.setLevel(level)
        for handler in self._logger.handlers:
            handler.setLevel(level)

    @contextlib.contextmanager
    def temp_verbosity(self, level: int) -> Iterator[None]:
        """Use ``level`` for the duration of the block, then restore the previous verbosity."""
        previous = self.get_verbosity()
        self.set_verbosity(level)
        try:
            yield
        finally:
            self.set_verbosity(previous)


logging = _Logger("fusedadapters")
