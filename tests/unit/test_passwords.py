"""The password file (hub.passwords): Mosquitto's format, checked with vectors
written by `mosquitto_passwd` (2.0, `-b`) and, where it is installed, by it live."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hub.errors import ConfigError
from hub.passwords import PasswordFileError, load_passwords, parse_passwords

#: `mosquitto_passwd -c -b pw svc s3cret` (PBKDF2-SHA512, 101 rounds), and
#: `mosquitto_passwd -b pw other x:y`; the password of `other` holds a colon.
PBKDF2_LINES = (
    "svc:$7$101$wMmagRbIDHwG6+//$dzDX76D+DWfgznXC/IaMShRxumHevxsMTyAVLdFLv2qrqMm37ZGrxPhuCH0b4u9P"
    "pNxLixktddBBaOV83lRPpQ==\n"
    "other:$7$101$p0y+XbpaBbqD4+Lg$tTSdWo4yD6o0w9FF+OPuKBS33GM+Z2/DWs2Cmx5og6+JDJ6LA1VLnotqkbh7VIO"
    "NV57juXeB2hVbUr8yshbiuA==\n"
)
#: `mosquitto_passwd -H sha512 -c -b pw old pass6` (the format of Mosquitto 1.6).
SHA512_LINE = (
    "old:$6$xEckGoezWfaUP95S$Rr4RMHgScK7qADydEDJkLfM5c8NjGeD7rlXS7h87G9UDysVofN+OApAdc+3jYFQilhDs"
    "awt0x6lYZBg+k98WjQ==\n"
)


def test_pbkdf2_lines_of_mosquitto_passwd_verify() -> None:
    passwords = parse_passwords("# service users\n\n" + PBKDF2_LINES)
    assert sorted(passwords.users) == ["other", "svc"]
    assert passwords.verify("svc", "s3cret")
    assert passwords.verify("other", "x:y")
    assert not passwords.verify("svc", "s3cret ")
    assert not passwords.verify("svc", "x:y")
    assert not passwords.verify("svc", None)
    assert not passwords.verify("nobody", "s3cret")
    assert "svc" in passwords and "nobody" not in passwords


def test_the_sha512_format_of_mosquitto_1_6_verifies() -> None:
    passwords = parse_passwords(SHA512_LINE)
    assert passwords.verify("old", "pass6")
    assert not passwords.verify("old", "pass7")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("svc:plaintext", "plain passwords are refused"),
        ("svc", "expected name:hash"),
        (":$7$101$AAAA$AAAA", "expected name:hash"),
        ("svc:$7$many$AAAA$AAAA", "base64"),
        ("svc:$7$101$not base64!$AAAA", "base64"),
        ("svc:$7$0$AAAA$AAAA", "iterations"),
        ("svc:$5$AAAA$AAAA", "plain passwords are refused"),
    ],
)
def test_a_line_that_is_not_a_hash_is_an_error_with_its_line(line: str, reason: str) -> None:
    with pytest.raises(PasswordFileError) as caught:
        parse_passwords(PBKDF2_LINES + line + "\n", "pw")
    assert caught.value.line == 3
    assert reason in str(caught.value)
    assert str(caught.value).startswith("pw, line 3: ")
    assert caught.value.key == "mqtt_password_file"


def test_a_missing_file_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HUB_MQTT_PASSWORD_FILE"):
        load_passwords(tmp_path / "absent")


def test_a_file_written_by_mosquitto_passwd_now_verifies(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd is needed: apt-get install mosquitto-clients mosquitto"
    path = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", str(path), "reader", "pa ss:wörd"], check=True, timeout=30)
    subprocess.run([tool, "-H", "sha512", "-b", str(path), "legacy", "x"], check=True, timeout=30)
    passwords = load_passwords(path)
    assert passwords.verify("reader", "pa ss:wörd")
    assert passwords.verify("legacy", "x")
    assert not passwords.verify("reader", "pa ss:word")
