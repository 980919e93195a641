"""The hub's error hierarchy.

Layer: core; imports nothing from the project.

Every error the hub raises on purpose derives from `HubError`. Codes and the
context they concern are fields, so callers branch on data, not on messages.
"""

from __future__ import annotations

#: Exit status of the in-hub worker when its configuration is wrong (EX_CONFIG of
#: sysexits.h): its supervisor stops the hub instead of restarting it.
EXIT_CONFIG = 78


class HubError(Exception):
    """Root of every error the hub raises on purpose."""


class ConfigError(HubError):
    """A configuration value is missing or invalid.

    `key` names the setting (as in the TOML file), `env` its environment
    variable, so the message can tell the user exactly what to change.
    """

    def __init__(self, message: str, *, key: str | None = None, env: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.env = env


class ProtocolError(HubError):
    """A violation of a device protocol; `code` is a NAK reason code (see docs/protocol.md)."""

    def __init__(self, message: str, *, code: int, seq: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.seq = seq


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    A codec raises only this on bad input; any other exception from a codec is a bug.
    """


class LocalProtocolError(ProtocolError):
    """Our own side tried to send something the protocol does not allow (a bug in the caller)."""


class EnvelopeError(HubError):
    """An envelope failed validation. Never retried: the same input fails the same way."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DispatchError(HubError):
    """Handing envelopes to the task queue failed; retryable."""


class AuthError(HubError):
    """A device could not be authenticated. `reason` is `unknown_device` or `bad_credential`."""

    def __init__(self, message: str, *, device_id: str, reason: str) -> None:
        super().__init__(message)
        self.device_id = device_id
        self.reason = reason


class CommandError(HubError):
    """Root of the errors a command's result can fail with.

    They take one message argument so that Celery's result backend can store
    and rebuild them in any process (`AsyncResult.get()` raises them again).
    """


class CommandFailed(CommandError):
    """The device answered the command with an error."""


class CommandExpired(CommandError):
    """The command's time to live passed before the device answered."""
