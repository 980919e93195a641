"""The ACL file (hub.acl): Mosquitto's acl_file syntax, parsed and matched."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.acl import Access, AclSyntaxError, ClientRules, load_acl, parse_acl
from hub.errors import ConfigError

READ, WRITE = Access.READ, Access.WRITE


def anon(text: str, client_id: str = "c1") -> ClientRules:
    return parse_acl(text).rules_for(None, client_id)


def user(text: str, name: str, client_id: str = "c1") -> ClientRules:
    return parse_acl(text).rules_for(name, client_id)


# -- parsing ----------------------------------------------------------------------------


def test_comments_blank_lines_and_indentation_are_ignored() -> None:
    acl = parse_acl("# a comment\n\n   \n  topic read a/b  \n\t# another\n")
    assert [r.topic for r in acl.anonymous] == ["a/b"]


def test_topic_without_access_is_readwrite() -> None:
    (rule,) = parse_acl("topic a/b").anonymous
    assert rule.access is Access.READWRITE


@pytest.mark.parametrize(
    ("word", "access"),
    [
        ("read", Access.READ),
        ("write", Access.WRITE),
        ("readwrite", Access.READWRITE),
        ("deny", Access.NONE),
    ],
)
def test_access_words(word: str, access: Access) -> None:
    (rule,) = parse_acl(f"topic {word} a/#").anonymous
    assert rule.access is access and rule.topic == "a/#"


def test_a_topic_named_like_an_access_word() -> None:
    (rule,) = parse_acl("topic read").anonymous
    assert rule.access is Access.READWRITE and rule.topic == "read"


def test_a_topic_may_contain_spaces_after_the_access() -> None:
    (rule,) = parse_acl("topic read a b/c").anonymous
    assert rule.topic == "a b/c"


def test_user_sections_collect_their_topic_lines() -> None:
    acl = parse_acl(
        "topic read anon\nuser alice\ntopic a/#\nuser bob\ntopic b/#\nuser alice\ntopic c"
    )
    assert [r.topic for r in acl.anonymous] == ["anon"]
    assert [r.topic for r in acl.users["alice"]] == ["a/#", "c"]
    assert [r.topic for r in acl.users["bob"]] == ["b/#"]


def test_patterns_are_global_wherever_they_stand() -> None:
    acl = parse_acl("user alice\npattern read p/%u\ntopic a")
    assert [r.topic for r in acl.patterns] == ["p/%u"]
    assert [r.topic for r in acl.users["alice"]] == ["a"]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("topic read a\nbogus x", 2, "unknown keyword 'bogus'"),
        ("topic", 1, "'topic' needs a topic"),
        ("\n\nuser", 3, "'user' needs a user name"),
        ("pattern", 1, "'pattern' needs a topic"),
        ("topic a/#/b", 1, "'#' must be a whole level"),
        ("topic a/b#", 1, "'#' must be a whole level"),
        ("topic a/b+/c", 1, "'+' must be a whole level"),
        ("# ok\ntopic read x/+/y\npattern write a+", 3, "'+' must be a whole level"),
    ],
)
def test_a_bad_line_names_the_file_and_its_number(text: str, line: int, reason: str) -> None:
    with pytest.raises(AclSyntaxError) as caught:
        parse_acl(text, "/etc/hub/acl")
    assert caught.value.line == line
    message = str(caught.value)
    assert message.startswith(f"/etc/hub/acl, line {line}: ")
    assert reason in message and "HUB_MQTT_ACL_FILE" in message and "\n" not in message
    assert isinstance(caught.value, ConfigError)


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ACL file .*nope.* cannot be read.*HUB_MQTT_ACL_FILE"):
        load_acl(tmp_path / "nope")


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "acl"
    path.write_text("topic read a\n")
    assert [r.topic for r in load_acl(path).anonymous] == ["a"]


# -- publish and receive --------------------------------------------------------------


def test_nothing_matching_is_refused() -> None:
    rules = anon("topic read a")
    assert not rules.allows("b", READ)
    assert not anon("").allows("a", WRITE)


def test_read_and_write_are_separate() -> None:
    assert anon("topic read a").allows("a", READ)
    assert not anon("topic read a").allows("a", WRITE)
    assert anon("topic write a").allows("a", WRITE)
    assert not anon("topic write a").allows("a", READ)
    assert anon("topic readwrite a").allows("a", READ)
    assert anon("topic a").allows("a", WRITE)


def test_read_and_write_on_one_topic_from_two_lines() -> None:
    rules = anon("topic read a\ntopic write a")
    assert rules.allows("a", READ) and rules.allows("a", WRITE)


def test_single_level_wildcard() -> None:
    rules = anon("topic read a/+/c")
    assert rules.allows("a/b/c", READ)
    assert not rules.allows("a/b/d", READ)
    assert not rules.allows("a/b/c/d", READ)
    assert not rules.allows("a/c", READ)
    assert rules.allows("a//c", READ)


def test_multi_level_wildcard_matches_the_parent_too() -> None:
    rules = anon("topic read a/#")
    assert rules.allows("a", READ)
    assert rules.allows("a/b", READ)
    assert rules.allows("a/b/c", READ)
    assert not rules.allows("ab", READ)
    assert not rules.allows("b/a", READ)


def test_wildcards_first_do_not_match_dollar_topics() -> None:
    assert not anon("topic #").allows("$SYS/x", READ)
    assert not anon("topic +/x").allows("$SYS/x", READ)
    assert anon("topic $SYS/#").allows("$SYS/x", READ)


def test_deny_wins_whatever_the_order() -> None:
    for text in ("topic deny a/secret\ntopic a/#", "topic a/#\ntopic deny a/secret"):
        rules = anon(text)
        assert not rules.allows("a/secret", READ)
        assert not rules.allows("a/secret", WRITE)
        assert rules.allows("a/other", WRITE)


def test_a_wildcard_deny() -> None:
    rules = anon("topic #\ntopic deny private/#")
    assert not rules.allows("private", WRITE)
    assert not rules.allows("private/a/b", READ)
    assert rules.allows("public/a", READ)
    assert rules.denies("private/x") and not rules.denies("public")


def test_topic_lines_before_any_user_are_for_anonymous_clients_only() -> None:
    text = "topic read anon/#\nuser alice\ntopic read alice/#"
    assert anon(text).allows("anon/x", READ)
    assert not anon(text).allows("alice/x", READ)
    assert user(text, "alice").allows("alice/x", READ)
    assert not user(text, "alice").allows("anon/x", READ)


def test_a_user_section_is_for_that_username_only() -> None:
    text = "user alice\ntopic a\nuser bob\ntopic b"
    assert user(text, "alice").allows("a", WRITE) and not user(text, "alice").allows("b", WRITE)
    assert user(text, "bob").allows("b", WRITE) and not user(text, "bob").allows("a", WRITE)
    assert not user(text, "carol").allows("a", WRITE)
    assert not user(text, "Alice").allows("a", WRITE)


def test_pattern_substitutes_username_and_client_id() -> None:
    text = "pattern write out/%u/%c\npattern read in/%c/#"
    rules = user(text, "alice", "dev-1")
    assert rules.allows("out/alice/dev-1", WRITE)
    assert not rules.allows("out/bob/dev-1", WRITE)
    assert rules.allows("in/dev-1/x", READ)
    assert not rules.allows("in/dev-2/x", READ)


def test_patterns_apply_to_anonymous_clients_with_a_client_id() -> None:
    text = "pattern readwrite clients/%c/#\npattern readwrite users/%u/#"
    rules = anon(text, "probe-7")
    assert rules.allows("clients/probe-7/x", WRITE)
    # No username: a %u pattern grants nothing.
    assert not rules.allows("users//x", WRITE)
    assert not rules.allows("users/+/x", WRITE)


def test_pattern_substitution_inside_a_level() -> None:
    assert user("pattern read a/%u-data", "bob").allows("a/bob-data", READ)


@pytest.mark.parametrize("bad", ["a/b", "a+", "a#"])
def test_a_value_that_would_change_the_levels_grants_nothing(bad: str) -> None:
    rules = user("pattern readwrite home/%u/#", bad)
    assert not rules.allows(f"home/{bad}/x", WRITE)
    assert not rules.allows("home/a/b/x", WRITE)


def test_a_deny_pattern_with_such_a_value_denies_the_whole_level() -> None:
    rules = user("user a/b\ntopic #\npattern deny home/%u/#", "a/b")
    assert not rules.allows("home/anyone/x", WRITE)
    assert rules.allows("elsewhere", WRITE)
    rules = anon("topic #\npattern deny home/%u/#")  # anonymous: no username
    assert not rules.allows("home/x", READ)


def test_a_literal_pattern_is_a_rule_for_everyone() -> None:
    text = "pattern read status\nuser alice\ntopic write a"
    assert anon(text).allows("status", READ)
    assert user(text, "alice").allows("status", READ)


# -- subscribe ------------------------------------------------------------------------


def test_subscribe_needs_a_read_grant_covering_the_filter() -> None:
    rules = anon("topic read a/#\ntopic write w/#")
    for allowed in ("a", "a/#", "a/b", "a/+", "a/+/c", "a/b/#"):
        assert rules.may_subscribe(allowed), allowed
    for refused in ("#", "+/b", "w/x", "b", "+"):
        assert not rules.may_subscribe(refused), refused


def test_a_plus_grant_covers_narrower_filters_only() -> None:
    rules = anon("topic read a/+/c")
    assert rules.may_subscribe("a/b/c")
    assert rules.may_subscribe("a/+/c")
    assert not rules.may_subscribe("a/#")
    assert not rules.may_subscribe("a/+/#")
    assert not rules.may_subscribe("a/+")
    assert not rules.may_subscribe("+/b/c")


def test_hash_covers_everything_but_dollar_topics() -> None:
    rules = anon("topic read #")
    assert rules.may_subscribe("#") and rules.may_subscribe("+/+") and rules.may_subscribe("x")
    assert not rules.may_subscribe("$SYS/#")


def test_a_literal_grant_covers_only_the_same_filter() -> None:
    rules = anon("topic read a/b")
    assert rules.may_subscribe("a/b")
    assert not rules.may_subscribe("a/+")


def test_a_deny_covering_the_filter_refuses_the_subscription() -> None:
    rules = anon("topic readwrite #\ntopic deny test/nosubscribe")
    assert not rules.may_subscribe("test/nosubscribe")
    assert rules.denies_subscription("test/nosubscribe")
    # Covered only in part: granted; the denied topic is withheld on delivery.
    assert rules.may_subscribe("#") and rules.may_subscribe("test/+")
    assert not rules.allows("test/nosubscribe", READ)
    assert rules.allows("test/other", READ)


def test_a_wildcard_deny_covers_the_filters_below_it() -> None:
    rules = anon("topic read #\ntopic deny secret/#")
    assert not rules.may_subscribe("secret/#")
    assert not rules.may_subscribe("secret/a/+")
    assert not rules.may_subscribe("secret")
    assert rules.may_subscribe("+/a")  # only partly denied


def test_pattern_grants_for_subscriptions() -> None:
    rules = user("pattern read inbox/%u/#", "alice")
    assert rules.may_subscribe("inbox/alice/#")
    assert not rules.may_subscribe("inbox/+/#")
    assert not rules.may_subscribe("inbox/bob/#")
