"""A small certificate authority for testing TLS and mutual TLS: `hub ca init`, `--cert-out`.

Layer: composition root (`hubapp`); imports the `cryptography` package and the
`hub` core's errors only.

It lives here, beside the CLI that uses it, and not in `bridges`: the running
hub never issues certificates, it only reads PEM files through `ssl`
(bridges.tls). Only the operator's commands (and the tests) write them, so
`cryptography` stays out of every process's import path but these.

Files of a CA folder (docs/security.md, "Issuing certificates"):
`ca.crt`/`ca.key` (the CA, self-signed), `hub.crt`/`hub.key` (the hub's
server certificate, signed by it, for `tls_cert_file`/`tls_key_file`), and
`crl.pem` (the revocation list, empty at first). A device certificate has CN and
DNS SAN = the device id, so `tls_identity` = cn and san both find it. Keys
are ECDSA P-256 and written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub.errors import HubError

CA_CERT, CA_KEY, CA_CRL = "ca.crt", "ca.key", "crl.pem"
HUB_CERT, HUB_KEY = "hub.crt", "hub.key"
CA_DAYS = 3650
LEAF_DAYS = 825
_Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class Issued:
    """Where a certificate and its key were written."""

    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: _Key) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init_ca(
    directory: Path, *, name: str = "hub test CA", hostnames: tuple[str, ...] = ()
) -> Issued:
    """Create a CA (self-signed) in `directory`, and the hub's server certificate
    for `localhost`, 127.0.0.1, ::1 and `hostnames`. Refuses to overwrite a CA."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_KEY).exists():
        raise HubError(f"{directory / CA_KEY} exists already; remove the folder to start over")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(directory / CA_KEY, key)
    _write_cert(directory / CA_CERT, cert)
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    issue(directory, "hub", directory, names=names, server=True, stem="hub")
    revoke(directory)  # an empty list, so tls_crl_file can be set from the start
    return Issued(directory / CA_CERT, directory / CA_KEY)


def _load_ca(directory: Path) -> tuple[x509.Certificate, _Key]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise HubError(
            f"no usable CA in {directory} ({exc}); create one with `hub ca init --dir {directory}`"
        ) from None
    if not isinstance(key, _Key):
        raise HubError(f"{directory / CA_KEY} is not an ECDSA key made by `hub ca init`")
    return cert, key


def check_ca(directory: Path) -> None:
    """A HubError unless `directory` holds a CA made by `init_ca`."""
    _load_ca(directory)


def issue(
    ca_dir: Path,
    common_name: str,
    out_dir: Path,
    *,
    names: list[x509.GeneralName] | None = None,
    server: bool = False,
    stem: str | None = None,
    valid_from: datetime.datetime | None = None,
    valid_days: float = LEAF_DAYS,
) -> Issued:
    """Issue a certificate signed by the CA in `ca_dir`: CN = `common_name`, SAN =
    `names` (default: DNS `common_name`), for a client (a device) unless
    `server`; written as `out_dir/<stem>.crt` and `.key` (stem: the CN)."""
    ca_cert, ca_key = _load_ca(ca_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    start = valid_from if valid_from is not None else _now() - datetime.timedelta(minutes=5)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(names or [x509.DNSName(common_name)]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    stem = stem or common_name
    issued = Issued(out_dir / f"{stem}.crt", out_dir / f"{stem}.key")
    _write_key(issued.key, key)
    _write_cert(issued.cert, cert)
    return issued


def issue_device(ca_dir: Path, device_id: str, out_dir: Path) -> Issued:
    """A device certificate (CN and DNS SAN = `device_id`) for mutual TLS."""
    return issue(ca_dir, device_id, out_dir)


def revoke(ca_dir: Path, *certs: Path) -> Path:
    """Add `certs` to the CA's revocation list (`crl.pem`, for `tls_crl_file`),
    written anew with the earlier entries; returns its path."""
    ca_cert, ca_key = _load_ca(ca_dir)
    path = ca_dir / CA_CRL
    now = _now()
    revoked: list[x509.RevokedCertificate] = []
    if path.exists():
        revoked = list(x509.load_pem_x509_crl(path.read_bytes()))
    for cert_path in certs:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        revoked.append(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now)
            .build()
        )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=30))
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path
