"""`tulle dashboard` in a real browser (Debian's chromium, headless, driven by playwright)
on the running demo: the topology shows web -> books and web -> authors as mTLS edges,
the golden metrics move between two reads, a new event shows within a second of being
published, a policy change shows a denied edge, and the page logs no console error
(a CSP violation is one). One `tulle up` and one dashboard for the module; a screenshot
of each view goes to $TULLE_SCREENSHOTS (default: the module's tmp dir)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, requires_netns, wait_until
from tests.local_support import TULLE, read_record, tulle

pytestmark = [requires_netns, pytest.mark.root]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WEB_ID = "web.demo.serviceaccount.identity.tulle.cluster.local"
TRAFFIC_ID = "traffic.demo.serviceaccount.identity.tulle.cluster.local"
UI_TIMEOUT_MS = 20_000

if not Path(CHROMIUM).exists():
    pytestmark.append(pytest.mark.skip(reason=f"needs Debian's chromium at {CHROMIUM}; `make test` installs it as root"))


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("TULLE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo from a folder of our own (the policy test edits it), and its dashboard."""
    root = tmp_path_factory.mktemp("dashboard")
    folder = root / "demo"
    shutil.copytree(REPO / "examples" / "demo", folder)
    state = root / "state"
    up = tulle("up", "--detach", "--isolation", "netns", "--timeout", "150", str(folder), state=state, timeout=200)
    dashboard = None
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        out = root / "dashboard.out"
        env = dict(os.environ, TULLE_STATE_DIR=str(state))
        env.pop("TULLE_NATS_URL", None)
        with open(out, "w") as stdout, open(root / "dashboard.err", "w") as stderr:
            dashboard = subprocess.Popen([TULLE, "dashboard", "--port", "0", "--window", "5s"], stdout=stdout,
                                         stderr=stderr, env=env)
        line = wait_until(lambda: out.read_text().strip() or dashboard.poll() is not None, timeout=30,
                          what="the dashboard's address on stdout")
        assert dashboard.poll() is None, (root / "dashboard.err").read_text()
        url = line.split()[2]
        assert url.startswith("http://127.0.0.1:"), line
        yield {"url": url, "state": state, "folder": folder}
    finally:
        if dashboard is not None and dashboard.poll() is None:
            dashboard.send_signal(signal.SIGTERM)
            dashboard.wait(10)
        tulle("down", state=state)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def page(browser, demo):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.problems = []  # console errors and warnings, uncaught exceptions, refused requests
    page.on("console", lambda m: m.type in ("error", "warning") and page.problems.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.problems.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: page.problems.append(f"request failed: {r.url} {r.failure}"))
    page.goto(demo["url"])
    yield page
    page.close()


@pytest.fixture(autouse=True)
def no_console_errors(request):
    yield
    if "page" in request.fixturenames:
        page = request.getfixturevalue("page")
        problems, page.problems[:] = list(page.problems), []
        assert problems == [], "the page logged: " + "; ".join(problems)


def show(page, view: str) -> None:
    page.evaluate("(v) => { location.hash = v; }", view)
    page.wait_for_selector(f"#view-{view}.active", timeout=UI_TIMEOUT_MS)


def edge_row(src: str, dst: str, extra: str = "") -> str:
    return f'#edges tr[data-src="{src}"][data-dst="{dst}"]{extra}'


def test_topology_shows_web_calling_books_and_authors_over_mtls(page, screenshots):
    show(page, "topology")
    for dst in ("demo/books", "demo/authors"):
        page.wait_for_selector(edge_row("demo/web", dst, '[data-mtls="true"]'), timeout=UI_TIMEOUT_MS)
    page.wait_for_selector(edge_row("demo/traffic", "demo/web", '[data-mtls="true"]'), timeout=UI_TIMEOUT_MS)
    # The graph itself: cytoscape drew the same edges.
    drawn = page.evaluate("() => graph.cy.edges().map((e) => e.data('source') + '>' + e.data('target'))")
    assert {"demo/web>demo/books", "demo/web>demo/authors"} <= set(drawn)
    page.screenshot(path=str(screenshots / "topology.png"))


def test_workload_golden_metrics_are_live(page, screenshots):
    show(page, "workloads")
    row = '#workloads tr[data-workload="demo/authors"]'
    page.wait_for_selector(f'{row}:not([data-rps=""])', timeout=UI_TIMEOUT_MS)
    first = page.get_attribute(row, "data-rps"), page.get_attribute(row, "data-success")
    # Traffic flows at ~10 rps with a quarter of authors' answers failing: the next reads differ.
    page.wait_for_function("([sel, rps, success]) => { const r = document.querySelector(sel);"
                           " return r && (r.dataset.rps !== rps || r.dataset.success !== success); }",
                           arg=[row, *first], timeout=UI_TIMEOUT_MS)
    cells = page.inner_text(row).split("\t")
    assert cells[0] == "demo/authors" and cells[1] == "yes" and cells[2].endswith("%") and cells[4].endswith("ms")
    page.wait_for_function("() => document.querySelectorAll('#rps-chart canvas').length > 0", timeout=UI_TIMEOUT_MS)
    page.screenshot(path=str(screenshots / "workloads.png"), full_page=True)


def test_routes_show_effective_and_actual_success_of_a_retried_route(page, screenshots):
    show(page, "routes")
    row = '#routes tr[data-service="authors.demo"][data-route="GET /authors/{id}"]'
    page.wait_for_selector(row, timeout=UI_TIMEOUT_MS)
    # authors fails a quarter of its answers and the profile retries them: callers see more
    # success than the wire does.
    page.wait_for_function("(sel) => { const c = document.querySelector(sel).cells;"
                           " return c[3].textContent !== '-' && parseFloat(c[3].textContent) > parseFloat(c[4].textContent); }",
                           arg=row, timeout=UI_TIMEOUT_MS)
    assert page.inner_text(f"{row} td:nth-child(3)") == "yes"
    page.screenshot(path=str(screenshots / "routes.png"), full_page=True)


def test_identity_shows_each_proxys_certificate_and_the_issuers_expiry(page, screenshots):
    show(page, "identity")
    for workload in ("authors", "books", "traffic", "web"):
        page.wait_for_selector(f'#proxies tr[data-proxy="demo/{workload}"]:not([data-cert-expiry=""])',
                               timeout=UI_TIMEOUT_MS)
    assert page.inner_text('#proxies tr[data-proxy="demo/web"] td:nth-child(2)') == WEB_ID
    assert page.inner_text('#proxies tr[data-proxy="demo/web"] td:nth-child(4)') == "yes"
    page.wait_for_selector('#trust dd[data-issuer-expiry]:not([data-issuer-expiry=""])', timeout=UI_TIMEOUT_MS)
    assert "cluster.local" in page.inner_text("#trust")
    page.screenshot(path=str(screenshots / "identity.png"), full_page=True)


def test_authorization_shows_policies_and_explains_a_client(page, screenshots):
    show(page, "authorization")
    page.wait_for_selector('#policies .policy[data-workload="demo.authors"]', timeout=UI_TIMEOUT_MS)
    assert f"{WEB_ID} from anywhere" in page.inner_text('#policies .policy[data-workload="demo.authors"]')
    page.select_option("#explain-workload", "demo.authors")
    page.fill("#explain-port", "8080")
    page.fill("#explain-from", TRAFFIC_ID)
    page.click("#explain-form button")
    page.wait_for_selector('#explain-result [data-allowed="false"]', timeout=UI_TIMEOUT_MS)
    assert "no authorization on Server authors-http admits identity" in page.inner_text("#explain-result")
    page.fill("#explain-from", WEB_ID)
    page.click("#explain-form button")
    page.wait_for_selector('#explain-result [data-allowed="true"]', timeout=UI_TIMEOUT_MS)
    assert "allowed by backends-from-web on authors-http" in page.inner_text("#explain-result")
    page.screenshot(path=str(screenshots / "authorization.png"), full_page=True)


def test_extensions_page_shows_components_versions_and_health(page, screenshots):
    from tulle import __version__

    show(page, "extensions")
    for name in ("nats", "destination", "identity", "policy", "injector", "proxies"):
        page.wait_for_selector(f'#components tr[data-component="{name}"][data-healthy="true"]', timeout=UI_TIMEOUT_MS)
    assert page.inner_text('#components tr[data-component="policy"] td:nth-child(3)') == __version__
    page.wait_for_selector('#check [data-success="true"]', timeout=UI_TIMEOUT_MS)
    assert "data plane proxies trust the installation's anchors" in page.inner_text("#check")
    page.screenshot(path=str(screenshots / "extensions.png"), full_page=True)


def test_a_new_event_appears_within_a_second_of_being_published(page, demo, screenshots):
    from tulle.bus import Bus, BusCredentials
    from tulle.dashboard.views import event_time

    show(page, "events")
    page.wait_for_selector('#events tr[data-type="proxy.ready"]', timeout=UI_TIMEOUT_MS)  # the replay is in
    page.fill("#event-filter", "injector.*")
    record = read_record(demo["state"])
    # Test scaffolding: the run's injector credential may publish injector events.
    creds = BusCredentials.for_seed(str(Path(demo["state"]) / "nats" / "keys" / "injector.nk"))

    async def publish():
        bus = Bus(record["nats"]["url"], component="injector", instance="dashboard-test", credentials=creds)
        await bus.start()
        try:
            return await bus.publish_event("injection-skipped", {
                "namespace": "demo", "pod": "dashboard-probe", "owner_kind": "Deployment", "owner_name": "probe",
                "reason": "the dashboard test published this"}, subject="demo/dashboard-probe")
        finally:
            await bus.close()

    # playwright's sync API runs an event loop on this thread: the bus client gets its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        event = pool.submit(asyncio.run, publish()).result(timeout=30)
    assert event is not None
    row = page.wait_for_selector(f'#events tr[data-id="{event.id}"]', timeout=UI_TIMEOUT_MS)
    shown_ms = int(row.get_attribute("data-shown-at"))
    published_ms = event_time({"time": event.time}, 0) * 1000
    assert shown_ms - published_ms < 1000, f"shown {shown_ms - published_ms:.0f} ms after it was published"
    # The filter keeps only the matching types (`tulle events --type`'s patterns).
    shown = set(page.eval_on_selector_all("#events tbody tr", "rows => rows.map(r => r.dataset.type)"))
    assert "injector.injection-skipped" in shown and all(t.startswith("injector.") for t in shown), shown
    page.fill("#event-filter", "")
    page.wait_for_selector('#events tr[data-type="proxy.ready"]', timeout=UI_TIMEOUT_MS)
    page.screenshot(path=str(screenshots / "events.png"))


def test_a_policy_change_shows_a_denied_edge(page, demo, screenshots):
    """authors-http leaves the servers web may call: its proxy now answers web 403."""
    policy = demo["folder"] / "policy.yaml"
    text = policy.read_text()
    marker = "  name: authors-http\n  namespace: demo\n  labels:\n    tier: backend\n"
    assert marker in text
    policy.write_text(text.replace(marker, marker.replace("tier: backend", "tier: closed")))
    show(page, "topology")
    page.wait_for_selector(edge_row("demo/web", "demo/authors", ':not([data-denied="0"])'), timeout=30_000)
    assert "denied" in (page.get_attribute(edge_row("demo/web", "demo/authors"), "class") or "")
    drawn = page.evaluate("() => graph.cy.getElementById('demo/web->demo/authors').classes()")
    assert "denied" in drawn
    page.screenshot(path=str(screenshots / "topology-denied.png"))
