"""
Headless Chromium driven by selenium, for the tests that open the pages the pipeline writes: Debian's `chromium`
and `chromium-driver`, found on PATH and handed to selenium by their paths, so that selenium never looks for (or
downloads) a browser or a driver of its own. Without them the tests skip, except under CI=true, where they fail:
CI always runs them (.ci/run installs both).

    with chromium() as browser:
        browser.load(page)                  # file://, then waits for document.body.dataset.ready == "1"
        browser.console_errors()            # the browser log's SEVERE entries
        browser.requests()                  # every URL the page asked for (Chrome's performance log)
        browser.dialogs()                   # the alert/confirm/prompt dialogs that opened
"""

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

INSTALL = "apt-get install chromium chromium-driver"
LOAD_SECONDS = 60  # the tests' pages draw in under a second, the demo's largest in a few; a hung page is an error


def missing() -> tuple[list[str], list[str]]:
    """(what is missing, how to install it)."""
    absent = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    fixes = [INSTALL] if absent else []
    try:
        import selenium  # noqa: F401
    except ImportError:
        absent.append("the Python package selenium")
        fixes.append("pip install selenium")
    return absent, fixes


def require_chromium():
    """Skip the calling test when the browser, its driver or selenium is absent; under CI=true, fail instead."""
    absent, fixes = missing()
    if not absent:
        return
    message = f"{' and '.join(absent)} not found ({'; '.join(fixes)})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {message}: the browser tests must run in CI", pytrace=False)
    pytest.skip(f"{message}: the pages are not opened in a browser")


class Browser:
    """One headless Chromium; the logs read so far are kept, so each check sees everything since the last load."""

    def __init__(self, driver):
        self.driver = driver
        self._browser_log, self._performance_log, self._dialogs = [], [], []
        self.url = None

    def load(self, page: Path, ready: bool = True) -> float:
        """Open page as a file:// URL, the logs and dialogs of earlier pages dropped; with ready, wait until the page
        says it has drawn (document.body.dataset.ready == "1"). Returns the seconds from asking for the page to
        seeing it ready (polled every 10 ms)."""
        from selenium.webdriver.support.wait import WebDriverWait

        self._dismiss()
        self.driver.get("about:blank")
        self._drain()
        self._browser_log, self._performance_log, self._dialogs = [], [], []
        self.url = Path(page).resolve().as_uri()
        start = time.perf_counter()
        self.driver.get(self.url)
        if ready:
            WebDriverWait(self.driver, LOAD_SECONDS, poll_frequency=0.01).until(
                lambda _: self.script("return document.body && document.body.dataset.ready") == "1",
                f"{page} did not set document.body.dataset.ready to '1' within {LOAD_SECONDS} s")
        return time.perf_counter() - start

    def script(self, code: str, *args):
        """driver.execute_script; a dialog in the way is noted (dialogs()), dismissed, and the script run again."""
        from selenium.common.exceptions import UnexpectedAlertPresentException

        for _ in range(10):
            try:
                return self.driver.execute_script(code, *args)
            except UnexpectedAlertPresentException as e:
                self._dialogs.append(e.alert_text)
                self._dismiss()
        raise AssertionError(f"dialogs keep opening: {self._dialogs[-3:]}")

    def _dismiss(self):
        from selenium.common.exceptions import NoAlertPresentException

        with contextlib.suppress(NoAlertPresentException):
            self.driver.switch_to.alert.dismiss()

    def _drain(self):
        self._browser_log += self.driver.get_log("browser")
        self._performance_log += [json.loads(e["message"])["message"] for e in self.driver.get_log("performance")]

    def console_errors(self) -> list[str]:
        """The messages the browser logged at level SEVERE since the page was loaded (console.error, uncaught
        exceptions, resources that failed to load)."""
        self._drain()
        return [e["message"] for e in self._browser_log if e["level"] == "SEVERE"]

    def events(self, method: str) -> list[dict]:
        """The params of the DevTools events named method in the performance log since the page was loaded."""
        self._drain()
        return [m["params"] for m in self._performance_log if m["method"] == method]

    def requests(self) -> list[str]:
        """Every URL the page asked for since it was loaded: requests the network layer saw (Network.requestWillBeSent,
        web sockets) and resource timing entries (the page's own view)."""
        urls = [p["request"]["url"] for p in self.events("Network.requestWillBeSent")]
        urls += [p["url"] for p in self.events("Network.webSocketCreated")]
        urls += self.script("return performance.getEntriesByType('resource').map(e => e.name)")
        return urls

    def outside_requests(self) -> list[str]:
        """requests() but the page's own URL and data: URLs (which fetch nothing)."""
        return [u for u in self.requests() if u != self.url and not u.startswith("data:")]

    def dialogs(self) -> list[str]:
        """The messages of the JavaScript dialogs (alert, confirm, prompt) that opened since the page was loaded:
        any open now (dismissed), any a command ran into, and the performance log's Page.javascriptDialogOpening (so one
        dialog may be listed twice)."""
        from selenium.common.exceptions import NoAlertPresentException

        try:
            alert = self.driver.switch_to.alert
            self._dialogs.append(alert.text)
            alert.dismiss()
        except NoAlertPresentException:
            pass
        return self._dialogs + [p["message"] for p in self.events("Page.javascriptDialogOpening")]


def start(width: int = 1400, height: int = 1000) -> Browser:
    """A headless Chromium of that window size (the caller quits it: browser.driver.quit())."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-extensions",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    options.set_capability("unhandledPromptBehavior", "ignore")  # a dialog stays open until dialogs() sees it
    return Browser(webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options))


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000):
    """A headless Chromium (skipped or failed by require_chromium when absent), quit at the end."""
    require_chromium()
    browser = start(width, height)
    try:
        yield browser
    finally:
        browser.driver.quit()
