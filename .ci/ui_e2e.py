#!/usr/bin/env python3
"""The try-it page at `/` in headless Chromium, end to end, against a running server.

Opens the page, picks a direction, uploads a photo, waits for the result and checks its size, that
it differs from the input and the timings shown; compares the two by keyboard; then uploads a file
that is not an image and checks the error shown; finally checks a phone-width, dark-scheme view and
that the browser logged no Content-Security-Policy violation. Screenshots of each state go to OUT_DIR. Uses the system's chromium and chromedriver
(Debian `chromium`, `chromium-driver`); nothing is downloaded.

Usage: ui_e2e.py BASE_URL DIRECTION PHOTO OUT_DIR
"""
import os
import sys
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1200,1000",
]
RESULT_TIMEOUT_S = 120

# Both images drawn at their natural size; the mean absolute difference over RGB channels.
PIXEL_DIFFERENCE_JS = """
const [a, b] = [document.getElementById('input-image'), document.getElementById('result-image')];
const pixels = (img) => {
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  return context.getImageData(0, 0, canvas.width, canvas.height).data;
};
const [pa, pb] = [pixels(a), pixels(b)];
if (pa.length !== pb.length) return -1;
let sum = 0;
for (let i = 0; i < pa.length; i += 4) {
  sum += Math.abs(pa[i] - pb[i]) + Math.abs(pa[i + 1] - pb[i + 1]) + Math.abs(pa[i + 2] - pb[i + 2]);
}
return sum / (pa.length / 4 * 3);
"""


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def start_browser(profile_dir):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path="/usr/bin/chromedriver"))


def visible(driver, element_id):
    element = driver.find_element(By.ID, element_id)
    return element.is_displayed() and element


def enter_api_key(driver, key):
    """Types the server's API key (when it has one) into the page's key field, as a user would."""
    if key:
        field = driver.find_element(By.ID, "api-key")
        field.send_keys(key)
        field.send_keys(Keys.TAB)


def choose_direction(driver, name):
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "direction").is_enabled())
    select = Select(driver.find_element(By.ID, "direction"))
    values = [o.get_attribute("value") for o in select.options if o.get_attribute("data-name") == name]
    check(values, f"direction {name} is not listed: {[o.text for o in select.options]}")
    select.select_by_value(values[0])
    return values[0]


def translate_photo(driver, photo, out_dir):
    driver.find_element(By.ID, "file").send_keys(str(photo.resolve()))
    WebDriverWait(driver, RESULT_TIMEOUT_S).until(
        lambda d: visible(d, "download") or (visible(d, "error") and d.find_element(By.ID, "error").text)
    )
    check(not visible(driver, "error"), f"error shown: {driver.find_element(By.ID, 'error').text}")
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.getElementById('result-image').complete")
    )
    size = driver.execute_script(
        "const img = document.getElementById('result-image'); return [img.naturalWidth, img.naturalHeight];"
    )
    input_size = driver.execute_script(
        "const img = document.getElementById('input-image'); return [img.naturalWidth, img.naturalHeight];"
    )
    check(size == input_size == [250, 198], f"result {size}, input {input_size}; expected 250x198")
    difference = driver.execute_script(PIXEL_DIFFERENCE_JS)
    check(difference > 2.0, f"result differs from the input by only {difference:.2f} levels on average")
    timings = driver.find_element(By.ID, "timings").text
    for part in ["decode", "queue", "inference", "encode", "batch size"]:
        check(part in timings, f"`{part}` missing from the timings shown: {timings!r}")
    download = driver.find_element(By.ID, "download")
    check(download.get_attribute("download").endswith(".png"), "the download is not offered as PNG")
    driver.save_screenshot(str(out_dir / "ui-result.png"))
    print(f"result: {size[0]}x{size[1]}, mean difference {difference:.1f} levels; {timings!r}")


def wipe_by_keyboard(driver):
    """Tab from "Side by side" to "Wipe", press Enter, move the slider with the arrow keys."""
    driver.find_element(By.ID, "view-side").send_keys(Keys.TAB)
    focused = driver.switch_to.active_element
    check(focused.get_attribute("id") == "view-wipe", "Tab does not reach the Wipe button")
    focused.send_keys(Keys.ENTER)
    check(visible(driver, "wipe") and not visible(driver, "side"), "Enter on Wipe did not switch the view")
    slider = driver.find_element(By.ID, "wipe-position")
    for _ in range(10):
        slider.send_keys(Keys.ARROW_LEFT)
    clip = driver.execute_script("return document.getElementById('wipe-result').style.clipPath")
    check(clip == "inset(0px 60% 0px 0px)", f"the slider at 40 clips the result as {clip!r}")
    driver.find_element(By.ID, "view-side").click()


def upload_non_image(driver, out_dir):
    with tempfile.TemporaryDirectory() as scratch:
        notes = Path(scratch) / "notes.txt"
        notes.write_text("these are words, not pixels\n")
        driver.find_element(By.ID, "file").send_keys(str(notes))
        WebDriverWait(driver, 30).until(lambda d: visible(d, "error") and d.find_element(By.ID, "error").text)
    message = driver.find_element(By.ID, "error").text
    check("not an image" in message, f"unexpected error text: {message!r}")
    check(not visible(driver, "download"), "the previous result's download is still offered")
    driver.save_screenshot(str(out_dir / "ui-error.png"))
    print(f"error shown: {message!r}")


def phone_and_dark_screenshots(driver, out_dir):
    driver.set_window_size(390, 844)
    driver.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    scroll_width = driver.execute_script("return document.documentElement.scrollWidth")
    inner_width = driver.execute_script("return window.innerWidth")
    check(scroll_width <= inner_width, f"phone width scrolls sideways: {scroll_width} > {inner_width}")
    driver.save_screenshot(str(out_dir / "ui-phone-dark.png"))


def main():
    base, direction, photo, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        driver = start_browser(profile)
        try:
            driver.get(base.rstrip("/") + "/")
            check(driver.title.startswith("cycleserve"), f"title {driver.title!r}")
            enter_api_key(driver, os.environ.get("CYCLESERVE_API_KEY", ""))
            chosen = choose_direction(driver, direction)
            print(f"chose {chosen}")
            translate_photo(driver, photo, out_dir)
            wipe_by_keyboard(driver)
            upload_non_image(driver, out_dir)
            phone_and_dark_screenshots(driver, out_dir)
            blocked = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
            check(not blocked, f"the page broke its own Content-Security-Policy: {blocked}")
        finally:
            driver.quit()
    print(f"ui e2e: OK (screenshots in {out_dir})")


if __name__ == "__main__":
    main()
