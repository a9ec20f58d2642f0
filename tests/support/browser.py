"""A real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium,
for the checkout page; and ``zbarimg`` (``zbar-tools``) to read a QR code back from a
screenshot.

The browser reaches 127.0.0.1 only: every other host name resolves to nothing
(``--host-resolver-rules``) and Chromium's background traffic (updates, sync, metrics, safe
browsing) is off. Its Chrome DevTools performance log records every request the page made, so
a test can prove nothing came from elsewhere. Selenium's calls block: from Trio, run them in a
thread (``trio.to_thread.run_sync``). ``browser()`` stops Chromium and chromedriver by PID."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("WATCHER_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("WATCHER_CHROMEDRIVER", "/usr/bin/chromedriver")

DESKTOP = (1280, 900)
MOBILE = (390, 844)


def available() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    for tool in (CHROMIUM, CHROMEDRIVER, shutil.which("zbarimg") or "zbarimg"):
        if not Path(tool).exists():
            return f"{tool} is missing (make deps installs chromium, chromium-driver and zbar-tools)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@contextlib.contextmanager
def browser(*, size: tuple[int, int] = DESKTOP, lang: str = "en-US") -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="watcher-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", f"--lang={lang}",
                "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
                "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--metrics-recording-only",
                "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-proxy-server",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"intl.accept_languages": lang})
    if size[0] < 500:  # below the smallest window Chromium opens: a phone's screen, emulated
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": {
            "width": size[0], "height": size[1], "pixelRatio": 2, "touch": True}})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.get("about:blank")
        driver.get_log("performance")  # the new-tab page's own requests are not the test's
        yield driver
    finally:
        pid = service.process.pid if service.process else None
        try:
            driver.quit()
        finally:
            if pid is not None:  # chromedriver (and its Chromium) must not outlive the test
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _reap(profile)
            shutil.rmtree(profile, ignore_errors=True)


def _profile_pids(profile: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if profile.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def _reap(profile: str) -> None:
    """Wait (5 s at most) for every Chromium process of this profile to exit, then kill the rest."""
    deadline = time.monotonic() + 5.0
    while (pids := _profile_pids(profile)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked for since the last call (DevTools ``Network.requestWillBeSent``)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def decode_qr(png: bytes) -> list[str]:
    """Every QR code zbarimg finds in a PNG image, as text."""
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(png)
        f.flush()
        out = subprocess.run(["zbarimg", "--raw", "-q", "-Sdisable", "-Sqrcode.enable", f.name],
                             capture_output=True, timeout=30)
    return [line for line in out.stdout.decode().splitlines() if line]
