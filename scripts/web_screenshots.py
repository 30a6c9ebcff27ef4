"""The README's screenshots of the web page (docs/web*.png), taken in headless Chromium from the
committed encoder (pretrained/, exported) over the bundled sample (data/demo/train, 5 labels per
class as in `make demo`): search with a held-out image, the label queue after a few key presses, the
review page after accepting, relabelling and rejecting. The PNGs are quantised to 256 colours.

    python scripts/web_screenshots.py          # writes docs/web.png, docs/web-label.png, docs/web-review.png
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from moco_retrieval.images import image_files
from retrieval_client import RetrievalClient, UpsertItem
from retrieval_server.process import ServerProcess
from retrieval_web.process import WebProcess

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "demo"
PRETRAINED = REPO / "pretrained" / "moco_v2_resnet18_cifar10.pt"
DOCS = REPO / "docs"
SHOTS = 5  # labelled images per class


def store_sample(client: RetrievalClient) -> None:
    train = SAMPLE / "train"
    items = []
    for path in image_files(train):
        rel = path.relative_to(train).as_posix()
        labelled = sorted(path.parent.iterdir()).index(path) < SHOTS
        items.append(
            UpsertItem(
                rel,
                image=path.read_bytes(),
                label=path.parent.name if labelled else "",
                metadata={"uri": path.as_uri()},
            )
        )
    result = client.upsert_many(items)
    if result.failures:
        raise SystemExit(f"error: {len(result.failures)} images were refused: {result.failures[0].message}")


def save(driver: webdriver.Chrome, name: str) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    path = DOCS / name
    driver.save_screenshot(str(path))
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def wait(driver: webdriver.Chrome, css: str):
    return WebDriverWait(driver, 120).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def wait_status(driver: webdriver.Chrome, text: str) -> None:
    WebDriverWait(driver, 120).until(lambda d: text in d.find_element(By.ID, "status").text)


def take(driver: webdriver.Chrome, url: str) -> None:
    driver.get(url + "/search")
    wait(driver, "#upload").send_keys(str(sorted((SAMPLE / "test" / "automobile").glob("*.jpg"))[3]))
    driver.find_element(By.ID, "search-button").click()
    wait(driver, "#results .tile")
    save(driver, "web.png")

    driver.get(url + "/label?n=12")
    wait(driver, "#queue .card.selected")
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.ENTER, Keys.ENTER, Keys.ARROW_RIGHT)  # accept two votes, skip one
    wait_status(driver, "skipped")
    save(driver, "web-label.png")

    driver.get(url + "/review")
    cards = WebDriverWait(driver, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#proposals .card"))
    for card in cards[:2]:
        card.find_element(By.CSS_SELECTOR, ".pick-box").click()
    driver.find_element(By.ID, "accept-selected").click()
    wait_status(driver, "2 accepted")
    cards[2].find_element(By.CSS_SELECTOR, ".pick-box").click()
    labels = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#label-list option")]
    other = next(label for label in labels if label != cards[2].get_attribute("data-label"))
    driver.find_element(By.ID, "relabel-as").send_keys(other)
    driver.find_element(By.ID, "relabel-selected").click()
    wait_status(driver, "1 relabelled")
    cards[4].find_element(By.CSS_SELECTOR, "button.reject").click()
    wait_status(driver, "rejected")
    save(driver, "web-review.png")


def main() -> int:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    with tempfile.TemporaryDirectory(prefix="web-shots-") as tmp:
        encoder = Path(tmp) / "encoder.pt"
        subprocess.run([sys.executable, "-m", "moco_train", "export", str(PRETRAINED), str(encoder)], check=True)
        with ServerProcess(encoder, Path(tmp) / "store") as server:
            with RetrievalClient(server.address, timeout=600) as client:
                store_sample(client)
            web = WebProcess("--address", server.address, "--image-root", SAMPLE / "train", cwd=REPO)
            driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
            try:
                take(driver, web.url)
            finally:
                driver.quit()
                web.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
