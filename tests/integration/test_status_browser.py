"""The status page in a real browser (Debian's chromium through chromium-driver and Selenium).

A real `bootd serve` with 5,000 nodes: the page must draw them in under 2 s, and
with 100 node events a second sent through the node API (as stage ones send
them) it must draw each state change within 1 s, without a reload.  The lag
is measured in the browser: each drawn change is logged with the browser's
clock, against the time the event was sent (one machine, one clock).
A screenshot and the figures are kept in build/artifacts (BOOTD_TEST_ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT
from tests.integration.statusd import Daemon, node_name, node_token, status_daemon

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (tools/setup.sh installs them)"),
]

NODES = 5000
RATE = 100  # node events a second
SECONDS = 10
CHAIN = ("stage1", "fetching", "verified", "booted", "ready")
ARTIFACTS = Path(os.environ.get("BOOTD_TEST_ARTIFACTS", ROOT / "build" / "artifacts"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with status_daemon(tmp_path_factory.mktemp("browser"), NODES, groups=("compute", "gpu", "login"),
                       unapproved=3) as d:
        yield d


@pytest.fixture(scope="module")
def browser() -> Any:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_js(driver: Any, expr: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(f"return {expr}")
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {expr}"
        time.sleep(0.02)


def login(driver: Any, d: Daemon) -> None:
    from selenium.webdriver.common.by import By

    driver.get(d.admin + "/status")
    wait_js(driver, "!document.getElementById('login').hidden", 10)
    driver.find_element(By.ID, "token").send_keys(d.admin_token)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait_js(driver, "window.bootdLoaded", 20)


def test_page_loads_5000_nodes_fast_and_follows_100_events_a_second(daemon: Daemon, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    login(browser, daemon)
    # The measured load: a logged-in operator opens the page (navigation to the drawn table).
    # bootdPainted: the counts of all nodes and the first screen of rows painted; bootdComplete: every row
    # in the page (drawn in slices after the first screen).
    loads, completes = [], []
    for _ in range(3):
        browser.get(daemon.admin + "/status")
        loads.append(wait_js(browser, "window.bootdPainted", 20) / 1000)
        completes.append(wait_js(browser, "window.bootdComplete", 20) / 1000)
    rows = browser.execute_script("return document.querySelectorAll('#rows .row').length")
    assert rows == NODES
    transfer = browser.execute_script("""
        const nav = performance.getEntriesByType('navigation')[0];
        let bytes = nav.transferSize, plain = nav.decodedBodySize;
        for (const r of performance.getEntriesByType('resource')) {
            if (!r.name.includes('/status/api/events')) { bytes += r.transferSize; plain += r.decodedBodySize; }
        }
        return [bytes, plain];""")
    counts = browser.find_element(By.ID, "counts").text.split("\n")
    assert f"{NODES} all" in counts and f"{NODES} discovered" in counts and "0 ready" in counts, counts

    # 100 events a second through the node API; every node's next step comes 2 s after its last.
    browser.execute_script("window.bootdMeasure = true; window.bootdDrawn = [];")
    wait_js(browser, "document.getElementById('conn').textContent === 'live'", 10)
    plan = [(10 + i % (RATE * 2), CHAIN[i // (RATE * 2)]) for i in range(RATE * SECONDS)]  # n0000-2: unapproved
    sent, behind = asyncio.run(inject(daemon, plan))
    # A state counts as shown when the node's row shows it or a later step: when bootd answers slower than
    # the rate, two steps of one node can land in one frame, and the page draws the newer (the timeline
    # keeps both).
    deadline = time.monotonic() + 5
    while True:
        drawn = browser.execute_script("return window.bootdDrawn")
        by_node: dict[str, list[tuple[int, float, float]]] = {}
        for name, state, t, since in drawn:
            if state in CHAIN:
                by_node.setdefault(name, []).append((CHAIN.index(state), t, since))
        shown: dict[tuple[str, str], tuple[float, float]] = {}
        for name, state in sent:
            step = CHAIN.index(state)
            hit = next(((t, since) for i, t, since in by_node.get(name, []) if i >= step), None)
            if hit is not None:
                shown[(name, state)] = hit
        missing = [k for k in sent if k not in shown]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    stats = browser.execute_script("return window.bootdStats")
    assert not missing, (f"{len(missing)} of {len(sent)} state changes never drawn, e.g. {missing[:5]}; {stats}; "
                         f"drawn for {missing[0][0]}: {by_node.get(missing[0][0])}")
    # End to end: from the node's POST to the drawn row. Page side: from bootd publishing the change on its
    # bus (the update carries the time) to the drawn row: the stream and the page.
    lags = sorted(shown[k][0] - t for k, t in sent.items())
    page_lags = sorted(t - since for t, since in shown.values())
    median, worst = statistics.median(lags), lags[-1]

    # A row click opens the node's timeline with the changes just made.
    browser.find_element(By.CSS_SELECTOR, "#rows .row[data-name='n0011']").click()
    wait_js(browser, "document.querySelectorAll('#tl-events li').length >= 5", 5)
    timeline = browser.find_element(By.ID, "tl-events").text
    assert "ready" in timeline and "stage1" in timeline
    # The state filter hides the rest.
    browser.execute_script("document.getElementById('f-state').value = 'ready';"
                           "document.getElementById('f-state').dispatchEvent(new Event('change'));")
    shown = browser.execute_script("return [...document.querySelectorAll('#rows .row')].filter(r => !r.hidden).length")
    ready = sum(1 for _, s in plan if s == "ready")
    assert shown == ready

    browser.execute_script("document.getElementById('f-state').value = '';"
                           "document.getElementById('f-state').dispatchEvent(new Event('change'));")
    # The hostlist filter (expanded by bootd), with the group filter on top of it.
    browser.execute_script("const h = document.getElementById('f-hostlist'); h.value = 'n[0100-0199],n4999';"
                           "h.dispatchEvent(new Event('change'));")
    wait_js(browser, "document.getElementById('shown').textContent === '101 shown'", 5)
    browser.execute_script("document.getElementById('f-group').value = 'gpu';"
                           "document.getElementById('f-group').dispatchEvent(new Event('change'));")
    visible = browser.execute_script(
        "return [...document.querySelectorAll('#rows .row')].filter(r => !r.hidden).map(r => r.dataset.name)")
    assert visible == [node_name(i) for i in range(100, 200) if i % 3 == 1] + ["n4999"], visible
    browser.execute_script("const h = document.getElementById('f-hostlist'); h.value = 'n[0100-';"
                           "h.dispatchEvent(new Event('change'));")
    wait_js(browser, "document.getElementById('filter-error').textContent.includes('bad hostlist')", 5)
    browser.execute_script("const h = document.getElementById('f-hostlist'); h.value = '';"
                           "h.dispatchEvent(new Event('change'));"
                           "document.getElementById('f-group').value = '';"
                           "document.getElementById('f-group').dispatchEvent(new Event('change'));")
    # Approve through the page (its session's CSRF token): the row updates from the stream.
    browser.find_element(By.CSS_SELECTOR, "#rows button[data-approve='n0000']").click()
    wait_js(browser, "!document.querySelector(\"#rows .row[data-name='n0000']\").textContent.includes('unapproved')", 5)
    # Fetch progress (stored bytes of total) and a failure with its reason, as the stage one reports them.
    asyncio.run(boot_a_few(daemon))
    wait_js(browser, "document.querySelector(\"#rows .row[data-name='n0003'] progress\")", 5)
    row = browser.find_element(By.CSS_SELECTOR, "#rows .row[data-name='n0003']").text
    assert "fetching" in row and "24.0 MiB of 64.0 MiB" in row, row
    wait_js(browser, "document.querySelector(\"#rows .row[data-name='n0008']\").textContent"
                     ".includes('chunk 17 failed verification')", 5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "status-page.png"))
    figures = {"nodes": NODES, "load_seconds": loads, "all_rows_seconds": completes, "first_load_bytes": transfer[0],
               "first_load_bytes_uncompressed": transfer[1], "events": len(sent), "rate": RATE,
               "lag_median_s": round(median, 4), "lag_max_s": round(worst, 4),
               "page_lag_median_s": round(statistics.median(page_lags), 4), "page_lag_max_s": round(page_lags[-1], 4),
               "injector_behind_s": round(behind, 3), "loadavg": os.getloadavg()[0], "page_stats": stats}
    (ARTIFACTS / "status-page.json").write_text(json.dumps(figures, indent=1) + "\n")
    print("status page figures:", figures)
    # The median of three loads: on a 2-core machine shared with QEMU runs one load can stall behind them.
    assert statistics.median(loads) < 2.0, f"page loads took {loads} s"
    assert behind < 1.0, (f"bootd's node API answered {behind:.2f} s behind the rate of {RATE} events/s (load "
                          f"average {os.getloadavg()[0]:.1f}): the lag below would measure that, not the page")
    assert worst < 1.0, f"an event was drawn {worst:.3f} s after it was sent (median {median:.3f} s)"


async def boot_a_few(d: Daemon) -> None:
    """n0003-n0007 fetching at different points, n0008 failed (the screenshot shows them)."""
    async with aiohttp.ClientSession() as s:
        for i in range(3, 9):
            steps: list[dict[str, Any]] = [{"event": "stage1"}, {"event": "fetching", "done": 0, "total": 64,
                                                                 "bytes": 0, "bytes_total": 64 << 20}]
            if i < 8:
                done = 24 + 8 * (i - 3)
                steps.append({"event": "fetching", "done": done, "total": 64, "bytes": done << 20,
                              "bytes_total": 64 << 20})
            else:
                steps.append({"event": "failed", "reason": "chunk 17 failed verification twice"})
            for body in steps:
                async with s.post(f"{d.public}/api/v1/nodes/{node_name(i)}/events", json=body,
                                  headers={"X-Bootd-Token": node_token(i)}) as r:
                    assert r.status == 200, await r.text()


async def inject(d: Daemon, plan: list[tuple[int, str]]) -> tuple[dict[tuple[str, str], float], float]:
    """POST each event at its time (t0 + k / RATE); returns (node, state) -> when it was sent, and how far
    behind its schedule the last answer came (bootd answering slower than RATE).

    One task per node sends that node's events in order (each after the previous answer), as a stage
    one does: a node's steps never overtake each other in a queue of requests.
    """
    sent: dict[tuple[str, str], float] = {}
    per_node: dict[int, list[tuple[int, str]]] = {}
    for k, (i, state) in enumerate(plan):
        per_node.setdefault(i, []).append((k, state))
    connector = aiohttp.TCPConnector(limit=48)  # under http.max_connections_per_source (one address here)
    async with aiohttp.ClientSession(connector=connector) as s:
        t0 = time.monotonic() + 0.2

        async def node(i: int, steps: list[tuple[int, str]]) -> None:
            for k, state in steps:
                await asyncio.sleep(max(0.0, t0 + k / RATE - time.monotonic()))
                sent[(node_name(i), state)] = time.time()
                async with s.post(f"{d.public}/api/v1/nodes/{node_name(i)}/events", json={"event": state},
                                  headers={"X-Bootd-Token": node_token(i)}) as r:
                    assert r.status == 200, await r.text()

        await asyncio.gather(*(node(i, steps) for i, steps in per_node.items()))
        late = time.monotonic() - t0 - len(plan) / RATE
    return sent, late
