"""
The status page in a real browser: Debian's Chromium, headless, driven by
Selenium through chromedriver, against the real daemon with two simulated
Entropy Keys, a getrandom fallback and one customer drawing over EGD.

Every wait is a `WebDriverWait` on something the page shows (a deadline, never
a sleep). Screenshots go to the test's ``tmp_path`` and their paths are
printed (``pytest -s`` shows them). Any error in the browser's console fails
the test, except the one 404 a broker without ``/v1/history`` answers the
page's first history request with.

With ``EBROKER_SCREENSHOT=docs/status-page.png`` (a path from the repository
root) the test also lets the broker run for a while, unplugs and replugs a key
so the graphs and the event list have something to show, and writes a
wall-screen screenshot there.
"""

import json
import os
import shutil
import socket
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.integration.clients import running_daemon
from tests.integration.daemon import REPO, Daemon

pytestmark = [
    pytest.mark.needs_tool("chromium", "chromedriver"),
    # The screenshot run lets the broker collect a few minutes of history.
    pytest.mark.timeout(600),
]

KEYS = {"ekey-a": "KO2SYaMsVZBC9AXq", "ekey-b": "VPCJJ9dURANo+GFX"}

DEADLINE = 60.0
"""
Seconds a wait on the page may take: the keys start within seconds, but a
loaded machine decrypts them slowly, and the page polls every 2 s.
"""

WALL = (1920, 1080)
DESKTOP = (1280, 900)
PHONE = (390, 844)

CUSTOMER_ADDRESS = "127.0.0.2"

SCREENSHOT_ENV = "EBROKER_SCREENSHOT"


def page_config(tmp_path: Path) -> str:
    """
    Two simulated keys at tier 0, getrandom at tier 1, a customer with a
    quota and a client rate, EGD and both HTTP planes on ephemeral ports.
    """
    text = f"""
        [broker]
        state_dir = "{tmp_path / "state"}"
        pool_size = "64 KiB"
        low_watermark = "1 KiB"
        drain = "0 s"
        shutdown_grace = "2 s"

        [logging]
        level = "info"
        format = "json"
        """
    for name, serial in KEYS.items():
        text += f"""
        [[sources]]
        name = "{name}"
        kind = "entropykey"
        serial = "{serial}"
        transport = "simulated"
        keyring = "{tmp_path / "keys" / "keyring"}"
        response_timeout = "1 s"
        priority = 0
        """
    text += f"""
        [[sources]]
        name = "getrandom"
        kind = "getrandom"
        priority = 1

        [[customers]]
        id = "acme"
        networks = ["{CUSTOMER_ADDRESS}/32"]
        client_rate = "2 KiB/s"
        client_burst = "2 KiB"
        quota = "8 MiB/day"

        [[sinks]]
        name = "egd"
        kind = "egd"
        listen = ["tcp://127.0.0.1:0"]

        [[sinks]]
        name = "http"
        kind = "http"
        plane = "tenant"
        listen = ["tcp://127.0.0.1:0"]

        [[sinks]]
        name = "operator"
        kind = "http"
        plane = "operator"
        listen = ["tcp://127.0.0.1:0"]
        simulator_control = true
        """
    return textwrap.dedent(text)


class EgdDrawer:
    """
    A client of customer ``acme`` reading 255 bytes at a time over EGD, in a
    thread, until stopped: the customer, sink and pool-output figures move.
    """

    def __init__(self, address: tuple[str, int]) -> None:
        self._address = address
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.received = 0

    def __enter__(self) -> "EgdDrawer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)

    def _run(self) -> None:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            sock.bind((CUSTOMER_ADDRESS, 0))
            sock.connect(self._address)
            while not self._stop.is_set():
                # Command 0x02: a blocking read of 255 bytes.
                sock.sendall(b"\x02\xff")
                wanted = 255
                while wanted and not self._stop.is_set():
                    try:
                        chunk = sock.recv(wanted)
                    except TimeoutError:
                        continue
                    if not chunk:
                        return
                    wanted -= len(chunk)
                    self.received += len(chunk)


def get_json(url: str) -> tuple[int, Any]:
    """
    Status and JSON body of a GET (None for a body that is not JSON).
    """
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a loopback http:// URL
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None


def simulator(daemon: Daemon, serial: str, action: str) -> None:
    request = urllib.request.Request(  # noqa: S310 - a loopback http:// URL
        f"{daemon.operator_url}/v1/simulator/{serial}/{action}", method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - a loopback http:// URL
        assert 200 == response.status


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path, page_config(tmp_path)) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """
    Headless Chromium with a throw-away profile, keeping its console log.
    """
    with tempfile.TemporaryDirectory(prefix="ebroker-chromium-") as profile:
        options = webdriver.ChromeOptions()
        # Paths of Debian's programs: Selenium Manager must not go and
        # download a browser or a driver of its own.
        options.binary_location = which("chromium")
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(
            options=options, service=Service(which("chromedriver"))
        )
        try:
            yield driver
        finally:
            driver.quit()


def which(program: str) -> str:
    path = shutil.which(program)
    assert path is not None, f"{program} not on PATH"
    return path


def viewport(driver: WebDriver, size: tuple[int, int]) -> None:
    """
    Make the page's viewport (not the window) ``size`` CSS pixels.
    """
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {
            "width": size[0],
            "height": size[1],
            "deviceScaleFactor": 1,
            "mobile": size[0] < 600,
        },
    )


class Wait:
    """
    A `WebDriverWait` whose timeout names what it waited for.
    """

    def __init__(self, driver: WebDriver, what: str, timeout: float = DEADLINE) -> None:
        self._wait = WebDriverWait(driver, timeout, poll_frequency=0.2)
        self._what = what

    def until(self, predicate: Callable[[WebDriver], Any]) -> Any:
        return self._wait.until(predicate, f"timed out waiting: {self._what}")


def wait(driver: WebDriver, what: str, timeout: float = DEADLINE) -> Wait:
    return Wait(driver, what, timeout)


def polls(driver: WebDriver) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.polls || 0)"))


def chart_points(driver: WebDriver) -> list[int]:
    return [
        int(chart.get_attribute("data-points") or 0)
        for chart in driver.find_elements(By.CSS_SELECTOR, "svg.chart")
    ]


def page_rows(driver: WebDriver) -> dict[str, dict[str, str]]:
    """
    Each source row as the page shows it: its state word, tier and kind.
    """
    rows = driver.execute_script(
        """
        return [...document.querySelectorAll("#sources tbody tr")].map((tr) => ({
          name: tr.cells[0].textContent,
          kind: tr.cells[1].textContent,
          tier: tr.cells[2].textContent,
          state: tr.querySelector(".state").textContent,
          data: tr.dataset.state,
        }));
        """
    )
    return {row["name"]: row for row in rows}


def rows_match_status(driver: WebDriver, url: str) -> bool:
    """
    Whether the page's source rows say what ``/v1/status`` says right now.
    """
    _, status = get_json(url + "/v1/status")
    expected = {
        source["name"]: {
            "name": source["name"],
            "kind": source["kind"],
            "tier": str(source["priority"]),
            "state": source["state"],
            "data": source["state"],
        }
        for source in status["sources"]
    }
    return expected == page_rows(driver)


def screenshot(driver: WebDriver, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def console_errors(driver: WebDriver, history_absent: bool) -> list[dict[str, Any]]:
    """
    The console's errors; without ``/v1/history`` its 404 is expected.
    """
    errors = []
    # Selenium leaves get_log unannotated.
    log: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    for entry in log:
        if entry["level"] not in {"SEVERE", "ERROR"}:
            continue
        message = str(entry["message"])
        if history_absent and "/v1/history?" in message and " 404 " in message:
            continue
        errors.append(entry)
    return errors


def test_status_page_follows_the_broker_live(
    daemon: Daemon, browser: WebDriver, tmp_path: Path
) -> None:
    """
    The page draws its graphs, shows every source as /v1/status does, reads
    as one column on a phone, and, without a reload, turns an unplugged key's
    row red with the word "failed" and raises the banner.
    """
    url = daemon.operator_url
    history_status, _ = get_json(url + "/v1/history?resolution=10s&last=60")
    history_absent = 404 == history_status
    egd_host, egd_port = daemon.egd_tcp
    with EgdDrawer((egd_host, egd_port)) as drawer:
        browser.get(url + "/")
        assert "ebroker status" == browser.title
        # Graphs need two polls at least for rates.
        wait(browser, "graphs have data points").until(
            lambda d: (
                all(count >= 2 for count in chart_points(d))
                and len(chart_points(d)) == 2
            )
        )
        wait(browser, "source rows match /v1/status").until(
            lambda d: rows_match_status(d, url)
        )
        wait(browser, "keys healthy").until(
            lambda d: all("healthy" == page_rows(d)[name]["state"] for name in KEYS)
        )
        wait(browser, "customer acme draws").until(
            lambda d: (
                drawer.received > 0
                and "0 B"
                != d.find_element(
                    By.CSS_SELECTOR, '#customers tr[data-customer="acme"] td'
                ).text
            )
        )
        assert not browser.find_element(By.ID, "banner").is_displayed()
        if not history_absent:
            wait(browser, "the graphs draw the broker's history").until(
                lambda d: d.find_element(By.ID, "history-note").text.startswith(
                    "history: last hour"
                )
            )
        level = browser.find_element(By.ID, "chart-level")
        assert "pool level from" in str(level.get_attribute("aria-label"))
        screenshot(browser, tmp_path / "status-desktop.png")

        viewport(browser, PHONE)
        wait(browser, "one column on a phone").until(
            lambda d: d.execute_script(
                """
                const left = (id) => document.getElementById(id)
                  .closest("section").getBoundingClientRect().left;
                return left("customers") === left("sinks")
                  && document.documentElement.scrollWidth <= window.innerWidth;
                """
            )
        )
        screenshot(browser, tmp_path / "status-phone.png")
        viewport(browser, DESKTOP)

        # A reload would clear this.
        browser.execute_script("window.ebrokerTestMark = 1")
        before = polls(browser)
        simulator(daemon, KEYS["ekey-a"], "unplug")
        row = 'tr[data-source="ekey-a"]'
        wait(browser, "unplugged key shown failed").until(
            lambda d: "failed" == d.find_element(By.CSS_SELECTOR, row + " .state").text
        )
        badge = browser.find_element(By.CSS_SELECTOR, row + " .state")
        red, green, blue = parse_rgb(badge.value_of_css_property("color"))
        assert red > 150 > max(green, blue)
        banner = browser.find_element(By.ID, "banner")
        wait(browser, "banner names the failed key").until(
            lambda d: banner.is_displayed() and "ekey-a" in banner.text
        )
        assert "FAILED" in banner.text
        assert "polite" == banner.get_attribute("aria-live")
        assert 1 == browser.execute_script("return window.ebrokerTestMark")
        assert polls(browser) > before
        wait(browser, "the page lists the failure as an event").until(
            lambda d: "ekey-a" in d.find_element(By.ID, "events").text
        )
        screenshot(browser, tmp_path / "status-failed.png")

        target = os.environ.get(SCREENSHOT_ENV)
        if target:
            wall_screenshot(browser, daemon, REPO / target)
    assert [] == console_errors(browser, history_absent)


def parse_rgb(css: str) -> tuple[int, int, int]:
    """
    ``rgb(r, g, b)`` or ``rgba(r, g, b, a)`` as three integers.
    """
    inside = css[css.index("(") + 1 : css.index(")")]
    red, green, blue = (int(float(part)) for part in inside.split(",")[:3])
    return red, green, blue


def wall_screenshot(browser: WebDriver, daemon: Daemon, path: Path) -> None:
    """
    Replug the key, let the broker run a few minutes so history and the key
    status records (temperature, voltage) fill in, then shoot the wall screen.
    """
    simulator(daemon, KEYS["ekey-a"], "replug")
    started = time.monotonic()
    wait(browser, "key back", timeout=DEADLINE).until(
        lambda d: "healthy" == page_rows(d)["ekey-a"]["state"]
    )
    viewport(browser, WALL)
    # The broker runs a while: the graphs cover a few minutes of history.
    wait(browser, "a few minutes of graphs", timeout=300).until(
        lambda d: (
            time.monotonic() - started > 150
            and "\u00b0C" in d.find_element(By.ID, "sources").text
        )
    )
    screenshot(browser, path)
