"""The MQTT ACL file: Mosquitto's `acl_file` syntax, parsed and matched.

Layer: core; imports only `hub.errors`. Pure: no asyncio, no amqtt, no file
watching (the broker reads the file and calls `parse_acl`; docs/mqtt.md,
"ACL file").

    # comment
    topic [read|write|readwrite|deny] TOPIC     rules for anonymous clients
    user NAME                                   rules below are NAME's
    topic [read|write|readwrite|deny] TOPIC
    pattern [read|write|readwrite|deny] TOPIC   every client; %c client id, %u username

Decisions follow Mosquitto: a matching `deny` wins over any grant; otherwise
the action needs a matching grant of its kind (`read` for receiving and
subscribing, `write` for publishing); nothing matching is a refusal. `topic`
lines before any `user` line apply to anonymous clients only; `pattern` lines
apply to every client wherever they stand. A rule's `+` and `#` are MQTT
wildcards, and a wildcard first level never matches a `$` topic [MQTT-4.7.2-1].

A SUBSCRIBE filter is granted when one `read` grant covers it (every topic
the filter can match, the grant matches too) and no `deny` covers it; a deny
that covers only part of a granted filter withholds those topics on delivery.

`ClientRules` is one client's rules with `%c`/`%u` substituted, compiled once
per session: literal rules sit in sets, wildcard rules are split into levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntFlag
from pathlib import Path

from hub.errors import ConfigError

KEY = "mqtt_acl_file"
ENV = "HUB_MQTT_ACL_FILE"


class Access(IntFlag):
    """What a grant allows; a deny rule has `NONE`."""

    NONE = 0
    READ = 1
    WRITE = 2
    READWRITE = 3


_ACCESS = {
    "read": Access.READ,
    "write": Access.WRITE,
    "readwrite": Access.READWRITE,
    "deny": Access.NONE,
}


class AclSyntaxError(ConfigError):
    """A line of the ACL file that does not parse; `line` is 1-based."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source}, line {line}: {reason} ({KEY} / {ENV})", key=KEY, env=ENV)
        self.source = source
        self.line = line


@dataclass(frozen=True, slots=True)
class Rule:
    access: Access
    topic: str
    #: A `pattern` line (%c and %u substituted per client), not a `topic` line.
    pattern: bool = False

    @property
    def deny(self) -> bool:
        return self.access is Access.NONE


@dataclass(frozen=True, slots=True)
class AclFile:
    """A parsed ACL file."""

    anonymous: tuple[Rule, ...] = ()
    users: dict[str, tuple[Rule, ...]] = field(default_factory=dict)
    patterns: tuple[Rule, ...] = ()

    def rules_for(self, username: str | None, client_id: str) -> ClientRules:
        """The compiled rules of one client (username None: anonymous)."""
        own = self.anonymous if username is None else self.users.get(username, ())
        rules = list(own)
        for rule in self.patterns:
            topic = _substitute(rule.topic, username, client_id)
            if topic is None:
                if not rule.deny:
                    continue
                # The value cannot stand in a topic level: the deny covers the
                # whole level rather than falling away.
                topic = "/".join(
                    "+" if "%u" in level or "%c" in level else level
                    for level in rule.topic.split("/")
                )
            rules.append(Rule(rule.access, topic))
        return ClientRules(rules)

    def has_user(self, username: str) -> bool:
        return username in self.users


def _substitute(topic: str, username: str | None, client_id: str) -> str | None:
    """`topic` with %u and %c replaced; None when a value is missing or holds
    a character that would change the topic's levels (`/`, `+`, `#`)."""
    for marker, value in (("%u", username), ("%c", client_id)):
        if marker not in topic:
            continue
        if value is None or value == "":
            return None
        if any(c in value for c in "/+#"):
            return None
        topic = topic.replace(marker, value)
    return topic


def _valid_topic(topic: str) -> str | None:
    """Why `topic` is not a valid rule topic (an MQTT filter), or None."""
    if "\x00" in topic:
        return "a topic may not contain U+0000"
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def parse_acl(text: str, source: str = "ACL file") -> AclFile:
    """Parse an ACL file; AclSyntaxError naming `source` and the line otherwise."""
    anonymous: list[Rule] = []
    users: dict[str, list[Rule]] = {}
    patterns: list[Rule] = []
    current = anonymous
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "user":
            if not rest:
                raise AclSyntaxError(source, number, "'user' needs a user name")
            current = users.setdefault(rest, [])
            continue
        if keyword not in ("topic", "pattern"):
            raise AclSyntaxError(
                source, number, f"unknown keyword {keyword!r}; expected topic, pattern or user"
            )
        access = Access.READWRITE
        first, _, after = rest.partition(" ")
        if first in _ACCESS and after.strip():
            access, rest = _ACCESS[first], after.strip()
        if not rest:
            raise AclSyntaxError(source, number, f"'{keyword}' needs a topic")
        reason = _valid_topic(rest)
        if reason is not None:
            raise AclSyntaxError(source, number, f"topic {rest!r}: {reason}")
        if keyword == "pattern":
            patterns.append(Rule(access, rest, pattern=True))
        else:
            current.append(Rule(access, rest))
    return AclFile(
        tuple(anonymous), {name: tuple(rules) for name, rules in users.items()}, tuple(patterns)
    )


def load_acl(path: Path | str) -> AclFile:
    """Read and parse the ACL file at `path`; ConfigError naming it otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"ACL file {path} cannot be read ({reason}); check {KEY} / {ENV}", key=KEY, env=ENV
        ) from None
    return parse_acl(text, str(path))


# -- matching -------------------------------------------------------------------------


def _matches(rule: tuple[str, ...], topic: list[str]) -> bool:
    """Whether a rule (a filter, split) matches a topic name (split)."""
    if topic and topic[0].startswith("$") and rule and rule[0] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    for at, level in enumerate(rule):
        if level == "#":
            return True  # also matches the parent level: `a/#` matches `a`
        if at >= len(topic) or (level != "+" and level != topic[at]):
            return False
    return len(rule) == len(topic)


def _covers(rule: tuple[str, ...], sub: list[str]) -> bool:
    """Whether every topic the filter `sub` can match, `rule` matches too."""
    if sub and rule and rule[0] in ("+", "#") and sub[0].startswith("$"):
        return False
    for at, level in enumerate(rule):
        if level == "#":
            return True
        if at >= len(sub):
            return False
        if sub[at] == "#":
            return False  # the filter reaches deeper than this rule
        if level != "+" and (sub[at] == "+" or level != sub[at]):
            return False
    return len(rule) == len(sub)


class ClientRules:
    """One client's rules, precompiled: deny and grants, literal and wildcard."""

    __slots__ = ("_deny_literal", "_deny_wild", "_grant_literal", "_grant_wild")

    def __init__(self, rules: list[Rule]) -> None:
        self._deny_literal: set[str] = set()
        self._deny_wild: list[tuple[str, ...]] = []
        #: Literal topic -> the access granted on it.
        self._grant_literal: dict[str, Access] = {}
        self._grant_wild: list[tuple[Access, tuple[str, ...]]] = []
        for rule in rules:
            wild = "+" in rule.topic or "#" in rule.topic
            levels = tuple(rule.topic.split("/"))
            if rule.deny:
                if wild:
                    self._deny_wild.append(levels)
                else:
                    self._deny_literal.add(rule.topic)
            elif wild:
                self._grant_wild.append((rule.access, levels))
            else:
                granted = self._grant_literal.get(rule.topic, Access.NONE)
                self._grant_literal[rule.topic] = granted | rule.access

    def _denied(self, topic: str, levels: list[str]) -> bool:
        return topic in self._deny_literal or any(_matches(d, levels) for d in self._deny_wild)

    def allows(self, topic: str, access: Access) -> bool:
        """Whether the client may publish (WRITE) or receive (READ) on a topic name."""
        levels = topic.split("/")
        if self._denied(topic, levels):
            return False
        if access & self._grant_literal.get(topic, Access.NONE):
            return True
        return any(access & a and _matches(g, levels) for a, g in self._grant_wild)

    def denies(self, topic: str) -> bool:
        """Whether a deny rule matches the topic name (whatever the grants)."""
        return self._denied(topic, topic.split("/"))

    def may_subscribe(self, topic_filter: str) -> bool:
        """Whether one read grant covers the filter and no deny covers it."""
        levels = topic_filter.split("/")
        if topic_filter in self._deny_literal or any(_covers(d, levels) for d in self._deny_wild):
            return False
        if Access.READ & self._grant_literal.get(topic_filter, Access.NONE):
            return True
        return any(Access.READ & a and _covers(g, levels) for a, g in self._grant_wild)

    def denies_subscription(self, topic_filter: str) -> bool:
        """Whether a deny rule covers the whole filter (whatever the grants)."""
        levels = topic_filter.split("/")
        return topic_filter in self._deny_literal or any(
            _covers(d, levels) for d in self._deny_wild
        )
