"""Queue drivers, one module each; `catalog.DRIVER_KINDS` says where each lives.

Driver modules are imported only when a driver of their kind is built, so a missing engine
client is an error naming the extra to install, and only for apps that use that engine.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError
from .catalog import DRIVER_KINDS


def driver_class(kind: str) -> Any:
    entry = DRIVER_KINDS[kind]
    module_name, _, class_name = entry.path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if entry.extra is None:
            raise
        raise ConfigError(f"{kind} needs the '{entry.extra}' extra ({exc.name} is not installed): "
                          f"pip install 'lua-queue-runtime[{entry.extra}]'") from None
    return getattr(module, class_name)
