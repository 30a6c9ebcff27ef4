"""The web page in a real browser (Debian's chromium and chromedriver, headless, driven by Selenium)
against a real retrieval server with real images: search by upload and by click, labelling from the
suggestion queue, accepting a proposal, a read-only token. After each action the state is checked
through gRPC. Every page is saved as a screenshot in test-artifacts/ (or $TEST_ARTIFACTS_DIR)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from retrieval_client import RetrievalClient, UpsertItem
from retrieval_web.process import WebProcess
from tests import REPO
from tests.server_harness import ServerProcess, make_export, server_env

pytestmark = pytest.mark.slow
TOKEN, READ_ONLY = "full-token", "read-token"
CLASSES = ("airplane", "automobile", "bird", "cat")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "test-artifacts"))


def web_process(*args: object) -> WebProcess:
    return WebProcess(*args, env=server_env(), cwd=REPO)


@pytest.fixture(scope="module")
def world(demo_data, tmp_path_factory):
    """A server holding 12 demo images per class with uri metadata under an image root, the first 2
    of each class labelled; a web page in front of it, and a browser."""
    root = tmp_path_factory.mktemp("web")
    images = root / "images"
    items = []
    for cls in CLASSES:
        (images / cls).mkdir(parents=True)
        for n, path in enumerate(sorted((demo_data / "train" / cls).glob("*.jpg"))[:12]):
            shutil.copy(path, images / cls / path.name)
            items.append(
                UpsertItem(
                    f"{cls}/{path.name}",
                    image=path.read_bytes(),
                    label=cls if n < 2 else "",
                    metadata={"uri": (images / cls / path.name).as_uri()},
                )
            )
    server = ServerProcess(
        make_export(root), root / "store", "--auth-token", TOKEN, "--read-only-token", READ_ONLY
    ).start()
    client = RetrievalClient(server.address, token=TOKEN, timeout=120)
    client.upsert_many(items)
    web = web_process("--address", server.address, "--token", TOKEN, "--image-root", images)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield {"server": server, "client": client, "web": web, "browser": browser, "images": images, "root": root}
    browser.quit()
    web.close()
    client.close()
    server.stop()


def wait(browser, css: str, timeout: float = 60):
    return WebDriverWait(browser, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def shot(browser, name: str) -> None:
    browser.save_screenshot(str(ARTIFACTS / f"web-{name}.png"))


def grid_ids(browser, css: str = "#results .tile") -> list[str]:
    return [t.get_attribute("data-id") for t in browser.find_elements(By.CSS_SELECTOR, css)]


def test_overview_shows_the_counts_and_the_model(world):
    browser, client = world["browser"], world["client"]
    browser.get(world["web"].url + "/")
    info = client.info()
    assert wait(browser, "#count-items").text == str(info.item_count) == "48"
    assert browser.find_element(By.ID, "count-labelled").text == str(info.labelled_count)
    assert info.model_fingerprint in browser.find_element(By.ID, "model").text
    shot(browser, "overview")


def test_search_by_upload_then_by_clicking_a_neighbour(world):
    browser, client = world["browser"], world["client"]
    query = sorted((world["images"] / "cat").iterdir())[3]
    browser.get(world["web"].url + "/search")
    wait(browser, "#upload").send_keys(str(query))
    browser.find_element(By.ID, "search-button").click()
    wait(browser, "#results .tile")
    assert grid_ids(browser) == [h.id for h in client.search(image=query.read_bytes(), k=24)]
    assert browser.execute_script("return document.querySelector('#results img').naturalWidth") > 0  # a thumbnail
    shot(browser, "search")
    second = grid_ids(browser)[1]
    browser.find_element(By.CSS_SELECTOR, f'.tile[data-id="{second}"] a.search-from').click()
    WebDriverWait(browser, 60).until(lambda b: "id=" in b.current_url)
    wait(browser, "#results .tile")
    assert grid_ids(browser) == [h.id for h in client.search(id=second, k=24)]


def test_label_from_the_suggestion_queue_with_the_keyboard(world):
    browser, client = world["browser"], world["client"]
    browser.get(world["web"].url + "/label")
    first = wait(browser, "#queue .card.selected").get_attribute("data-id")
    assert first == client.suggest(12)[0].id
    labels = sorted(client.info().label_counts)
    shot(browser, "label")
    browser.find_element(By.TAG_NAME, "body").send_keys("2")  # the second label
    WebDriverWait(browser, 60).until(lambda b: first in b.find_element(By.ID, "status").text)
    assert client.get([first])[0].label == labels[1]


def test_accept_a_proposal_in_the_review(world):
    browser, client = world["browser"], world["client"]
    browser.get(world["web"].url + "/review")
    card = wait(browser, ".group .card")
    item_id, proposed = card.get_attribute("data-id"), card.get_attribute("data-label")
    assert client.get([item_id])[0].label == ""
    shot(browser, "review")
    card.find_element(By.CSS_SELECTOR, "button.accept").click()
    WebDriverWait(browser, 60).until(lambda b: item_id in b.find_element(By.ID, "status").text)
    assert client.get([item_id])[0].label == proposed


def test_duplicates_page(world):
    browser = world["browser"]
    browser.get(world["web"].url + "/duplicates?min_score=0.99")
    groups = len(list(world["client"].duplicates(0.99)))
    assert wait(browser, "#group-count").text == f"{groups} groups"
    shot(browser, "duplicates")


def test_a_read_only_token_sees_no_write_action_and_cannot_write(world):
    """A web page started without a token asks for one; with the read-only token there is nothing
    to click that writes, and a write sent anyway is refused by the service."""
    web = web_process("--address", world["server"].address, "--image-root", world["images"])
    try:
        browser = world["browser"]
        browser.delete_all_cookies()
        browser.get(web.url + "/label")
        wait(browser, "#token")
        assert not browser.find_elements(By.ID, "read-only")  # not signed in is not read-only
        browser.find_element(By.ID, "token").send_keys(READ_ONLY)
        browser.find_element(By.ID, "sign-in").click()
        wait(browser, "#queue .card")  # the label page (the sign-in page before it has no queue)
        assert browser.find_elements(By.ID, "read-only") and not browser.find_elements(By.CSS_SELECTOR, ".actions")
        shot(browser, "read-only")
        item_id = browser.find_element(By.CSS_SELECTOR, "#queue .card").get_attribute("data-id")
        reply = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch('/api/labels', {method: 'POST', headers: {'Content-Type': 'application/json'},"
            f" body: JSON.stringify({{labels: {{{json.dumps(item_id)}: 'cat'}}}})}})"
            ".then(r => r.json().then(j => done([r.status, j.error])));"
        )
        assert reply == [403, "PERMISSION_DENIED"]
        assert world["client"].get([item_id])[0].label == ""
    finally:
        web.close()


def test_thumbnails_stay_inside_the_image_roots(world, tmp_path):
    client, url = world["client"], world["web"].url
    outside = world["root"] / "secret.jpg"
    shutil.copy(next((world["images"] / "cat").iterdir()), outside)
    (world["images"] / "escape.jpg").symlink_to(outside)
    (world["images"] / "notes.txt").write_text("not an image")
    bad = {
        "dotdot": str(world["images"] / ".." / "secret.jpg"),
        "link": (world["images"] / "escape.jpg").as_uri(),
        "text": (world["images"] / "notes.txt").as_uri(),
        "remote": "http://example.com/a.jpg",
    }
    vector = client.embed([outside.read_bytes()])[0]
    client.upsert_many([UpsertItem(f"bad/{k}", embedding=vector, metadata={"uri": v}) for k, v in bad.items()])
    for name in bad:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/thumb/bad/{name}", timeout=30)
        assert err.value.code == 404, name
    good = urllib.request.urlopen(
        f"{url}/thumb/cat/{sorted((world['images'] / 'cat').glob('*.jpg'))[0].name}", timeout=30
    )
    assert good.headers["Content-Type"] == "image/jpeg" and good.read()[:2] == b"\xff\xd8"
    client.delete([f"bad/{k}" for k in bad])
