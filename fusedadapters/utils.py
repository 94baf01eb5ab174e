"""Small utilities NeMo programs import by name: ``logging``, ``logging_mode`` and ``instantiate``.

``from nemo.utils import logging, logging_mode`` and ``from hydra.utils import instantiate`` port to
``from fusedadapters.utils import logging, logging_mode, instantiate``.
"""

from __future__ import annotations

import enum
import logging as _stdlib_logging
from typing import Any, Set

from .targets import instantiate

__all__ = ["instantiate", "logging", "logging_mode"]


class logging_mode(enum.Enum):  # noqa: N801 - NeMo's name
    """How often a message is logged: every time, or only the first time its text is seen."""

    EVERY = "every"
    ONCE = "once"


class _Logger:
    """NeMo's logging facade over the standard ``fusedadapters`` logger, with ``mode=logging_mode.ONCE``."""

    DEBUG = _stdlib_logging.DEBUG
    INFO = _stdlib_logging.INFO
    WARNING = _stdlib_logging.WARNING
    ERROR = _stdlib_logging.ERROR
    CRITICAL = _stdlib_logging.CRITICAL

    def __init__(self, name: str) -> None:
        self._logger = _stdlib_logging.getLogger(name)
        self._seen: Set[str] = set()

    def _log(self, level: int, msg: Any, *args: Any, mode: logging_mode = logging_mode.EVERY, **kwargs: Any) -> None:
        if mode is logging_mode.ONCE:
            key = f"{level}:{msg}"
            if key in self._seen:
                return
            self._seen.add(key)
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

    def get_verbosity(self) -> int:
        return self._logger.getEffectiveLevel()

    def set_verbosity(self, level: int) -> None:
        self._logger.setLevel(level)


logging = _Logger("fusedadapters")
