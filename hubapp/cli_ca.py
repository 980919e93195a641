"""`hub ca`: a test certificate authority for TLS and mutual TLS (docs/security.md).

Layer: composition root (`hubapp`); imports `hubapp.certificates` and the `hub` core.
"""

from __future__ import annotations

from pathlib import Path

import click

from hubapp import certificates
from hubapp.cli_common import friendly_errors, settings_from


def default_ca_dir(ctx: click.Context) -> Path:
    """The CA folder when none is given: `ca` in the data folder."""
    return settings_from(ctx).data_dir / "ca"


@click.group()
def ca() -> None:
    """A certificate authority for testing TLS (not for production)."""


@ca.command("init")
@click.option("--dir", "directory", type=click.Path(path_type=Path), help="Default: DATA_DIR/ca.")
@click.option(
    "--hostname", "hostnames", multiple=True, help="Another name of the hub in its certificate."
)
@click.pass_context
@friendly_errors
def ca_init(ctx: click.Context, directory: Path | None, hostnames: tuple[str, ...]) -> None:
    """Create a CA, the hub's server certificate and an empty revocation list."""
    directory = directory or default_ca_dir(ctx)
    certificates.init_ca(directory, hostnames=hostnames)
    click.echo(f"CA created in {directory}; serve TLS with:")
    click.echo(f"  HUB_TLS_CERT_FILE={directory / certificates.HUB_CERT}")
    click.echo(f"  HUB_TLS_KEY_FILE={directory / certificates.HUB_KEY}")
    click.echo(f"  HUB_TLS_CA_FILE={directory / certificates.CA_CERT}")
    click.echo(f"  HUB_TLS_CRL_FILE={directory / certificates.CA_CRL}")


@ca.command("revoke")
@click.argument("certs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--dir", "directory", type=click.Path(path_type=Path), help="Default: DATA_DIR/ca.")
@click.pass_context
@friendly_errors
def ca_revoke(ctx: click.Context, certs: tuple[Path, ...], directory: Path | None) -> None:
    """Add CERTS to the revocation list (restart the hub to load it)."""
    path = certificates.revoke(directory or default_ca_dir(ctx), *certs)
    click.echo(f"{len(certs)} certificate(s) revoked in {path}")


@ca.command("issue")
@click.argument("device_id")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for ID.crt and ID.key.",
)
@click.option("--dir", "directory", type=click.Path(path_type=Path), help="Default: DATA_DIR/ca.")
@click.pass_context
@friendly_errors
def ca_issue(ctx: click.Context, device_id: str, out_dir: Path, directory: Path | None) -> None:
    """Issue a new certificate for DEVICE_ID (a registered device's next one)."""
    from hub.envelope import validate_device_id

    issued = certificates.issue_device(
        directory or default_ca_dir(ctx), validate_device_id(device_id), out_dir
    )
    click.echo(f"certificate: {issued.cert}, key: {issued.key}")
