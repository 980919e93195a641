"""The hub's TLS: an `ssl.SSLContext` built from settings, and a device named by its certificate.

Layer: bridges; imports the `hub` core (settings, errors) and the standard
`ssl` module only (the core stays free of sockets and TLS).

`server_context(settings)` is what a TLS listener serves with (MQTT over TLS
today; docs/security.md). It loads `tls_cert_file` / `tls_key_file`, and when
`tls_ca_file` is set asks clients for a certificate signed by that CA:
required with `tls_require_certificate` (else optional; a certificate that
does not verify is refused either way), checked against `tls_crl_file`
(`VERIFY_CRL_CHECK_LEAF`: a revoked device certificate is refused in the
handshake). Every file is read at start: a missing or bad one is a
one-line `ConfigError` naming the setting, never a traceback.

`reloaded_context(settings)` is what SIGHUP does: the same files read again
into a new context, which the listeners use for the handshakes that follow
(connections already up keep theirs); a file that no longer loads keeps the
old context and logs one line naming its setting.

`certificate_identity(peercert, mode)` reads the device id from a verified
peer certificate (`ssl.SSLObject.getpeercert()`): its subject CN (`cn`) or
its first DNS subject alternative name (`san`), as Mosquitto's
`use_identity_as_username` does.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any, Literal

from hub.errors import ConfigError
from hub.settings import Settings

log = logging.getLogger(__name__)

IdentityMode = Literal["off", "cn", "san"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _env(key: str) -> str:
    return f"HUB_{key.upper()}"


def _fail(key: str, path: Path | None, problem: str) -> ConfigError:
    shown = f" = {str(path)!r}" if path is not None else ""
    return ConfigError(f"setting '{key}' ({_env(key)}){shown}: {problem}", key=key, env=_env(key))


def _readable(key: str, path: Path) -> None:
    """A ConfigError naming `key` unless `path` is a file that can be read."""
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise _fail(key, path, exc.strerror or str(exc)) from None
    if not path.is_file():
        raise _fail(key, path, "not a file")


def _reason(exc: ssl.SSLError | ValueError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"not a valid PEM file ({exc.reason.lower().replace('_', ' ')})"
    return f"not a valid PEM file ({exc})"


def server_context(settings: Settings) -> ssl.SSLContext:
    """The SSL context of the hub's TLS listeners; a ConfigError naming the setting
    when a file is missing, unreadable or invalid, or a needed one is unset."""
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None:
        raise _fail("tls_cert_file", None, "is needed for a TLS listener")
    _readable("tls_cert_file", cert)
    if key is not None:
        _readable("tls_key_file", key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.tls_min_version]
    try:
        # No password: an encrypted key fails here instead of OpenSSL asking
        # for its passphrase on the terminal of a hub started by a service manager.
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, ValueError) as exc:
        # OpenSSL does not say which of the two files is wrong: blame the key
        # when there is one (a certificate that loads alone is then fine).
        if key is not None and _loads_alone(cert):
            raise _fail(
                "tls_key_file", key, "not an unencrypted PEM key, or not the key of tls_cert_file"
            ) from None
        raise _fail("tls_cert_file", cert, _reason(exc)) from None
    ca = settings.tls_ca_file
    wants_client_cert = settings.tls_require_certificate or settings.tls_identity != "off"
    if ca is None:
        if wants_client_cert:
            setting = (
                "tls_require_certificate" if settings.tls_require_certificate else "tls_identity"
            )
            raise _fail("tls_ca_file", None, f"is needed by {setting} ({_env(setting)})")
        if settings.tls_crl_file is not None:
            raise _fail("tls_ca_file", None, "is needed by tls_crl_file (HUB_TLS_CRL_FILE)")
        return context
    _readable("tls_ca_file", ca)
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, ValueError) as exc:
        raise _fail("tls_ca_file", ca, _reason(exc)) from None
    crl = settings.tls_crl_file
    if crl is not None:
        _readable("tls_crl_file", crl)
        try:
            # load_verify_locations takes CRLs as well as certificates.
            context.load_verify_locations(cafile=crl)
        except (ssl.SSLError, ValueError) as exc:
            raise _fail("tls_crl_file", crl, _reason(exc)) from None
        if not _has_crl(crl):
            raise _fail("tls_crl_file", crl, "holds no X509 CRL")
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_mode = (
        ssl.CERT_REQUIRED if settings.tls_require_certificate else ssl.CERT_OPTIONAL
    )
    return context


def reloaded_context(settings: Settings) -> ssl.SSLContext | None:
    """A new server context from the TLS files as they are on disk now (SIGHUP),
    or None when one of them no longer loads: one line naming the setting is
    logged, and the listeners keep serving the context they have."""
    try:
        context = server_context(settings)
    except ConfigError as exc:
        log.error("TLS files not reloaded, the listeners keep the previous ones: %s", exc)
        return None
    log.info(
        "TLS files reloaded: %s%s",
        settings.tls_cert_file,
        f", CRL {settings.tls_crl_file}" if settings.tls_crl_file is not None else "",
    )
    return context


def _no_password() -> bytes:
    return b""


def _loads_alone(cert: Path) -> bool:
    """Whether `cert` begins with a certificate that parses (then a failing
    load_cert_chain is the key's fault)."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    try:
        text = cert.read_text("ascii", errors="replace")
        block = text[text.index(begin) : text.index(end) + len(end)]
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        probe.load_verify_locations(cadata=ssl.PEM_cert_to_DER_cert(block))
    except (OSError, ValueError, ssl.SSLError):
        return False
    return True


def _has_crl(path: Path) -> bool:
    # An empty or certificate-only file loads without error but revokes nothing:
    # with CRL checking on, every client would then be refused ("unable to get
    # certificate CRL"), so it is a configuration error at start instead.
    try:
        return b"-----BEGIN X509 CRL-----" in path.read_bytes()
    except OSError:
        return False


def certificate_identity(peercert: dict[str, Any] | None, mode: IdentityMode) -> str | None:
    """The identity a verified peer certificate names: its subject CN (`cn`) or
    its first DNS subject alternative name (`san`); None when it names none or
    `mode` is off."""
    if not peercert or mode == "off":
        return None
    if mode == "cn":
        for rdn in peercert.get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    return str(value)
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "DNS":
            return str(value)
    return None
