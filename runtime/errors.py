"""One exception tree for the runtime, rooted at :class:`RuntimeHostError`."""

from __future__ import annotations

from dataclasses import dataclass


class RuntimeHostError(Exception):
    """Base class of every error the runtime raises on purpose.

    ``kind`` is the error kind Lua code sees when this error crosses into a Lua module call.
    """

    kind = "Internal"


@dataclass(frozen=True, order=True)
class Problem:
    """One configuration problem, located in a file (and line, when known)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


class ConfigError(RuntimeHostError):
    """The application's definitions are invalid. ``problems`` lists every one found."""

    def __init__(self, problems: list[Problem] | str):
        if isinstance(problems, str):
            problems = [Problem("", 0, problems)]
        self.problems: list[Problem] = sorted(problems)
        count = len(self.problems)
        head = f"{count} configuration problem{'s' if count != 1 else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class EntryNotFound(RuntimeHostError, LookupError):
    """A registry ID names no entry (or an entry of another kind)."""

    kind = "NotFound"


class QueueNotFound(EntryNotFound):
    """A queue ID names no `queue.queue` entry."""


class DriverError(RuntimeHostError):
    """A queue driver failed (broker unreachable, connection lost...)."""


class LuaHandlerError(RuntimeHostError):
    """Lua code raised an error, or could not be loaded into a Lua state.

    ``lua_traceback`` holds the Lua stack traceback when one was captured.
    """

    def __init__(self, message: str, lua_traceback: str = "", entry_id: str = ""):
        self.lua_message = message
        self.lua_traceback = lua_traceback
        self.entry_id = entry_id
        text = message if not entry_id else f"{entry_id}: {message}"
        if lua_traceback:
            text += "\n" + lua_traceback
        super().__init__(text)


class ShutdownTimeout(RuntimeHostError):
    """Handlers did not finish within their stop timeout."""


class QueueUnavailable(RuntimeHostError):
    """The queue exists but cannot take messages now (the app is not running)."""

    kind = "Unavailable"


class DriverUnavailable(QueueUnavailable, DriverError):
    """A driver's engine cannot be reached (connection lost, server down). Retryable."""


class Canceled(RuntimeHostError):
    """A blocking call was cut short because its worker is stopping."""

    kind = "Canceled"


class InvalidMessage(RuntimeHostError, ValueError):
    """A message (body or headers) cannot be published as given."""

    kind = "Invalid"


class PublishTimeout(RuntimeHostError):
    """A full queue stayed full for the whole publish timeout."""

    kind = "Timeout"


class PermissionDenied(RuntimeHostError):
    """A security policy refused the action."""

    kind = "PermissionDenied"
