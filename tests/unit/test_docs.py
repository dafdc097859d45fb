"""Operator docs generated from, or checked against, the code, so that they cannot drift."""

import re
from pathlib import Path

from amqproxy.config import options_markdown

ROOT = Path(__file__).resolve().parents[2]
EVENT_PATTERNS = (re.compile(r'"event":\s*"([a-z_]+)"'), re.compile(r'log_extra\(\s*"([a-z_]+)"'))


def logged_events() -> set[str]:
    events: set[str] = set()
    for path in (ROOT / "amqproxy").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in EVENT_PATTERNS:
            events.update(pattern.findall(text))
    return events


def test_the_patterns_find_the_events():
    assert {"client_open", "upstream_lost", "reload", "worker_exit"} <= logged_events()


def test_every_log_event_is_in_the_operations_guide():
    guide = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    missing = sorted(e for e in logged_events() if f"`{e}`" not in guide)
    assert not missing, f"document these log events in docs/OPERATIONS.md (## Log events): {missing}"


def test_configuration_reference_holds_the_generated_option_table():
    reference = (ROOT / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")
    assert options_markdown() in reference, "regenerate with: python -m amqproxy.config --write-docs"
