"""What the hub keeps about one MQTT session, beside amqtt's own fields, and what it costs.

Layer: bridges; imports amqtt's `Session`, `transitions` (its error type),
`bridges.mqtt.lean` and `hub.acl` only.

amqtt gives each session a free-form `attributes` dict. The hub keeps one
typed `SessionState` there, under one key, instead of a string key per fact;
`state_of` creates it on first use. It travels with the session: a resumed
persistent session takes the new CONNECT's identity and keeps its own
offline-queue flag (bridges.mqtt.broker, `_continue_session`).

Memory per connection (docs/mqtt.md, "Connection scale"): amqtt gives every
session a `transitions.Machine` for its three states (about 15 KB each, most
of what a session weighs) and every session and handler four
`asyncio.Queue`s (four deques and an `Event` each, about 3 KB, even empty).
`LeanSession` has `SessionStates` instead, the same three states and
transitions in two slots, and `LeanQueue`s (bridges.mqtt.lean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.session import Session
from transitions import MachineError

from bridges.mqtt.lean import LeanQueue
from hub.acl import ClientRules

#: The one key of `session.attributes` the hub uses.
_KEY = "hub"


@dataclass(slots=True)
class SessionState:
    """The hub's facts about one session (mutable: they change as it lives)."""

    #: The CONNECT was accepted (a device, or an anonymous client where allowed).
    authenticated: bool = False
    #: The device it authenticated as; None for an anonymous client. The
    #: bridge trusts only this, never the topic, to decide whose message it is.
    device_id: str | None = None
    #: The service user (`mqtt_password_file`) it logged in as; None for a
    #: device or an anonymous client. Only the ACL file grants it anything.
    service_user: str | None = None
    #: Why its CONNECT was refused (chooses the CONNACK return code).
    refusal: str | None = None
    #: Connected and its offline queue sent: new messages go straight to the
    #: connection (until then they join the queue, keeping order).
    live: bool = False
    #: Its offline queue overflowed (logged once per absence).
    queue_full: bool = False
    #: Its rules from the ACL file, compiled on first use, and the load of the
    #: file they come from (a reload compiles them again).
    acl_rules: ClientRules | None = None
    acl_generation: int = -1
    #: The ACL's publish decisions by topic, for those rules: decided once,
    #: whether the tap or amqtt asks first.
    acl_publish: dict[str, bool] | None = None


def state_of(session: Session) -> SessionState:
    """The session's state, created on first use."""
    state: SessionState | None = session.attributes.get(_KEY)
    if state is None:
        state = session.attributes[_KEY] = SessionState()
    return state


def device_of(session: Session | None) -> str | None:
    """The device a session authenticated as; None for anonymous (or unknown) clients."""
    if session is None:
        return None
    state: SessionState | None = session.attributes.get(_KEY)
    return state.device_id if state is not None else None


def identity_of(session: Session | None) -> str | None:
    """Who a session is, for the ownership of its client id: the device id, a
    marked service user name (no device id holds a NUL), or None (anonymous)."""
    if session is None:
        return None
    state: SessionState | None = session.attributes.get(_KEY)
    if state is None:
        return None
    if state.service_user is not None:
        return f"\x00user:{state.service_user}"
    return state.device_id


class SessionStates:
    """amqtt's session states (new, connected, disconnected) and its two
    triggers, as its `transitions.Machine` defines them (amqtt.session,
    `_init_states`), with its callbacks on entering a state: connect from new
    or disconnected (a MachineError from connected), disconnect from any."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session, state: str = "new") -> None:
        self._session = session
        self.state = state

    def connect(self) -> None:
        if self.state == "connected":
            raise MachineError("Can't trigger event connect from state connected!")
        self.state = "connected"
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session._on_enter_disconnected()

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


class LeanSession(Session):  # type: ignore[misc]  # amqtt is untyped
    """amqtt's `Session` with `SessionStates` for its `transitions.Machine`
    (never built: building it was a fifth of the CPU of a connection storm)
    and `LeanQueue`s for its two queues. amqtt's broker handler makes each
    CONNECT's session as this class (bridges.mqtt.sessions)."""

    def __init__(self) -> None:
        super().__init__()
        self.retained_messages: LeanQueue[Any] = LeanQueue()
        self.delivered_message_queue: LeanQueue[Any] = LeanQueue()

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)
