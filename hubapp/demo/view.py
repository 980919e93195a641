"""`hub demo`'s view: what it shows and how it draws it on a terminal.

Layer: composition root (`hubapp.demo`); imports only the standard library.
The orchestration (`hubapp.demo.orchestration`) fills a `Snapshot`; this
module turns it into lines: a frame redrawn in place with ANSI cursor movement
when the output is a terminal, one plain status line every two seconds
otherwise, and the summary at the end.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

#: The demo's device names (the summary tells how to read the first one's data).
TCP_PREFIX = "demo-tcp-"
MQTT_PREFIX = "demo-mqtt-"

TTY_REFRESH_S = 0.5
PLAIN_REFRESH_S = 2.0


# ---------------------------------------------------------------------------
# What the view shows
# ---------------------------------------------------------------------------


@dataclass
class CommandOutcome:
    """One demo command and, once known, its reply."""

    transport: str
    device_id: str
    name: str
    args: dict[str, Any]
    status: str = "queued"  # queued, waiting, ok, failed, no reply, not sent, interrupted
    result: Any = None
    error: str = ""
    round_trip_s: float | None = None

    @property
    def done(self) -> bool:
        return self.status not in ("queued", "waiting")

    def reply_text(self) -> str:
        if self.status == "ok":
            return json.dumps(self.result, separators=(", ", ": "))
        if self.status in ("queued", "waiting"):
            return f"{self.status}..."
        return f"{self.status}: {self.error}" if self.error else self.status

    def to_dict(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "device_id": self.device_id,
            "command": self.name,
            "args": self.args,
            "status": self.status,
            "result": self.result,
            "error": self.error or None,
            "round_trip_s": self.round_trip_s,
        }


@dataclass(frozen=True)
class TransportRow:
    name: str
    available: bool
    reason: str
    devices: int
    online: int
    rate_per_s: float
    sent: int
    acknowledged: int
    stored: int
    errors: int


@dataclass(frozen=True)
class DeviceRow:
    device_id: str
    values: Mapping[str, Any]
    age_s: float | None


@dataclass(frozen=True)
class Snapshot:
    """Everything one frame or status line shows, so rendering is a pure function."""

    elapsed_s: float
    duration_s: float
    phase: str
    mode: str
    listeners: str
    transports: Sequence[TransportRow]
    devices: Sequence[DeviceRow]
    commands: Sequence[CommandOutcome]
    notes: Sequence[str] = ()

    @property
    def stored_total(self) -> int:
        return sum(t.stored for t in self.transports)


def _fit(text: str, width: int) -> str:
    """One line cut to the terminal width: a wrapped line would break the redraw."""
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def render_frame(snap: Snapshot, width: int = 79) -> list[str]:
    """The live view for a terminal, each line at most `width` characters."""
    clock = f"{snap.elapsed_s:5.1f} s"
    if snap.elapsed_s <= snap.duration_s:
        clock += f" of {snap.duration_s:g} s"
    running = snap.phase not in ("done", "interrupted")
    lines = [
        f"hub demo  {clock}  {snap.phase}" + ("  (Ctrl+C ends it early)" if running else ""),
        snap.mode,
        snap.listeners,
        "",
        f"{'transport':<10}{'online':>9}{'msg/s':>9}{'sent':>10}{'acked':>10}{'stored':>10}"
        f"{'errors':>8}",
    ]
    for t in snap.transports:
        if t.available:
            lines.append(
                f"{t.name:<10}{f'{t.online}/{t.devices}':>9}{t.rate_per_s:>9.1f}{t.sent:>10}"
                f"{t.acknowledged:>10}{t.stored:>10}{t.errors:>8}"
            )
        else:
            lines.append(f"{t.name:<10}unavailable: {t.reason}")
    lines.append(f"tasks done: {snap.stored_total} telemetry rows stored by the worker")
    lines.append("")
    lines.append(f"{'device':<14}{'last seen':>10}  last values")
    if not snap.devices:
        lines.append("(nothing stored yet)")
    for d in snap.devices:
        age = "-" if d.age_s is None else f"{d.age_s:.1f} s ago"
        values = "  ".join(f"{k} {_number(v)}" for k, v in d.values.items()) or "-"
        lines.append(f"{d.device_id:<14}{age:>10}  {values}")
    lines.append("")
    lines.append(f"{'command':<14}{'device':<14}{'round trip':>10}  reply")
    if not snap.commands:
        lines.append("(sent once the devices are online)")
    for c in snap.commands:
        rtt = "" if c.round_trip_s is None else f"{c.round_trip_s:.2f} s"
        lines.append(f"{c.name:<14}{c.device_id:<14}{rtt:>10}  {c.reply_text()}")
    if snap.notes:
        lines.append("")
        lines.extend(f"log: {note}" for note in snap.notes)
    return [_fit(line, width) for line in lines]


def _rate(per_s: float) -> str:
    return f"{per_s:.1f}" if per_s < 10 else f"{per_s:.0f}"


def render_status_line(snap: Snapshot) -> str:
    """One plain status line: per transport online/devices, acked msg/s, stored/acked."""
    parts = [f"{snap.elapsed_s:6.1f}s"]
    for t in snap.transports:
        if t.available:
            parts.append(
                f"{t.name} {t.online}/{t.devices} {_rate(t.rate_per_s)}/s "
                f"stored {t.stored}/{t.acknowledged}"
            )
        else:
            parts.append(f"{t.name} n/a")
    done = sum(1 for c in snap.commands if c.done)
    parts.append(f"cmds {done}/{len(snap.commands)}")
    return "  ".join(parts)


def _wrap(prefix: str, text: str, width: int) -> list[str]:
    """`prefix + text`, the text wrapped below itself: a summary line is cut nowhere."""
    room = max(width - len(prefix), 20)
    parts = textwrap.wrap(text, room, break_on_hyphens=False) or [""]
    return [prefix + parts[0]] + [" " * len(prefix) + part for part in parts[1:]]


def render_summary(summary: Mapping[str, Any], width: int = 79) -> list[str]:
    """The final summary (the `--json` object) as text, no line wider than `width`."""
    how = "interrupted after" if summary["interrupted"] else "ran for"
    lines = [""]
    lines += _wrap("summary: ", f"{how} {summary['duration_s']:.1f} s, {summary['mode']}", width)
    lines += [
        "",
        f"{'transport':<10}{'devices':>9}{'sent':>10}{'acked':>10}{'stored':>10}"
        f"{'refused':>9}{'errors':>8}",
    ]
    for name, t in summary["transports"].items():
        if t["available"]:
            connected = f"{t['connected']}/{t['devices']}"
            lines.append(
                f"{name:<10}{connected:>9}{t['sent']:>10}"
                f"{t['acknowledged']:>10}{t['stored']:>10}{t['refused']:>9}{t['errors']:>8}"
            )
        else:
            lines += _wrap(f"{name:<10}", f"unavailable: {t['reason']}", width)
    lines.append("")
    lines.append(f"{'command':<14}{'device':<14}{'round trip':>10}  reply")
    if not summary["commands"]:
        lines.append("(none sent)")
    for c in summary["commands"]:
        rtt = "" if c["round_trip_s"] is None else f"{c['round_trip_s']:.2f} s"
        if c["status"] == "ok":
            reply = json.dumps(c["result"], separators=(", ", ": "))
        else:
            reply = f"{c['status']}: {c['error']}" if c["error"] else c["status"]
        lines += _wrap(f"{c['command']:<14}{c['device_id']:<14}{rtt:>10}  ", reply, width)
    if summary["last_values"]:
        lines.append("")
        lines.append("last values")
        for device_id, values in summary["last_values"].items():
            shown = "  ".join(f"{k} {_number(v)}" for k, v in values.items())
            lines += _wrap(f"  {device_id:<14}", shown, width)
    lines.append("")
    if summary["ok"]:
        lines.append("result: ok, every acknowledged message was stored")
    else:
        lines += _wrap("result: ", f"NOT OK, {summary['problem']}", width)
    if summary["data_dir"]:
        lines += _wrap(
            "data:   ",
            f"kept in {summary['data_dir']}; read it with HUB_DATA_DIR={summary['data_dir']} "
            f"hub telemetry {TCP_PREFIX}1",
            width,
        )
    return lines


# ---------------------------------------------------------------------------
# Output: a redrawn terminal view, or plain lines
# ---------------------------------------------------------------------------


class Display:
    """Plain lines: a header, one status line every two seconds, events as they happen."""

    refresh_s = PLAIN_REFRESH_S

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._broken = False

    def emit(self, text: str) -> None:
        """Write and flush; once the output is gone (a closed pipe or terminal),
        stay silent, so that the demo still stops what it started."""
        if self._broken:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except OSError:
            self._broken = True

    def write(self, lines: Sequence[str]) -> None:
        text: list[str] = []
        for line in lines:
            # Long lines continue indented past the time or label, to read in 80 columns.
            parts = textwrap.wrap(line, 79, subsequent_indent=" " * 10, break_on_hyphens=False)
            text.extend(part + "\n" for part in parts or [""])
        self.emit("".join(text))

    def begin(self, header: Sequence[str]) -> None:
        self.write(header)

    def frame(self, snap: Snapshot) -> None:
        self.write([render_status_line(snap)])

    def event(self, snap: Snapshot, text: str) -> None:
        self.write([f"{snap.elapsed_s:6.1f}s  {text}"])

    def end(self, snap: Snapshot) -> None:
        """The run is over (the last status line was written before the hub stopped)."""

    def restore(self) -> None:
        """Give the terminal back as it was (also after an error)."""


class LogCapture(logging.Handler):
    """Keeps the latest log messages for the terminal view, where a line written
    straight to the terminal would be overdrawn or push the view off its place."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: collections.deque[str] = collections.deque(maxlen=2)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname.lower()} {record.getMessage()}")


class TtyDisplay(Display):
    """The live view, redrawn in place twice a second."""

    refresh_s = TTY_REFRESH_S

    def __init__(self, out: TextIO) -> None:
        super().__init__(out)
        self._height = 0
        self._capture = LogCapture()
        self._saved_handlers: list[logging.Handler] = []
        self._active = False

    @property
    def notes(self) -> Sequence[str]:
        return tuple(self._capture.messages)

    def _size(self) -> tuple[int, int]:
        """Columns and rows the frame may use.

        One column short of the terminal, because writing the last column makes
        some terminals wrap at once; one row short, because a frame taller than
        the screen scrolls and the cursor cannot go back up to its first line.
        """
        size = shutil.get_terminal_size((80, 24))
        return max(size.columns - 1, 40), max(size.lines - 1, 10)

    def begin(self, header: Sequence[str]) -> None:
        # The frame shows everything the plain header says.
        root = logging.getLogger()
        self._saved_handlers = root.handlers[:]
        root.handlers = [self._capture]
        self._active = True
        self.emit("\x1b[?25l")  # hide the cursor while redrawing

    def frame(self, snap: Snapshot) -> None:
        width, height = self._size()
        lines = render_frame(snap, width)[:height]
        # Pad to the tallest frame so far, so that a shorter frame clears the rest.
        lines += [""] * (self._height - len(lines))
        parts = [f"\x1b[{self._height}A"] if self._height else []
        parts.extend(f"\r\x1b[2K{line}\n" for line in lines)
        self.emit("".join(parts))
        self._height = len(lines)

    def event(self, snap: Snapshot, text: str) -> None:
        self.frame(snap)  # the frame shows events (commands, phases) itself

    def end(self, snap: Snapshot) -> None:
        self.frame(snap)
        self.restore()

    def restore(self) -> None:
        if self._active:
            self._active = False
            self.emit("\x1b[?25h")
            logging.getLogger().handlers = self._saved_handlers


def is_terminal(out: TextIO) -> bool:
    """Whether `out` gets the terminal view (a tty that is not TERM=dumb)."""
    try:
        return out.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False
