"""The status page in a real browser: Debian's chromium, driven by chromium-driver through Selenium,
against a real proxy with real clients (one worker and --workers 2).

Checked as a person would see it: the numbers change as clients connect and leave, a node that is
down shows an open breaker and when it changes next, a limit's refusals are counted, client input
(a user name and a vhost holding markup) shows as text and runs nothing, and on a phone-sized
window nothing needs horizontal scrolling. The page polls every 0.5 s here (?refresh=0.5).

Screenshots go to the test's tmp dir. AMQPROXY_UPDATE_SCREENSHOT=1 also copies the desktop one to
docs/images/status-page.png, the README's picture (not on every run: it would dirty the tree).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pika
import pika.exceptions
import pytest

from tests.support.settings import REPO_ROOT, UPSTREAM_URL

from ._support import secret_file

pytestmark = [pytest.mark.integration, pytest.mark.proxy_only]

TOKEN = "page-t0ken"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT = 10.0  # s: the page polls every 0.5 s; a value must show within this
PHONE = (390, 844)  # CSS pixels of a common phone
# Client input with markup in it: if it were parsed, it would set window.__pwned.
HOSTILE_USER = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
HOSTILE_VHOST = '<img src=x onerror="window.__pwned=3"><b>maintenance</b>'


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless chromium for the module (a few seconds of browser time in all)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        reason = "chromium and chromium-driver are not installed (Debian packages; .ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for argument in (
        "--headless",
        "--no-sandbox",  # root, in a container
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------ helpers


def open_page(browser, proc, token: str | None = None) -> None:
    userinfo = f"admin:{token}@" if token else ""
    browser.set_window_size(1280, 1000)
    browser.get(f"http://{userinfo}{proc.host}:{proc.http_port}/status?refresh=0.5")
    refreshed(browser)


def refreshed(browser) -> int:
    """Wait for the page's next completed refresh; its count."""
    from selenium.webdriver.support.ui import WebDriverWait

    before = int(browser.execute_script("return Number(document.body.dataset.refreshed || 0)"))
    WebDriverWait(browser, WAIT).until(
        lambda d: int(d.execute_script("return Number(document.body.dataset.refreshed || 0)")) > before,
        f"the page did not refresh; problem shown: {problem(browser)!r}",
    )
    return before + 1


def problem(browser) -> str:
    return browser.execute_script("const p = document.getElementById('problem'); return p.hidden ? '' : p.textContent")


def shows(browser, what: str, probe, expected) -> None:
    """Wait until probe(browser) == expected, as the page renders it."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(browser, WAIT).until(lambda d: probe(d) == expected)
    except TimeoutException:
        pytest.fail(f"{what}: the page shows {probe(browser)!r}, expected {expected!r} (problem: {problem(browser)!r})")


def tile(browser, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id).text


def rows(browser, table_id: str) -> list[list[str]]:
    """The visible text of each body row's cells (as a person reads them; the desktop layout)."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr'),"
        " tr => Array.from(tr.cells, td => td.textContent))",
        table_id,
    )


def pool_row(browser, vhost: str, user: str) -> list[str] | None:
    return next((r for r in rows(browser, "pools") if r[0] == vhost and r[1] == user), None)


def node_row(browser, node: str) -> list[str] | None:
    return next((r for r in rows(browser, "nodes") if r[0] == node), None)


def screenshot(browser, path: Path) -> Path:
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, f"{path}: an empty picture?"
    return path


def client(proc, **kw) -> pika.BlockingConnection:
    conn = pika.BlockingConnection(pika.ConnectionParameters(proc.host, proc.port, **kw))
    conn.channel().queue_declare("", exclusive=True)  # opens the upstream channel too
    return conn


def close_all(conns) -> None:
    for conn in conns:
        try:
            conn.close()
        except pika.exceptions.AMQPError:
            pass


def http_status(url: str, authorization: str | None = None) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url)
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers)


@pytest.fixture
def dead_port():
    """A port bound and never listened on: connecting is refused at once, and nothing else can
    take the port during the test (a node that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# ------------------------------------------------------------------ tests


def test_the_page_follows_clients_and_shows_the_open_breaker_of_a_node_that_is_down(
    proxy_factory, browser, dead_port, tmp_path
):
    dead = f"127.0.0.1:{dead_port}"
    proc = proxy_factory(
        # The dead node first: round-robin dials it first, its breaker opens at the first failure.
        "--upstream", f"amqp://{dead}", "--upstream", UPSTREAM_URL,
        "--breaker-failures", "1", "--breaker-open-time", "60", "--breaker-open-max", "60",
        "--max-connections-per-user", "3", "--admin-token-file", secret_file(TOKEN),
    )  # fmt: skip
    base = f"http://{proc.host}:{proc.http_port}"
    # The token protects the page: a browser is asked for it (Basic), the token is the password.
    status, headers = http_status(f"{base}/status")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    basic = "Basic " + base64.b64encode(f"admin:{TOKEN}".encode()).decode()
    assert http_status(f"{base}/status", basic)[0] == 200
    assert http_status(f"{base}/status", f"Bearer {TOKEN}")[0] == 200

    open_page(browser, proc, TOKEN)
    assert browser.title == "amqproxy status"
    shows(browser, "clients", lambda b: tile(b, "total-clients"), "0")
    assert tile(browser, "version") == "0.1.0" and tile(browser, "ready") == "ready"

    conns = [client(proc) for _ in range(2)]
    try:
        shows(browser, "clients after two connected", lambda b: tile(b, "total-clients"), "2")
        shows(browser, "pool of guest on /", lambda b: (pool_row(b, "/", "guest") or [])[2:4], ["2", "2"])
        shows(browser, "upstream channels", lambda b: tile(b, "total-upstream-channels"), "2")
        # The node that is down: breaker open, and when it half-opens.
        shows(browser, "dead node's breaker", lambda b: (node_row(b, dead) or [""] * 3)[2], "open")
        assert node_row(browser, dead)[3].startswith("half-open in ")
        assert "Connection refused" in node_row(browser, dead)[6]
        assert node_row(browser, "127.0.0.1:5672")[2] == "closed"
        events = rows(browser, "events")
        assert any(r[1] == "failure" and r[2] == dead and "Connection refused" in r[4] for r in events), events
        assert any(r[1] == "failure" and r[2] == dead and "circuit breaker opened" in r[4] for r in events), events
        per_node = pool_row(browser, "/", "guest")[7]
        assert per_node.startswith("127.0.0.1:5672: ") and dead not in per_node

        conns.append(client(proc))
        with pytest.raises(pika.exceptions.AMQPConnectionError, match="user connection limit"):
            client(proc)  # the fourth of guest: --max-connections-per-user 3
        shows(browser, "clients at the limit", lambda b: tile(b, "total-clients"), "3")
        shows(
            browser,
            "the per-user limit and its refusal",
            lambda b: rows(b, "limits"),
            [["--max-connections-per-user", "3", "enforced", "1", "0"]],
        )
        # Counted when the Close goes out, after --limit-refusal-delay: maybe a refresh later.
        shows(browser, "refusals by reason", lambda b: rows(b, "refusals"), [["limit", "1"]])
        browser.set_window_size(1280, 1050)  # the whole page, for the README
        refreshed(browser)
        picture = screenshot(browser, tmp_path / "status-page.png")
        if os.environ.get("AMQPROXY_UPDATE_SCREENSHOT"):
            shutil.copyfile(picture, REPO_ROOT / "docs" / "images" / "status-page.png")

        # On a phone: cards instead of wide tables, nothing to scroll sideways.
        browser.set_window_size(*PHONE)
        refreshed(browser)
        width, viewport = browser.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert width <= viewport, f"the page is {width} px wide in a {viewport} px phone screen"
        header = "return getComputedStyle(document.querySelector('#nodes thead')).display"
        assert browser.execute_script(header) == "none"
        screenshot(browser, tmp_path / "status-page-phone.png")
        browser.set_window_size(1280, 1000)
    finally:
        close_all(conns[1:])
    shows(browser, "clients after two left", lambda b: tile(b, "total-clients"), "1")
    shows(browser, "pool after two left", lambda b: (pool_row(b, "/", "guest") or [])[2:4], ["1", "1"])
    close_all(conns[:1])
    shows(browser, "clients after all left", lambda b: tile(b, "total-clients"), "0")


@pytest.fixture
def hostile_user(broker):
    """A broker user whose name holds markup, with full permissions on "/" (deleted after)."""
    user = f"{HOSTILE_USER}-{uuid.uuid4().hex[:6]}"
    broker.ctl("add_user", user, "hostile-pw")
    try:
        broker.ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        yield user
    finally:
        broker.ctl("delete_user", user, check=False)


def test_user_names_and_vhosts_show_as_text_and_run_nothing(proxy_factory, browser, hostile_user, tmp_path):
    """A user and a paused vhost whose names hold markup: shown literally, nothing runs."""
    proc = proxy_factory()
    conn = client(proc, credentials=pika.PlainCredentials(hostile_user, "hostile-pw"))
    vhost = urllib.parse.quote(HOSTILE_VHOST, safe="")
    pause = urllib.request.Request(f"http://{proc.host}:{proc.http_port}/vhosts/pause?vhost={vhost}", method="POST")
    with urllib.request.urlopen(pause, timeout=10) as response:
        assert response.status == 200
    try:
        open_page(browser, proc)
        shows(browser, "the hostile user's pool", lambda b: (pool_row(b, "/", hostile_user) or [])[2:3], ["1"])
        shows(
            browser,
            "the paused vhost",
            lambda b: b.execute_script(
                "return Array.from(document.querySelectorAll('#paused li'), li => li.textContent)"
            ),
            [HOSTILE_VHOST],
        )
        refreshed(browser)  # a few more rounds of rendering
        assert browser.execute_script("return window.__pwned === undefined")
        assert browser.execute_script("return document.querySelectorAll('main img, main script, main b').length") == 0
        screenshot(browser, tmp_path / "status-page-hostile-names.png")
    finally:
        close_all([conn])


def test_with_two_workers_the_page_shows_every_worker_and_the_sum_of_their_clients(proxy_factory, browser, tmp_path):
    proc = proxy_factory("--workers", "2", "--drain-timeout", "3")
    open_page(browser, proc)
    shows(browser, "workers", lambda b: [r[2] for r in rows(b, "workers")], ["alive", "alive"])
    assert [r[0] for r in rows(browser, "workers")] == ["0", "1"]
    assert tile(browser, "worker-count") == "workers 2 / 2 alive"
    conns: list[pika.BlockingConnection] = []
    try:
        # Until the kernel has spread them over both workers (SO_REUSEPORT), at most a few more.
        while len(conns) < 4 or len({c["worker"] for c in proc.admin_json("/connections")["connections"]}) < 2:
            assert len(conns) < 24, "every client landed on one worker"
            conns.append(client(proc))
        shows(browser, "clients of both workers", lambda b: tile(b, "total-clients"), str(len(conns)))
        shows(browser, "pool summed over the workers", lambda b: (pool_row(b, "/", "guest") or [])[2], str(len(conns)))
        # Each worker has its own pool, so its own view of the node.
        shows(browser, "the node, once per worker", lambda b: sorted(r[1] for r in rows(b, "nodes")), ["0", "1"])
        worker_column = "return getComputedStyle(document.querySelector('#nodes th.worker-col')).display"
        assert browser.execute_script(worker_column) != "none"
        screenshot(browser, tmp_path / "status-page-workers.png")
    finally:
        close_all(conns)
    shows(browser, "clients after all left", lambda b: tile(b, "total-clients"), "0")
