"""The README's screenshots of the web page (docs/web*.png), taken in headless Chromium from the
committed encoder (pretrained/, exported) over the bundled sample (data/demo/train, 5 labels per
class as in `make demo`): search with a held-out image, the label queue after a few key presses, the
review page after accepting right proposals, relabelling a wrong one and rejecting another (right and
wrong by the sample's folders, as a person who knows the images would). The PNGs are quantised to 256 colours.

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
from retrieval_web.keys import label_keys
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

    # label: the two first cards with their true class's key (the folder of the id), skip the third
    driver.get(url + "/label?n=12")
    wait(driver, "#queue .card.selected")
    keys = {label: key for key, label in label_keys(classes(driver))}
    first, second = [c.get_attribute("data-id") for c in driver.find_elements(By.CSS_SELECTOR, "#queue .card")][:2]
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys(keys[true_class(first)], keys[true_class(second)], Keys.ARROW_RIGHT)
    wait_status(driver, "skipped")
    save(driver, "web-label.png")

    # review, most confident first: accept two right proposals, relabel a wrong one, reject another
    driver.get(url + "/review?order=highest")
    cards = WebDriverWait(driver, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#proposals .card"))
    right = [c for c in cards if c.get_attribute("data-label") == true_class(c.get_attribute("data-id"))]
    wrong = [c for c in cards if c not in right]
    for card in right[:2]:
        card.find_element(By.CSS_SELECTOR, ".pick-box").click()
    driver.find_element(By.ID, "accept-selected").click()
    wait_status(driver, "2 accepted")
    wrong[0].find_element(By.CSS_SELECTOR, ".pick-box").click()
    driver.find_element(By.ID, "relabel-as").send_keys(true_class(wrong[0].get_attribute("data-id")))
    driver.find_element(By.ID, "relabel-selected").click()
    wait_status(driver, "1 relabelled")
    wrong[1].find_element(By.CSS_SELECTOR, "button.reject").click()
    wait_status(driver, "rejected")
    save(driver, "web-review.png")


def true_class(item_id: str) -> str:
    return item_id.split("/")[0]


def classes(driver: webdriver.Chrome) -> list[str]:
    return [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#label-list option")]


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
