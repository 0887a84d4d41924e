#!/usr/bin/python3
"""Drives the status page in headless Chromium (Debian's chromium,
chromium-driver and python3-selenium).

Usage: status_page.py URL SCREENSHOT

URL is the page with its token (http://127.0.0.1:PORT/#token=...). Checks
both nodes show Normal, clicks Failover on node 1, accepts the confirm
dialog, waits for node 1 Idle, node 2 Running in Backup Mode, the Fallback
button and the move on the timeline, and saves a screenshot. Exits non-zero
with the reason on any failure (a screenshot of the failure is saved too).
"""
import sys
import tempfile

from selenium import webdriver
from selenium.common.exceptions import (NoSuchElementException,
                                        StaleElementReferenceException,
                                        TimeoutException)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

URL, SHOT = sys.argv[1], sys.argv[2]
TIMEOUT = 20
IGNORED = (NoSuchElementException, StaleElementReferenceException)


def text(d, css):
    return d.find_element(By.CSS_SELECTOR, css).text.strip()


def wait(d, what, cond):
    try:
        WebDriverWait(d, TIMEOUT, poll_frequency=0.1, ignored_exceptions=IGNORED).until(cond)
    except TimeoutException:
        raise SystemExit(f"timed out waiting for {what}; page says:\n{d.find_element(By.TAG_NAME, 'body').text}")
    print("ok:", what, flush=True)


def main():
    profile = tempfile.mkdtemp(prefix="prg-proxy-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1200,1100",
                 f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
    try:
        d.get(URL)
        wait(d, "both nodes Normal",
             lambda d: text(d, "#node-1 .state") == "Normal" and text(d, "#node-2 .state") == "Normal")
        if d.find_elements(By.CSS_SELECTOR, ".btn-fallback") or d.find_elements(By.ID, "btn-recover"):
            raise SystemExit("Fallback or Recover offered while both nodes are Normal")
        wait(d, "Failover offered on both nodes",
             lambda d: len(d.find_elements(By.CSS_SELECTOR, ".btn-failover")) == 2)

        def click_failover(d):
            d.find_element(By.CSS_SELECTOR, "#node-1 .btn-failover").click()
            return True
        wait(d, "Failover on node 1 clicked", click_failover)
        WebDriverWait(d, TIMEOUT).until(EC.alert_is_present())
        alert = d.switch_to.alert
        if "imp1" not in alert.text:
            raise SystemExit(f"confirm dialog does not name the node: {alert.text!r}")
        alert.accept()
        print("ok: confirm dialog accepted", flush=True)
        wait(d, "node 1 Idle and node 2 Running in Backup Mode",
             lambda d: text(d, "#node-1 .state") == "Idle"
             and text(d, "#node-2 .state") == "Running in Backup Mode")
        wait(d, "Fallback offered on node 1 only",
             lambda d: d.find_elements(By.CSS_SELECTOR, "#node-1 .btn-fallback")
             and not d.find_elements(By.CSS_SELECTOR, "#node-2 .btn-fallback")
             and not d.find_elements(By.CSS_SELECTOR, ".btn-failover"))
        wait(d, "the failover on the timeline",
             lambda d: d.find_elements(By.CSS_SELECTOR, "#timeline svg.move"))
        if "error" in (d.find_element(By.ID, "message").get_attribute("class") or ""):
            raise SystemExit("the page shows an error: " + text(d, "#message"))
        d.save_screenshot(SHOT)
        print("ok: screenshot", SHOT, flush=True)
    except BaseException:
        try:
            d.save_screenshot(SHOT.replace(".png", "-failed.png"))
        except Exception:
            pass
        raise
    finally:
        d.quit()


if __name__ == "__main__":
    main()
