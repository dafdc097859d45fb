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


def test_the_architecture_guide_holds_the_channel_close_table():
    from amqproxy.protocol.closing import TABLE, ClientSide, CloseEvent, UpstreamSide

    starts = [
        (ClientSide.OPEN, UpstreamSide.OPEN),
        (ClientSide.OPEN, UpstreamSide.NONE),
        (ClientSide.DONE, UpstreamSide.OPEN),
    ]
    reachable: set[tuple[ClientSide, UpstreamSide]] = set()
    todo = list(starts)
    while todo:
        state = todo.pop()
        if state not in reachable:
            reachable.add(state)
            todo += [TABLE[(*state, event)][:2] for event in CloseEvent]
    rows = []
    for c, u in sorted(reachable, key=lambda s: (list(ClientSide).index(s[0]), list(UpstreamSide).index(s[1]))):
        for event in CloseEvent:
            nc, nu, effects = TABLE[(c, u, event)]
            if (nc, nu) != (c, u) or effects:
                done = ", ".join(e.value for e in effects) or "-"
                rows.append(f"| {c.value} / {u.value} | {event.value} | {nc.value} / {nu.value} | {done} |")
    table = "| client / upstream | event | next | effects, in order |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    guide = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert table in guide, "update the close table in docs/ARCHITECTURE.md (between <!-- close-table --> markers)"
