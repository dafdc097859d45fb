"""The status page's files, its token check, and the supervisor's merge of what its script polls.

The page itself is tested in a real browser in tests/integration/test_status_page.py; these are
the rules that need no browser."""

from __future__ import annotations

import base64
import json
import re
from importlib import resources

import pytest

from amqproxy import statuspage
from amqproxy.admin import page_response, token_refusal
from amqproxy.supervisor import merge_answers

TOKEN = "s3cret-token"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (f"Bearer {TOKEN}", None),
        (basic("", TOKEN), None),
        (basic("operator", TOKEN), None),
        (basic("operator", "wrong"), "403 Forbidden"),
        ("Bearer wrong", "403 Forbidden"),
        ("", "401 Unauthorized"),
        ("Basic !!!not-base64", "401 Unauthorized"),
        (f"Token {TOKEN}", "401 Unauthorized"),
    ],
)
def test_the_token_comes_as_bearer_or_as_the_basic_password(header, status):
    refusal = token_refusal({"HTTP_AUTHORIZATION": header}, TOKEN)
    assert (refusal.status if refusal is not None else None) == status
    assert token_refusal({"HTTP_AUTHORIZATION": header}, "") is None  # no token configured


def call(path: str, token: str | None, authorization: str = "") -> tuple[str, dict[str, str], bytes]:
    answer: dict = {}

    def start_response(status, headers):
        answer["status"], answer["headers"] = status, dict(headers)

    body = b"".join(page_response({"PATH_INFO": path, "HTTP_AUTHORIZATION": authorization}, start_response, token))
    return answer["status"], answer["headers"], body


def test_every_file_is_in_the_package_and_served_with_its_type_and_policy():
    for path, (name, content_type) in statuspage.FILES.items():
        assert resources.files("amqproxy").joinpath("status", name).is_file(), name
        status, headers, body = call(path, None)
        assert status == "200 OK" and headers["Content-Type"] == content_type and body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"


def test_with_a_token_the_page_asks_a_browser_for_it_and_its_assets_stay_open():
    for path in ("/", "/status"):
        status, headers, body = call(path, TOKEN)
        assert status == "401 Unauthorized" and headers["WWW-Authenticate"].startswith('Basic realm="amqproxy admin"')
        assert b"<" not in body
        assert call(path, TOKEN, basic("me", "wrong"))[0] == "401 Unauthorized"  # asked again, not 403
        assert call(path, TOKEN, basic("me", TOKEN))[0] == "200 OK"
        assert call(path, TOKEN, f"Bearer {TOKEN}")[0] == "200 OK"
    assert call("/status/status.js", TOKEN)[0] == "200 OK"  # no data in it


def test_the_script_never_parses_data_as_markup():
    script = resources.files("amqproxy").joinpath("status", "status.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, f"status.js uses {sink}: build DOM nodes from text instead"


def test_the_page_loads_nothing_from_elsewhere():
    page = resources.files("amqproxy").joinpath("status", "index.html").read_text()
    assert "<script>" not in page  # inline scripts are refused by the page's own policy anyway
    for reference in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert reference.startswith("/") or reference == "data:,", reference
    script = resources.files("amqproxy").joinpath("status", "status.js").read_text()
    assert not re.findall(r"[\"'`]\s*(?:https?:)?//", script), "the script fetches from its own origin only"


def worker_answer(index: int, body: dict) -> tuple[int, int, bytes, str]:
    return index, 200, json.dumps(body).encode(), "application/json"


def limits_body(refused_user: int, refused: dict) -> dict:
    return {
        "limits": [
            {
                "limit": "max_connections_per_user",
                "option": "--max-connections-per-user",
                "value": 3,
                "mode": "enforced",
                "refused": refused_user,
                "would_refuse": 0,
            },
        ],
        "upstream_limits": {"max_upstreams": 0, "max_upstreams_per_credential": 0},
        "limit_refusal_delay_s": 0.75,
        "access": {"allow_cidr": [], "deny_cidr": [], "authz_policy": False},
        "refused": refused,
    }


def test_workers_limits_merge_with_the_settings_once_and_the_counts_summed():
    status, body, _type = merge_answers(
        "/limits",
        [worker_answer(0, limits_body(2, {"limit": 2, "auth": 1})), worker_answer(1, limits_body(1, {"limit": 1}))],
    )
    merged = json.loads(body)
    assert status == 200
    (row,) = merged["limits"]
    assert (row["value"], row["refused"]) == (3, 3)  # the value is not summed
    assert merged["refused"] == {"auth": 1, "limit": 3} and merged["limit_refusal_delay_s"] == 0.75


def test_workers_upstream_events_merge_newest_first_with_their_worker():
    def event(at: float, text: str) -> dict:
        return {"kind": "failure", "node": "n:5672", "text": text, "count": 1, "at": at, "first_at": at, "age_s": 0}

    answers = [
        worker_answer(0, {"nodes": [], "connections": [], "events": [event(10.0, "a"), event(5.0, "c")]}),
        worker_answer(1, {"nodes": [], "connections": [], "events": [event(7.0, "b")]}),
    ]
    merged = json.loads(merge_answers("/upstreams", answers)[1])
    assert [(e["text"], e["worker"]) for e in merged["events"]] == [("a", 0), ("b", 1), ("c", 0)]
