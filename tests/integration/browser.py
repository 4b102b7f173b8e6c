"""A real browser for the web tests: Debian's Chromium, headless, driven by selenium through
Debian's chromedriver (no browser download).

The flags are the ones this machine needs: without the background-networking ones Chromium
keeps calling home, and this machine's closed network refuses its connections. The suite's
OAuth server has a certificate of the test CA; the browser trusts that one key alone
(``--ignore-certificate-errors-spki-list``), not every certificate.

Screenshots of each page go to ``$RELAYD_TEST_SCREENSHOTS`` (default: a temporary
directory, printed), as artifacts of the run.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tiers import integration_required

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS_ENV = "RELAYD_TEST_SCREENSHOTS"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1000,900",
)


def browser_blocker() -> str | None:
    """Why no browser test can run here, or None."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: chromium, chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


def require_browser() -> None:
    blocker = browser_blocker()
    if blocker is None:
        return
    if integration_required(os.environ):
        pytest.fail(f"browser tests required but cannot run: {blocker}", pytrace=False)
    pytest.skip(f"browser tests skipped: {blocker}")


def spki_pin(certificate: Path) -> str:
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def screenshot_dir() -> Path:
    chosen = os.environ.get(SCREENSHOTS_ENV)
    path = Path(chosen) if chosen else Path(tempfile.gettempdir()) / "relayd-web-screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    def __init__(self, trusted_certificate: Path, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        options = Options()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(
            f"--ignore-certificate-errors-spki-list={spki_pin(trusted_certificate)}"
        )
        self.driver: WebDriver = webdriver.Chrome(
            service=Service(str(CHROMEDRIVER)), options=options
        )
        self.driver.set_page_load_timeout(30)
        self.shots = screenshot_dir()
        self.taken: list[Path] = []

    def open(self, url: str) -> None:
        self.driver.get(url)

    @property
    def url(self) -> str:
        return str(self.driver.current_url)

    def text(self) -> str:
        from selenium.webdriver.common.by import By

        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def click(self, label: str) -> None:
        """Press the button and wait for the page it leads to (through any redirects)."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.wait import WebDriverWait

        button = self.driver.find_element(By.XPATH, f"//button[normalize-space()='{label}']")
        button.click()

        def left_the_page(_driver: WebDriver) -> bool:
            # Stale once the next page is in; mid-navigation chromedriver may instead say the
            # node "does not belong to the document", a plain WebDriverException.
            try:
                button.is_enabled()
            except WebDriverException:
                return True
            return False

        wait = WebDriverWait(self.driver, 30)
        wait.until(left_the_page)
        wait.until(lambda d: d.execute_script("return document.readyState") == "complete")

    def fill(self, element_id: str, value: str) -> None:
        from selenium.webdriver.common.by import By

        field = self.driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(value)

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{re.sub(r'[^A-Za-z0-9_-]+', '-', name)}.png"
        self.driver.save_screenshot(str(path))
        self.taken.append(path)
        return path

    def close(self) -> None:
        self.driver.quit()


def new_profile() -> Path:
    return Path(tempfile.mkdtemp(prefix="relayd-chromium-"))


def remove_profile(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
