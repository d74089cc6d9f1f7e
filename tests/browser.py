"""Headless Chromium for the UI tests (Debian's chromium and chromium-driver, through
Selenium): the browser fixture and the waits every page needs."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import require_system_package

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = Path(os.environ.get("CRUCIBLE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
HEADLESS_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1600,1000"]
RECIPE_GROUPS = ["base", "sl_basic", "chat_sl", "dpo", "math_rl", "distillation"]


@pytest.fixture
def browser():
    require_system_package(bool(CHROMIUM and CHROMEDRIVER), "chromium and chromedriver", "chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="crucible-chromium-")
    for flag in HEADLESS_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition, what: str, within_s: float = 60):
    """Polls `condition(driver)` until truthy (the UI renders asynchronously)."""
    deadline = time.time() + within_s
    while not (found := condition(driver)):
        assert time.time() < deadline, f"the UI never showed {what}; page text:\n{body_text(driver)[:2000]}"
        time.sleep(0.5)
    return found


def body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def click(driver, find, what: str) -> None:
    """Clicks the last element `find(driver)` returns once nothing covers it: a dialog that is
    still fading in or out, or the community dialog opening late, would take the click."""
    from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException

    def clicked(d) -> bool:
        found = find(d)
        if not found:
            return False
        try:
            found[-1].click()
            return True
        except (ElementClickInterceptedException, StaleElementReferenceException):
            dismiss_newsletter(d)
            return False

    wait_for(driver, clicked, what)


def click_text(driver, text: str, what: str) -> None:
    from selenium.webdriver.common.by import By

    click(driver, lambda d: d.find_elements(By.XPATH, f"//*[contains(text(), '{text}')]"), what)


def dismiss_newsletter(driver) -> None:
    """The UI's first visit opens a 'Join the Dagster community' dialog over the page."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
        button.click()
