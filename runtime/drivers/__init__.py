"""Queue drivers, one module each. `DRIVERS` maps registry kinds to driver classes."""

from __future__ import annotations

from ..queue.driver import Driver
from .memory import MemoryDriver

DRIVERS: dict[str, type[Driver]] = {"queue.driver.memory": MemoryDriver}
