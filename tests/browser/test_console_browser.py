"""The console in a real headless Chromium, step by step as an operator uses it.

Elements are found by role and label, as a person finds them. With
CONSOLE_SCREENSHOTS=<folder> the steps also leave the screenshots that
docs/console.md shows (`CONSOLE_SCREENSHOTS=docs/img pytest -m browser`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from hub.settings import Settings
from tests.support.console import ConsoleProcess, make_user
from tests.support.processes import HubThread, SimulatedDevice, Worker

pytestmark = [pytest.mark.browser, pytest.mark.integration]

StartHub = Callable[..., HubThread]
StartDevice = Callable[..., SimulatedDevice]

SHOTS = os.environ.get("CONSOLE_SCREENSHOTS")


def shot(page: Page, name: str, *, full_page: bool = False) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"console-{name}.png"), full_page=full_page)


def log_in(page: Page, console: ConsoleProcess, name: str, password: str) -> None:
    page.goto(f"{console.url}/devices")
    expect(page.get_by_role("heading", name="Log in to the hub console")).to_be_visible()
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    if name.startswith("admin"):
        shot(page, "login")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Devices", exact=True)).to_be_visible()


@pytest.fixture(scope="module")
def accounts(console_settings: Settings) -> dict[str, tuple[str, str]]:
    suffix = str(os.getpid())
    made = {}
    for role in ("admin", "operator", "viewer"):
        name = f"{role}-{suffix}"
        made[role] = (name, make_user(console_settings, name, role))
    return made


def test_an_admin_adds_a_device_watches_it_come_online_charts_it_and_pings_it(
    page: Page,
    console: ConsoleProcess,
    accounts: dict[str, tuple[str, str]],
    worker: Worker,
    running_hub: StartHub,
    simulated_devices: StartDevice,
    device_prefix: str,
) -> None:
    hub = running_hub(hub_heartbeat_s=0.5)
    device_id = f"{device_prefix}thermo"

    log_in(page, console, *accounts["admin"])

    # Add a device and see its credential.
    page.get_by_role("link", name="Provisioning").click()
    add = page.get_by_role("region", name="Add a device")
    add.get_by_label("Device id").fill(device_id)
    add.get_by_role("button", name="Add device").click()
    expect(page.get_by_role("status")).to_contain_text(f"Device {device_id} added")
    credentials = page.get_by_role("table", name="New credentials")
    row = credentials.get_by_role("row").filter(has_text=device_id)
    credential = row.locator("code").inner_text()
    assert len(credential) >= 32
    shot(page, "provisioning")

    # The devices page, searched down to this device: offline until it connects.
    page.get_by_role("link", name="Devices").click()
    page.get_by_label("Search by id").fill(device_prefix)
    table = page.get_by_role("table", name="Devices")
    device_row = table.get_by_role("row").filter(has_text=device_id)
    expect(device_row).to_have_count(1)
    expect(device_row).to_contain_text("offline")
    expect(page.get_by_role("status").filter(has_text="Live")).to_be_visible()
    page.evaluate("window.notReloaded = true")

    # Start the device: it comes online without a reload.
    simulated_devices("tcp", hub.tcp_port, device_id, credential, messages=None, rate=2)
    expect(device_row).to_contain_text("online", timeout=30_000)
    assert page.evaluate("window.notReloaded") is True
    page.get_by_label("Search by id").fill("")
    shot(page, "devices")

    # Its page: a chart of each numeric field that gains points as telemetry arrives.
    page.get_by_label("Search by id").fill(device_prefix)
    table.get_by_role("link", name=device_id).click()
    expect(page.get_by_role("heading", name=f"Device {device_id}")).to_be_visible()
    chart = page.get_by_role("img", name=re.compile(r"^temperature chart"))
    expect(chart).to_be_visible(timeout=30_000)
    first = int(chart.get_attribute("data-points") or 0)
    page.evaluate("window.notReloaded = true")
    expect(chart).not_to_have_attribute("data-points", str(first), timeout=30_000)
    later = int(chart.get_attribute("data-points") or 0)
    assert later > first
    assert page.evaluate("window.notReloaded") is True

    # Send ping and see the reply arrive.
    page.get_by_label("Command", exact=True).fill("ping")
    page.get_by_role("button", name="Send").click()
    reply = page.get_by_role("status", name="Command reply")
    expect(reply).to_contain_text("succeeded", timeout=60_000)
    expect(reply).to_contain_text('"pong": true')
    recent = page.get_by_role("table", name="Recent commands")
    expect(recent.get_by_role("row").filter(has_text="ping").first).to_contain_text("succeeded")
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "device", full_page=True)

    # The audit log shows who did it.
    page.get_by_role("link", name="Audit log").click()
    audit = page.get_by_role("table", name="Audit log")
    expect(
        audit.get_by_role("row").filter(has_text="device.add").filter(has_text=device_id)
    ).to_contain_text(f"user:{accounts['admin'][0]}")
    expect(audit.get_by_role("row").filter(has_text="command.send").first).to_be_visible()

    # Users: a new one's password is shown once; removing it takes it off the list.
    page.get_by_role("link", name="Users").click()
    add_user = page.get_by_role("region", name="Add a user")
    add_user.get_by_label("Name").fill(f"{device_prefix}ann")
    add_user.get_by_label("Role").select_option("viewer")
    add_user.get_by_role("button", name="Add user").click()
    expect(page.get_by_role("region", name=f"Password for {device_prefix}ann")).to_contain_text(
        "Shown only this once"
    )
    users = page.get_by_role("table", name="Users")
    expect(users.get_by_role("row").filter(has_text=f"{device_prefix}ann")).to_contain_text(
        "viewer"
    )
    page.once("dialog", lambda dialog: dialog.accept())
    users.get_by_role("button", name=f"Remove {device_prefix}ann").click()
    expect(page.get_by_role("status")).to_contain_text(f"User {device_prefix}ann removed")
    expect(users.get_by_role("row").filter(has_text=f"{device_prefix}ann")).to_have_count(0)

    # Hubs and queues.
    page.get_by_role("link", name="Hubs").click()
    expect(page.get_by_role("region", name=f"Hub {hub.app.downlink.hub_id}")).to_contain_text(
        "running"
    )
    shot(page, "hubs")

    # Log out: the pages ask for a login again.
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("heading", name="Log in to the hub console")).to_be_visible()
    page.goto(f"{console.url}/devices")
    expect(page.get_by_role("heading", name="Log in to the hub console")).to_be_visible()


def test_an_operator_replays_a_dead_letter(
    page: Page,
    console: ConsoleProcess,
    accounts: dict[str, tuple[str, str]],
    worker: Worker,
    device_prefix: str,
) -> None:
    from tests.integration.test_console_api import _dead_letter

    device_id = f"{device_prefix}dl"
    letter_id = _dead_letter(console, device_id, 7)
    log_in(page, console, *accounts["operator"])
    page.get_by_role("link", name="Dead letters").click()
    letters = page.get_by_role("table", name="Dead letters")
    row = letters.get_by_role("row").filter(has_text=device_id)
    expect(row).to_contain_text("the database refused the batch")
    shot(page, "dead-letters")
    row.get_by_role("button", name=f"Replay dead letter {letter_id[:8]}").click()
    expect(page.get_by_role("status")).to_contain_text(f"Dead letter {letter_id[:8]} replayed")
    expect(letters.get_by_role("row").filter(has_text=device_id)).to_have_count(0)
    page.get_by_label("Show").select_option("replayed")
    expect(letters.get_by_role("row").filter(has_text=device_id)).to_contain_text("replayed")


def test_a_viewer_cannot_see_the_admin_pages(
    page: Page, console: ConsoleProcess, accounts: dict[str, tuple[str, str]]
) -> None:
    log_in(page, console, *accounts["viewer"])
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link", name="Devices")).to_be_visible()
    for name in ("Provisioning", "Users", "Tokens", "Audit log"):
        expect(nav.get_by_role("link", name=name)).to_have_count(0)
    for path in ("/provisioning", "/users", "/tokens", "/audit"):
        page.goto(f"{console.url}{path}")
        expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
        expect(page.get_by_role("alert")).to_contain_text("needs the admin role")
    page.goto(f"{console.url}/devices")
    expect(page.get_by_role("button", name="Send")).to_have_count(0)


def test_the_console_is_readable_on_a_phone(
    browser: object, console: ConsoleProcess, accounts: dict[str, tuple[str, str]]
) -> None:
    from playwright.sync_api import Browser

    assert isinstance(browser, Browser)
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    try:
        log_in(page, console, *accounts["admin"])
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the devices page scrolls sideways on a phone ({width} px)"
        shot(page, "phone")
    finally:
        context.close()
