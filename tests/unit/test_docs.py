"""The documentation's examples are accepted by the code they describe."""

from __future__ import annotations

import re
from pathlib import Path

from hub.settings import Settings, load_settings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_example_configuration_file_is_accepted(tmp_path: Path) -> None:
    text = (DOCS / "configuration.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block is not None
    config = tmp_path / "hub.toml"
    config.write_text(block.group(1))
    settings = load_settings(config)
    assert [(x.port, x.codec) for x in settings.listeners] == [(7700, "native"), (7701, "lines")]


def test_every_setting_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name}` |" in text, name
