"""Authentication and topic ACL of the embedded MQTT broker, as amqtt plugins.

Layer: bridges; imports the `hub` core (topics, registry, metrics, envelope,
errors, settings), `bridges.mqtt.state` and amqtt's public plugin API.

`DeviceAccess` holds the rules (docs/mqtt.md, "Authentication and ACL"),
`AclFileAccess` adds those of an ACL file (`mqtt_acl_file`, parsed and matched
by `hub.acl`); `DeviceAuthPlugin` and `DeviceTopicPlugin` are the amqtt
plugins that ask it.
amqtt instantiates plugins itself from dotted paths, so the one `DeviceAccess`
instance reaches them through their plugin configuration (`{"access": ...}`).

A device connects with username = its device id and password = its registry
credential, or, over TLS with `tls_identity` = cn/san, with a client
certificate signed by `tls_ca_file` that names it (bridges.tls,
docs/security.md): the certificate is then its credential, any username must
be the same device id, and a certificate naming a device the registry does not
hold is refused (`unknown_device`). A client whose username is in the
password file (`mqtt_password_file`, Mosquitto's format, `hub.passwords`) is a
service user, not a device: it logs in with that file's password, and only
the ACL file's rules (its `user` section and the patterns) grant it anything;
without an ACL file it may do nothing. Its session's `SessionState`
(bridges.mqtt.state) then carries the device id (or the user's name); the
bridge trusts only that, never the topic, to decide whose message it is.

For a PUBLISH the ACL is asked once, by amqtt through `DeviceTopicPlugin`
when the message is handed to the broker. A will is checked when its CONNECT
is authenticated and again before it is published (bridges.mqtt.delivery),
never on the PUBLISH path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from bridges.address_gate import AddressGate
from bridges.mqtt.state import device_of, identity_of, state_of
from bridges.tls import certificate_identity
from hub.acl import Access, ClientRules, load_acl
from hub.envelope import validate_device_id
from hub.errors import AuthError, ConfigError, EnvelopeError
from hub.metrics import Metrics
from hub.passwords import PasswordFile, load_passwords
from hub.registry import CredentialCache
from hub.settings import Settings
from hub.topics import may_publish, may_subscribe

log = logging.getLogger(__name__)

# Refusal reasons, the `reason` label of hub_auth_failures_total{transport="mqtt"}.
ANONYMOUS = "anonymous"
UNKNOWN_DEVICE = "unknown_device"
BAD_CREDENTIAL = "bad_credential"
CLIENT_ID_IN_USE = "client_id_in_use"
WILL_TOPIC = "will_topic"
#: A certificate names one device and the CONNECT's username another.
CERTIFICATE_MISMATCH = "certificate_mismatch"
INTERNAL_ERROR = "internal_error"
#: Refusals that count as a failed login of the client's address (bridges.address_gate).
_CREDENTIAL_REASONS = frozenset({ANONYMOUS, UNKNOWN_DEVICE, BAD_CREDENTIAL, CERTIFICATE_MISMATCH})


def _host_of(remote_address: object) -> str | None:
    """The host of amqtt's `Session.remote_address` (a host string, or (host, port))."""
    if isinstance(remote_address, str):
        return remote_address
    if isinstance(remote_address, tuple) and remote_address:
        return str(remote_address[0])
    return None


class DeviceAccess:
    """The connect, publish and subscribe rules of the embedded broker."""

    #: Whether an ACL file adds rules (then anonymous clients' wills are checked too).
    has_acl_file = False

    def __init__(
        self,
        settings: Settings,
        credentials: CredentialCache,
        refresh_credentials: Callable[[str], Awaitable[None]],
        metrics: Metrics,
    ) -> None:
        self._root = settings.mqtt_topic_root
        self._allow_anonymous = settings.mqtt_allow_anonymous
        self._identity = settings.tls_identity
        self._credentials = credentials
        self._refresh = refresh_credentials
        self._metrics = metrics
        self._password_path = settings.mqtt_password_file
        #: The service users (None: no password file); a ConfigError at start.
        self._passwords: PasswordFile | None = (
            None if self._password_path is None else load_passwords(self._password_path)
        )
        gate = AddressGate(settings, metrics, "mqtt")
        #: The broker's limits per source address (bridges.mqtt.listener); a
        #: refused credential counts against its address here.
        self.address_gate = gate if gate.active else None

    # -- connect ---------------------------------------------------------------

    async def authenticate(self, session: Session) -> bool:
        """True when the client may connect; counts and logs a refusal once."""
        username = session.username
        if session.ssl_object is not None and self._identity != "off":
            # A verified certificate (the handshake checked CA, dates and CRL).
            named = certificate_identity(session.ssl_object.getpeercert(), self._identity)
            if named is not None:
                return await self._authenticate_certificate(session, named)
        if username is None:
            if not self._allow_anonymous:
                return self._refuse(session, None, ANONYMOUS)
            if session.will_flag and not self._will_allowed(session, None):
                return self._refuse(session, None, WILL_TOPIC)
            state = state_of(session)
            state.authenticated, state.device_id = True, None
            # amqtt's own flag would discard an anonymous client's persistent
            # session; with mqtt_allow_anonymous the broker is a plain MQTT
            # broker, where clean session 0 keeps it [MQTT-3.1.2-4].
            session.is_anonymous = False
            return True
        if self._passwords is not None and username in self._passwords:
            return self._authenticate_service_user(session, self._passwords, username)
        try:
            device_id = validate_device_id(username)
        except EnvelopeError:
            return self._refuse(session, username, UNKNOWN_DEVICE)
        if session.password is None:
            return self._refuse(session, device_id, BAD_CREDENTIAL)
        try:
            if self._credentials.missing(device_id):
                # Provisioned after the hub started: look it up once before refusing.
                await self._refresh(device_id)
            self._credentials.verify(device_id, session.password)
        except AuthError as exc:
            return self._refuse(session, device_id, exc.reason)
        return self._accept(session, device_id)

    async def _authenticate_certificate(self, session: Session, named: str) -> bool:
        """The device a verified client certificate names, which needs no password."""
        try:
            device_id = validate_device_id(named)
        except EnvelopeError:
            return self._refuse(session, named, UNKNOWN_DEVICE)
        if session.username is not None and session.username != device_id:
            return self._refuse(session, device_id, CERTIFICATE_MISMATCH)
        if self._credentials.missing(device_id):
            await self._refresh(device_id)
            if self._credentials.missing(device_id):
                return self._refuse(session, device_id, UNKNOWN_DEVICE)
        return self._accept(session, device_id)

    def _authenticate_service_user(
        self, session: Session, passwords: PasswordFile, name: str
    ) -> bool:
        """A service user of the password file: its password, then the ACL decides."""
        if not passwords.verify(name, session.password):
            return self._refuse(session, name, BAD_CREDENTIAL)
        if session.will_flag and not self._will_allowed(session, None, name):
            return self._refuse(session, name, WILL_TOPIC)
        state = state_of(session)
        state.authenticated, state.device_id, state.refusal = True, None, None
        state.service_user = name
        session.is_anonymous = False
        return True

    def _accept(self, session: Session, device_id: str) -> bool:
        if session.will_flag and not self._will_allowed(session, device_id):
            # amqtt publishes a will without asking the topic ACL, so a will on
            # another device's command topic would be a forged command.
            return self._refuse(session, device_id, WILL_TOPIC)
        state = state_of(session)
        state.authenticated, state.device_id, state.refusal = True, device_id, None
        session.is_anonymous = False
        return True

    def _will_allowed(
        self, session: Session, device_id: str | None, service_user: str | None = None
    ) -> bool:
        """Whether a CONNECT's will topic is one its client may publish on."""
        if service_user is not None:
            return False  # no ACL file: a service user may publish nothing
        if device_id is None:
            return True  # anonymous: a plain broker
        return may_publish(device_id, session.will_topic or "", self._root)

    def reload(self) -> None:
        """Read the password file again (and the ACL file: `AclFileAccess`). A
        file that no longer parses keeps what is in force (one line logged);
        sessions already connected stay, whatever the new file says."""
        if self._password_path is None:
            return
        try:
            passwords = load_passwords(self._password_path)
        except ConfigError as exc:
            log.error("MQTT password file not reloaded, the previous users stay: %s", exc)
            return
        self._passwords = passwords
        log.info(
            "MQTT password file %s reloaded (%d users)", self._password_path, len(passwords.users)
        )

    def may_take_client_id(self, session: Session, holder: str | None) -> bool:
        """Whether the authenticated `session` may take over a client id that
        `holder` holds (`identity_of`: a device, a service user, None for an
        anonymous client): only the same device (or user) may, so that no
        device can disconnect another, or take its persistent session's
        subscriptions and queued commands, by naming its client id. Counts and
        logs a refusal (`client_id_in_use`)."""
        if identity_of(session) == holder:
            return True
        return self._refuse(session, device_of(session), CLIENT_ID_IN_USE)

    def _refuse(self, session: Session, device_id: str | None, reason: str) -> bool:
        state_of(session).refusal = reason
        self._metrics.auth_failures.labels("mqtt", reason).inc()
        if self.address_gate is not None and reason in _CREDENTIAL_REASONS:
            address = _host_of(session.remote_address)
            if address is not None:
                self.address_gate.auth_failed(address)
        log.warning(
            "MQTT connect refused: device=%s client_id=%s from=%s reason=%s",
            device_id,
            session.client_id,
            session.remote_address,
            reason,
        )
        return False

    def count_internal_error(self, session: Session | None) -> None:
        if session is not None:
            state_of(session).refusal = INTERNAL_ERROR
        self._metrics.auth_failures.labels("mqtt", INTERNAL_ERROR).inc()

    # -- publish and subscribe ---------------------------------------------------

    def _not_a_device_may(self, session: Session) -> bool:
        """What a client that is not a device may do before any ACL file: an
        anonymous one (only with mqtt_allow_anonymous) anything, a plain broker
        for them; a service user nothing, as only the ACL file grants it rights."""
        state = state_of(session)
        if state.service_user is not None:
            return self.has_acl_file and state.authenticated
        return self._allow_anonymous and state.authenticated

    def may_publish(self, session: Session | None, topic: str) -> bool:
        """Whether the client may publish on `topic`. Pure; counts nothing."""
        if session is None:
            return False
        device_id = device_of(session)
        if device_id is None:
            return self._not_a_device_may(session)
        return may_publish(device_id, topic, self._root)

    def may_subscribe(self, session: Session | None, topic_filter: str) -> bool:
        if session is None:
            return False
        device_id = device_of(session)
        if device_id is None:
            return self._not_a_device_may(session)
        return may_subscribe(device_id, topic_filter, self._root)

    def check(self, session: Session | None, topic: str, action: str) -> bool:
        """The ACL decision for amqtt's `publish`/`subscribe`/`receive`; counts and
        logs each refusal once."""
        if action == Action.RECEIVE:
            # What a client receives is bounded by what it may subscribe to.
            return True
        if action == Action.PUBLISH:
            allowed = self.may_publish(session, topic)
        elif action == Action.SUBSCRIBE:
            allowed = self.may_subscribe(session, topic)
        else:
            allowed = False
        if not allowed:
            self.refused(session, topic, str(action))
        return allowed

    def refused(self, session: Session | None, topic: str, action: str) -> None:
        self._metrics.acl_refusals.labels(action).inc()
        log.warning(
            "MQTT %s refused: device=%s client_id=%s topic=%s",
            action,
            device_of(session),
            session.client_id if session is not None else None,
            topic,
        )


#: Publish decisions kept per session (by topic) before they are forgotten.
_DECISIONS_KEPT = 256


class AclFileAccess(DeviceAccess):
    """`DeviceAccess` with an ACL file (`mqtt_acl_file`; docs/mqtt.md, "ACL file").

    A separate class, chosen when the broker is built, so that without a file
    the PUBLISH path does no extra work at all. Clients that are not devices
    get the file's rules. A device keeps its built-in rule, which the file can
    only narrow: a matching deny refuses, and when the file has a `user`
    section for the device, the action needs a grant there (or in a pattern)
    as well. Each session's rules are compiled once per load of the file.
    """

    has_acl_file = True

    def __init__(
        self,
        settings: Settings,
        credentials: CredentialCache,
        refresh_credentials: Callable[[str], Awaitable[None]],
        metrics: Metrics,
        acl_file: Path,
    ) -> None:
        super().__init__(settings, credentials, refresh_credentials, metrics)
        self._path = acl_file
        self._acl = load_acl(acl_file)  # a ConfigError at start, naming file and line
        self._generation = 0

    def reload(self) -> None:
        """Read the file again. A file that no longer parses keeps the rules in
        force (logged); connections are never dropped either way. Sessions pick
        the new rules up at their next check."""
        super().reload()
        try:
            acl = load_acl(self._path)
        except ConfigError as exc:
            log.error("MQTT ACL file not reloaded, the previous rules stay: %s", exc)
            return
        self._acl, self._generation = acl, self._generation + 1
        log.info("MQTT ACL file %s reloaded", self._path)

    def _rules(self, session: Session, device_id: str | None) -> ClientRules:
        state = state_of(session)
        rules = state.acl_rules
        if rules is None or state.acl_generation != self._generation:
            # A service user's name picks its `user` section and fills %u.
            name = device_id if device_id is not None else state.service_user
            rules = self._acl.rules_for(name, session.client_id or "")
            state.acl_rules, state.acl_generation = rules, self._generation
            state.acl_publish = {}
        return rules

    def _file_allows(
        self, session: Session, device_id: str | None, topic: str, access: Access
    ) -> bool:
        rules = self._rules(session, device_id)
        if device_id is None or self._acl.has_user(device_id):
            return rules.allows(topic, access)
        return not rules.denies(topic)

    def _will_allowed(
        self, session: Session, device_id: str | None, service_user: str | None = None
    ) -> bool:
        topic = session.will_topic or ""
        if device_id is not None and not may_publish(device_id, topic, self._root):
            return False
        # Compiled for this CONNECT only: its state may not be the session's yet.
        name = device_id if device_id is not None else service_user
        rules = self._acl.rules_for(name, session.client_id or "")
        if device_id is None or self._acl.has_user(device_id):
            return rules.allows(topic, Access.WRITE)
        return not rules.denies(topic)

    def may_publish(self, session: Session | None, topic: str) -> bool:
        if session is None:
            return False
        self._rules(session, device_of(session))  # current rules, current decisions
        decided = state_of(session).acl_publish
        assert decided is not None  # set with the rules
        allowed = decided.get(topic)
        if allowed is None:
            allowed = super().may_publish(session, topic) and self._file_allows(
                session, device_of(session), topic, Access.WRITE
            )
            if len(decided) >= _DECISIONS_KEPT:
                decided.clear()  # a client naming ever new topics: bounded
            decided[topic] = allowed
        return allowed

    def may_subscribe(self, session: Session | None, topic_filter: str) -> bool:
        if not super().may_subscribe(session, topic_filter):
            return False
        assert session is not None
        device_id = device_of(session)
        rules = self._rules(session, device_id)
        if device_id is None or self._acl.has_user(device_id):
            return rules.may_subscribe(topic_filter)
        return not rules.denies_subscription(topic_filter)

    def may_receive(self, session: Session | None, topic: str) -> bool:
        if session is None:
            return False
        return self._file_allows(session, device_of(session), topic, Access.READ)

    def check(self, session: Session | None, topic: str, action: str) -> bool:
        if action == Action.RECEIVE:
            # Not counted as a refusal: a subscription granted before a reload,
            # or one a deny covers only in part, just misses these topics.
            return self.may_receive(session, topic)
        return super().check(session, topic, action)


# amqtt ships no type information, so its base classes are `Any` to mypy.
class DeviceAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt authentication plugin: asks `DeviceAccess.authenticate`."""

    @dataclass
    class Config:
        access: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        access: DeviceAccess = self.config.access
        try:
            return await access.authenticate(session)
        except Exception:
            # The boundary with amqtt: a bug here must refuse the client, not the broker.
            log.exception("MQTT authentication failed internally: client_id=%s", session.client_id)
            access.count_internal_error(session)
            return False


class DeviceTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """amqtt topic plugin: asks `DeviceAccess.check` for each publish and subscribe."""

    @dataclass
    class Config:
        access: Any = None

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        access: DeviceAccess = self.config.access
        try:
            return access.check(session, topic or "", str(action))
        except Exception:
            log.exception("MQTT ACL check failed internally: topic=%s action=%s", topic, action)
            access.refused(session, topic or "", str(action))
            return False
