"""Screenshots of the neuron explorer's three views (docs/explore_*.png), from a running server.

    python explore.py --port 8000 &                       # the shipped model
    python bench/explore_screenshots.py --url http://127.0.0.1:8000/ --out docs

Drives Debian's Chromium headless through selenium and /usr/bin/chromedriver (nothing downloaded).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

TEXT = "The acting was dull, but the ending was wonderful."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/")
    p.add_argument("--out", default="docs")
    p.add_argument("--prompt", default="I watched this movie last night.")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SE_OFFLINE", "true")
    profile = tempfile.mkdtemp(prefix="explore_shots_")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1180,900",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    wait = WebDriverWait(driver, 600, poll_frequency=0.2)
    try:
        driver.get(args.url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chars span"))
        box = driver.find_element(By.ID, "text")
        box.clear()
        box.send_keys(TEXT)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chars span")) == len(TEXT))
        time.sleep(0.5)
        driver.save_screenshot(str(out / "explore_try.png"))

        driver.find_element(By.ID, "tab-units").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#unit-list tbody tr"))
        driver.find_element(By.CSS_SELECTOR, "#unit-list tbody tr").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#most li")) == 10)
        driver.set_window_size(1180, 1500)
        time.sleep(0.5)
        driver.save_screenshot(str(out / "explore_unit.png"))
        driver.set_window_size(1180, 900)

        driver.find_element(By.ID, "tab-steer").click()
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(args.prompt)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: "done" in d.find_element(By.ID, "steer-status").text)
        time.sleep(0.5)
        driver.save_screenshot(str(out / "explore_steer.png"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"screenshots in {out}/: explore_try.png, explore_unit.png, explore_steer.png")


if __name__ == "__main__":
    main()
