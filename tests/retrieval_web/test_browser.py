"""The web page in a real browser (Debian's chromium and chromedriver, headless, driven by Selenium)
against a real retrieval server with real images: search by upload and by click with its filters,
"more" and bulk labels; the label queue with the keyboard (keys beyond 9, the vote's key, undo,
skipped cards, progress counts, 20 items with the keyboard only); the review's pages, filters,
threshold count, bulk actions and card states; "keep one" on the duplicates page; a read-only
token. After each action the state is checked through gRPC. Every page is saved as a screenshot in
test-artifacts/ (or $TEST_ARTIFACTS_DIR).

Then what only a browser does, with an attacker's page served from a second local HTTP server on
another 127.0.0.1 port (another origin, the same site: SameSite cookies are sent to it): an
auto-submitted text/plain form and a no-cors fetch that try to write labels, a cross-origin sign-in
(login CSRF), a cross-origin frame, `next` redirects off the site, the content security policy
against the page's own script and style, thumbnail URLs the browser would normalise, sign-out."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from retrieval_client import RetrievalClient, UpsertItem
from retrieval_web.keys import label_keys
from retrieval_web.process import WebProcess
from retrieval_web.thumbnails import thumbnail
from tests import REPO
from tests.server_harness import ServerProcess, make_export, server_env

pytestmark = pytest.mark.slow
TOKEN, READ_ONLY = "full-token", "read-token"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS = 6  # demo images of each class stored; the first of each is labelled: 10 labels
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", REPO / "test-artifacts"))


def web_process(*args: object) -> WebProcess:
    return WebProcess(*args, env=server_env(), cwd=REPO)


@pytest.fixture(scope="module")
def world(demo_data, tmp_path_factory):
    """A server holding PER_CLASS demo images of each of the 10 classes with uri metadata under an
    image root, the first of each class labelled; a web page in front of it, and a browser."""
    root = tmp_path_factory.mktemp("web")
    images = root / "images"
    items = []
    for cls in CLASSES:
        (images / cls).mkdir(parents=True)
        for n, path in enumerate(sorted((demo_data / "train" / cls).glob("*.jpg"))[:PER_CLASS]):
            shutil.copy(path, images / cls / path.name)
            items.append(
                UpsertItem(
                    f"{cls}/{path.name}",
                    image=path.read_bytes(),
                    label=cls if n < 1 else "",
                    metadata={"uri": (images / cls / path.name).as_uri()},
                )
            )
    server = ServerProcess(
        make_export(root), root / "store", "--auth-token", TOKEN, "--read-only-token", READ_ONLY
    ).start()
    client = RetrievalClient(server.address, token=TOKEN, timeout=120)
    client.upsert_many(items)
    web = web_process("--address", server.address, "--token", TOKEN, "--image-root", images)
    # no token: sign in; and a review that never recomputes without being asked
    signin_web = web_process("--address", server.address, "--image-root", images, "--review-auto-refresh-seconds", 0)
    attacker = AttackerSite(root / "attacker")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are logged there
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield {
        "server": server,
        "client": client,
        "web": web,
        "signin_web": signin_web,
        "attacker": attacker,
        "browser": browser,
        "images": images,
        "root": root,
    }
    browser.quit()
    attacker.close()
    signin_web.close()
    web.close()
    client.close()
    server.stop()


class AttackerSite:
    """Another origin: a static HTTP server on another 127.0.0.1 port serving the pages put() writes."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.directory, self.pages = directory, 0
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        (directory / "landed.html").write_text("<title>attacker</title><p id='attacker'>off the site</p>")

    def put(self, name: str, html: str) -> str:
        """A new page: a new file name each time, so the browser cannot answer a second test that
        rewrites `name` from its cache (a 304 on the same mtime second served the first test's form)."""
        self.pages += 1
        path = Path(name)
        unique = f"{path.stem}-{self.pages}{path.suffix}"
        (self.directory / unique).write_text(html)
        return f"{self.url}/{unique}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def wait(browser, css: str, timeout: float = 60):
    return WebDriverWait(browser, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def shot(browser, name: str) -> None:
    browser.save_screenshot(str(ARTIFACTS / f"web-{name}.png"))


def grid_ids(browser, css: str = "#results .tile") -> list[str]:
    """The data-id of each element matching css, read in one script (no stale element mid-navigation)."""
    return browser.execute_script("return [...document.querySelectorAll(arguments[0])].map((e) => e.dataset.id);", css)


def test_overview_shows_the_counts_and_the_model(world):
    browser, client = world["browser"], world["client"]
    browser.get(world["web"].url + "/")
    info = client.info()
    assert wait(browser, "#count-items").text == str(info.item_count) == str(len(CLASSES) * PER_CLASS)
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


# -- the labelling workflow ------------------------------------------------------------------------
def press(browser, *keys: str) -> None:
    browser.find_element(By.TAG_NAME, "body").send_keys(*keys)


def wait_status(browser, text: str, timeout: float = 60) -> None:
    WebDriverWait(browser, timeout).until(lambda b: text in b.find_element(By.ID, "status").text)


def queue(browser) -> list[str]:
    return grid_ids(browser, "#queue .card")


def label_of(world, item_id: str) -> str:
    return world["client"].get([item_id])[0].label


def test_label_keys_beyond_nine_the_vote_key_undo_and_the_counts(world):
    """Eleven labels: the tenth is typed 0, the eleventh a (the audit's page took 1 then 0 for the
    first label); Enter accepts the card's vote; undo clears the label in the store and makes the
    card the active one again; the counts follow; a label the page refuses leaves the card as it was."""
    browser, client, url = world["browser"], world["client"], world["web"].url
    browser.get(url + "/label?n=12")
    first = wait(browser, "#queue .card.selected")
    first_id = first.get_attribute("data-id")
    first.find_element(By.CSS_SELECTOR, ".new-label").send_keys("z" * 201, Keys.ENTER)  # refused: the card is back
    wait_status(browser, "at most 200 characters")
    assert "done" not in first.get_attribute("class") and not first.find_element(By.CSS_SELECTOR, ".state-badge").text
    first.find_element(By.CSS_SELECTOR, ".new-label").clear()
    first.find_element(By.CSS_SELECTOR, ".new-label").send_keys("zebra", Keys.ENTER)  # an eleventh label
    wait_status(browser, f"{first_id}: zebra")
    assert label_of(world, first_id) == "zebra"
    keys = label_keys(sorted(client.info().label_counts))
    assert len(keys) == 11 and [k for k, _ in keys[9:]] == ["0", "a"]
    browser.get(url + "/label?n=12")
    legend = wait(browser, "#legend").text
    assert all(f"{key} {label}" in legend for key, label in keys)
    card = browser.find_element(By.CSS_SELECTOR, "#queue .card.selected")
    assert [b.text for b in card.find_elements(By.CSS_SELECTOR, ".set-label")] == [f"{k} {lab}" for k, lab in keys]
    tenth, eleventh, voted = queue(browser)[:3]
    press(browser, "0")
    press(browser, "a")
    vote = browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{voted}"]').get_attribute("data-vote")
    assert vote and f"Enter accept {vote}" in browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{voted}"]').text
    press(browser, Keys.ENTER)
    wait_status(browser, f"{voted}: {vote}")
    assert [label_of(world, i) for i in (tenth, eleventh, voted)] == [keys[9][1], keys[10][1], vote]
    info = client.info()
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "count-labelled").text == str(info.labelled_count))
    assert browser.find_element(By.ID, "count-unlabelled").text == str(info.item_count - info.labelled_count)
    shot(browser, "label-keys")
    browser.find_element(By.ID, "undo").click()
    wait_status(browser, f"undone: {voted}")
    assert label_of(world, voted) == ""
    card = browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{voted}"]')
    assert "selected" in card.get_attribute("class") and "done" not in card.get_attribute("class")
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, "count-labelled").text == str(info.labelled_count - 1)
    )


def test_a_skipped_card_stays_skipped_for_the_session(world):
    browser, url = world["browser"], world["web"].url
    browser.get(url + "/label?n=12")
    skipped = wait(browser, "#queue .card.selected").get_attribute("data-id")
    press(browser, Keys.ARROW_RIGHT)
    wait_status(browser, f"{skipped}: skipped")
    browser.get(url + "/label?n=12")
    wait(browser, "#queue .card")
    assert skipped not in queue(browser) and len(queue(browser)) == 12
    assert int(browser.find_element(By.ID, "skipped-count").text) >= 1
    browser.find_element(By.ID, "unskip-all").click()
    WebDriverWait(browser, 30).until(lambda b: skipped in queue(b))


def test_label_20_items_with_the_keyboard_only_then_undo_one(world):
    """The issue's test: 20 key presses label 20 cards (each key moves on to the next card at once),
    u undoes the last; the store holds the 19 labels and no label on the 20th."""
    browser, client, url = world["browser"], world["client"], world["web"].url
    keys = label_keys(sorted(client.info().label_counts))
    browser.get(url + "/label?n=24")
    wait(browser, "#queue .card.selected")
    cards = queue(browser)[:20]
    typed = [keys[n % len(keys)] for n in range(20)]
    assert len(cards) == 20 and all(label_of(world, i) == "" for i in cards)
    press(browser, "".join(key for key, _ in typed))
    wait_status(browser, f"{cards[-1]}: {typed[-1][1]}")
    press(browser, "u")
    wait_status(browser, f"undone: {cards[-1]}")
    stored = client.get(cards)
    assert [item.label for item in stored] == [label for _, label in typed[:19]] + [""]
    assert browser.find_element(By.CSS_SELECTOR, "#queue .card.selected").get_attribute("data-id") == cards[-1]


# -- review ------------------------------------------------------------------------------------------
def cards(browser) -> list:
    return browser.find_elements(By.CSS_SELECTOR, "#proposals .card")


def open_proposals(world) -> list:
    """LabelCorpus now, lowest confidence first (the review's default order), minus the rejected ones."""
    rejected = world.setdefault("rejected", set())
    return sorted(
        (p for p in world["client"].label_corpus() if p.id not in rejected), key=lambda p: (p.confidence, p.id)
    )


def test_review_pages_filters_and_accept_all_above_a_threshold(world):
    browser, client, url = world["browser"], world["client"], world["web"].url
    browser.get(url + "/review?per_page=5")
    wait(browser, "#proposals .card")
    lowest = open_proposals(world)
    assert grid_ids(browser, "#proposals .card") == [p.id for p in lowest[:5]]
    browser.find_element(By.ID, "next-page").click()
    WebDriverWait(browser, 30).until(lambda b: grid_ids(b, "#proposals .card") == [p.id for p in lowest[5:10]])
    assert browser.find_element(By.ID, "page-range").text == f"6–10 of {len(lowest)}"
    browser.find_element(By.ID, "previous-page").click()
    WebDriverWait(browser, 30).until(lambda b: grid_ids(b, "#proposals .card") == [p.id for p in lowest[:5]])
    # one predicted label, most confident first
    label = max({p.label for p in lowest}, key=lambda lab: sum(p.label == lab for p in lowest))
    of_label = sorted((p for p in lowest if p.label == label), key=lambda p: (-p.confidence, p.id))
    Select(browser.find_element(By.NAME, "label")).select_by_visible_text(label)
    Select(browser.find_element(By.NAME, "order")).select_by_value("highest")
    browser.find_element(By.ID, "apply-filter").click()
    WebDriverWait(browser, 30).until(lambda b: grid_ids(b, "#proposals .card") == [p.id for p in of_label[:5]])
    # the threshold's default is reached by some, and the count follows the field
    field = browser.find_element(By.NAME, "threshold")
    threshold = float(field.get_attribute("value"))
    confidences = np.array([p.confidence for p in of_label], np.float32)
    assert (
        0
        < (confidences >= np.float32(threshold)).sum()
        == int(browser.find_element(By.ID, "would-accept").get_attribute("data-count"))
    )
    above = f"{float(confidences.max()) + 0.001:.3f}"
    field.clear()
    field.send_keys(above)
    WebDriverWait(browser, 30).until(lambda b: "none would be accepted" in b.find_element(By.ID, "would-accept").text)
    assert not browser.find_element(By.ID, "accept-above-button").is_enabled()
    top = f"{np.floor(float(confidences[1]) * 1000) / 1000:.3f}"  # at least the two most confident
    expect = [p.id for p in of_label if np.float32(p.confidence) >= np.float32(top)]
    field.clear()
    field.send_keys(top)
    WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, "would-accept").text == f"{len(expect)} would be accepted"
    )
    browser.find_element(By.ID, "accept-above-button").click()
    wait_status(browser, f"{len(expect)} proposals accepted")
    assert [item.label for item in client.get(expect)] == [label] * len(expect)


def test_review_bulk_actions_and_card_states(world):
    """Select a range with shift-click and accept it, relabel a selection, reject a card: each card
    shows its state in its own style and words; after a reload the rejected proposal is not listed
    among the open ones (the page remembers it: LabelCorpus proposes it again) but among the decided."""
    browser, client, url = world["browser"], world["client"], world["web"].url
    browser.get(url + "/review?per_page=10")
    wait(browser, "#proposals .card")
    shown = cards(browser)
    ids = [c.get_attribute("data-id") for c in shown]
    proposed = {c.get_attribute("data-id"): c.get_attribute("data-label") for c in shown}
    pick = lambda n: shown[n].find_element(By.CSS_SELECTOR, ".pick-box")  # noqa: E731
    pick(0).click()
    ActionChains(browser).key_down(Keys.SHIFT).click(pick(2)).key_up(Keys.SHIFT).perform()
    assert browser.find_element(By.ID, "selected-count").text == "3 selected"
    browser.find_element(By.ID, "accept-selected").click()
    wait_status(browser, "3 accepted")
    assert [item.label for item in client.get(ids[:3])] == [proposed[i] for i in ids[:3]]
    pick(3).click()
    pick(4).click()
    browser.find_element(By.ID, "relabel-as").send_keys("zebra")
    browser.find_element(By.ID, "relabel-selected").click()
    wait_status(browser, "2 relabelled")
    assert [item.label for item in client.get(ids[3:5])] == ["zebra", "zebra"]
    shown[5].find_element(By.CSS_SELECTOR, "button.reject").click()
    wait_status(browser, f"{ids[5]}: rejected")
    world.setdefault("rejected", set()).add(ids[5])
    badges = [c.find_element(By.CSS_SELECTOR, ".state-badge").text for c in shown[:7]]
    assert badges == ["accepted"] * 3 + ["relabelled: zebra"] * 2 + ["rejected", ""]
    styles = [next(k for k in c.get_attribute("class").split() if k.startswith("state-")) for c in shown[:7]]
    assert styles == ["state-accepted"] * 3 + ["state-relabelled"] * 2 + ["state-rejected", "state-open"]
    assert browser.execute_script(
        "const [a, r] = arguments; return getComputedStyle(a).borderColor !== getComputedStyle(r).borderColor;",
        shown[0],
        shown[5],
    )
    assert client.get([ids[5]])[0].predicted_label == "" and client.get([ids[5]])[0].label == ""
    shot(browser, "review-states")
    browser.get(url + "/review?per_page=200")
    wait(browser, "#proposals")
    assert ids[5] not in grid_ids(browser, "#proposals .card")
    browser.get(url + "/review?per_page=200&show=decided")
    rejected = wait(browser, f'#proposals .card[data-id="{ids[5]}"]')
    assert (
        "state-rejected" in rejected.get_attribute("class")
        and rejected.find_element(By.CSS_SELECTOR, ".state-badge").text == "rejected"
    )


def test_a_stale_review_offers_recompute_and_shows_its_progress(world):
    """The page in front of a large store (here: told never to recompute on its own) keeps its
    proposals when labels change, says they are stale, and recomputes them when asked, showing the
    progress and reloading when they are ready."""
    browser, client, web = world["browser"], world["client"], world["signin_web"]
    sign_in(browser, web, TOKEN, "/review")
    snapshot = "const p = document.getElementById('proposals'); return p ? parseInt(p.dataset.snapshot, 10) : null;"
    first = WebDriverWait(browser, 60).until(lambda b: b.execute_script(snapshot))
    item = unlabelled_id(world)
    client.set_labels({item: "cat"})
    browser.get(web.url + "/review?per_page=200")
    assert "the store changed" in wait(browser, "#stale").text.lower()
    assert item in grid_ids(browser, "#proposals .card")  # the snapshot as it was
    browser.find_element(By.ID, "recompute").click()
    WebDriverWait(browser, 60).until(lambda b: (b.execute_script(snapshot) or 0) > first)
    assert not browser.find_elements(By.ID, "stale") and item not in grid_ids(browser, "#proposals .card")


# -- search and duplicates ---------------------------------------------------------------------------
def test_search_shows_the_query_filters_more_and_labels_results(world):
    browser, client, url = world["browser"], world["client"], world["web"].url
    query = sorted((world["images"] / "dog").iterdir())[2]
    browser.get(url + "/search")
    wait(browser, "#upload").send_keys(str(query))
    browser.find_element(By.ID, "search-button").click()
    wait(browser, "#results .tile")
    image = browser.find_element(By.ID, "query-image")
    assert browser.execute_script("return arguments[0].naturalWidth", image) > 0  # the uploaded image itself
    browser.find_element(By.ID, "more").click()
    WebDriverWait(browser, 30).until(lambda b: len(grid_ids(b)) == 48)
    expected = client.search(image=query.read_bytes(), k=48)
    assert grid_ids(browser) == [h.id for h in expected]
    # filters: a label, a metadata pair, a minimum score
    Select(browser.find_element(By.CSS_SELECTOR, "#search-filter select[name=label]")).select_by_visible_text("dog")
    browser.find_element(By.CSS_SELECTOR, "#search-filter #apply-filter").click()
    WebDriverWait(browser, 30).until(lambda b: "label=dog" in b.current_url)
    assert grid_ids(browser) == [h.id for h in client.search(image=query.read_bytes(), k=24, labels=["dog"])]
    target = expected[5]
    browser.get(f"{url}/search?upload=1&meta=uri%3D{urllib.parse.quote(target.metadata['uri'])}")
    WebDriverWait(browser, 30).until(lambda b: grid_ids(b) == [target.id])
    browser.get(f"{url}/search?upload=1&min_score={expected[9].score}")
    wait(browser, "#results")
    assert grid_ids(browser) == [h.id for h in expected if h.score >= expected[9].score][:24]
    # label two results at once, from a stored item's search (its thumbnail is the query image)
    browser.get(f"{url}/search?id={urllib.parse.quote(expected[0].id)}")
    wait(browser, "#results .tile")
    assert browser.execute_script("return document.getElementById('query-image').naturalWidth") > 0
    chosen = [i for i in grid_ids(browser) if label_of(world, i) == ""][:2]
    for item_id in chosen:
        browser.find_element(By.CSS_SELECTOR, f'.card[data-id="{item_id}"] .pick-box').click()
    browser.find_element(By.ID, "relabel-as").send_keys("dog")
    browser.find_element(By.ID, "label-selected").click()
    wait_status(browser, "2 labelled dog")
    assert [label_of(world, i) for i in chosen] == ["dog", "dog"]
    shot(browser, "search-filters")


def test_duplicates_keep_one_and_delete_the_rest(world):
    """Three copies of one vector form a group; keep the second: two clicks delete the other two."""
    browser, client, url = world["browser"], world["client"], world["web"].url
    vector = np.random.default_rng(7).standard_normal(client.info().dim).astype(np.float32)
    uri = sorted((world["images"] / "ship").iterdir())[0].as_uri()
    copies = [f"copy/{n}" for n in range(3)]
    client.upsert_many([UpsertItem(i, embedding=vector, metadata={"uri": uri}) for i in copies])
    browser.get(url + "/duplicates?min_score=0.9999")
    group = wait(browser, f'.dup-group:has(.dup-item[data-id="{copies[0]}"])')
    assert group.find_element(By.CSS_SELECTOR, ".group-size").text == "3 items"
    assert sorted(grid_ids(browser, f"#{group.get_attribute('id')} .dup-item")) == copies
    shot(browser, "duplicates-groups")
    group.find_element(By.CSS_SELECTOR, f'input[value="{copies[1]}"]').click()
    button = group.find_element(By.CSS_SELECTOR, ".keep-one")
    button.click()
    assert "click again" in button.text and len(client.get(copies, ignore_missing=True)) == 3  # armed only
    button.click()
    wait_status(browser, f"kept {copies[1]}, deleted 2")
    assert [item.id for item in client.get(copies, ignore_missing=True)] == [copies[1]]
    client.delete([copies[1]])


def sign_in(browser, web: WebProcess, token: str, path: str = "/label") -> None:
    """Sign in through the page's form (from a fresh cookie jar: the two pages share 127.0.0.1)."""
    browser.get(web.url + "/")
    browser.delete_all_cookies()
    browser.get(web.url + path)
    wait(browser, "#token").send_keys(token)
    browser.find_element(By.ID, "sign-in").click()
    WebDriverWait(browser, 60).until(lambda b: "/sign-in" not in b.current_url)


def test_a_read_only_token_sees_no_write_action_and_cannot_write(world):
    """A web page started without a token asks for one; with the read-only token there is nothing
    to click that writes, and a write sent anyway (with the CSRF token) is refused by the service."""
    browser, web = world["browser"], world["signin_web"]
    browser.get(web.url + "/")
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
        "const csrf = document.querySelector('meta[name=csrf-token]').content;"
        "fetch('/api/labels', {method: 'POST', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf},"
        f" body: JSON.stringify({{labels: {{{json.dumps(item_id)}: 'cat'}}}})}})"
        ".then(r => r.json().then(j => done([r.status, j.error])));"
    )
    assert reply == [403, "PERMISSION_DENIED"]
    assert world["client"].get([item_id])[0].label == ""


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
            urllib.request.urlopen(f"{url}/thumb?id=bad/{name}", timeout=30)
        assert err.value.code == 404, name
    good = urllib.request.urlopen(
        f"{url}/thumb?id=cat/{sorted((world['images'] / 'cat').glob('*.jpg'))[0].name}", timeout=30
    )
    assert good.headers["Content-Type"] == "image/jpeg" and good.read()[:2] == b"\xff\xd8"
    client.delete([f"bad/{k}" for k in bad])


# -- what only a browser does: another origin, frames, redirects, CSP, URL normalisation ---------------
def unlabelled_id(world) -> str:
    client = world["client"]
    return next(s.id for s in client.suggest(12) if not client.get([s.id])[0].label)


def attack_form(world, web: WebProcess, item_id: str) -> str:
    """An auto-submitted text/plain form whose body is JSON: {"labels": {id: "pwned"}, "x": "="}
    (the name is all but the end, the browser adds "=" and the value)."""
    name = json.dumps({"labels": {item_id: "pwned"}, "x": ""})[:-2]
    html = (
        f"<form id='f' method='post' enctype='text/plain' action='{web.url}/api/labels'>"
        f"<input name='{html_escape(name)}' value='{html_escape(chr(34) + '}')}'></form>"
        "<script>document.getElementById('f').submit()</script>"
    )
    return world["attacker"].put("form.html", html)


@pytest.mark.parametrize("target", ["web", "signin_web"])
def test_a_cross_origin_form_cannot_write_labels(world, target):
    """The audit's first CSRF: a form on another origin, submitted with the page's cookie (another
    port is the same site, so even SameSite=Strict sends it), or against a --token page (no cookie
    needed at all)."""
    browser, web = world["browser"], world[target]
    item_id = unlabelled_id(world)
    if target == "signin_web":
        sign_in(browser, web, TOKEN)
    browser.get(attack_form(world, web, item_id))
    WebDriverWait(browser, 60).until(lambda b: b.current_url.startswith(web.url))  # the page's reply
    assert world["client"].get([item_id])[0].label == ""
    assert "CROSS_ORIGIN" in browser.page_source


@pytest.mark.parametrize("target", ["web", "signin_web"])
def test_a_no_cors_fetch_from_another_port_cannot_write_labels(world, target):
    browser, web = world["browser"], world[target]
    item_id = unlabelled_id(world)
    if target == "signin_web":
        sign_in(browser, web, TOKEN)
    body = json.dumps({"labels": {item_id: "pwned"}})
    page = world["attacker"].put(
        "fetch.html",
        "<script>Promise.all(["
        f"fetch('{web.url}/api/labels', {{method: 'POST', mode: 'no-cors', credentials: 'include',"
        f" headers: {{'Content-Type': 'text/plain'}}, body: {json.dumps(body)}}}),"
        f"fetch('{web.url}/api/reject', {{method: 'POST', mode: 'no-cors', credentials: 'include',"
        f" headers: {{'Content-Type': 'text/plain'}}, body: {json.dumps(json.dumps({'ids': [item_id]}))}}}),"
        "]).finally(() => { document.title = 'sent'; });</script>",
    )
    browser.get(page)
    WebDriverWait(browser, 60).until(lambda b: b.title == "sent")
    assert world["client"].get([item_id])[0].label == ""


def test_a_cross_origin_sign_in_does_not_sign_the_browser_in(world):
    """Login CSRF: the attacker's page signs the victim's browser in with the attacker's token."""
    browser, web = world["browser"], world["signin_web"]
    browser.get(web.url + "/")
    browser.delete_all_cookies()
    browser.get(web.url + "/sign-in")  # the victim has an (anonymous) session and its cookie
    page = world["attacker"].put(
        "login.html",
        f"<form id='f' method='post' action='{web.url}/sign-in'><input name='token' value='{READ_ONLY}'></form>"
        "<script>document.getElementById('f').submit()</script>",
    )
    browser.get(page)
    WebDriverWait(browser, 60).until(lambda b: b.current_url.startswith(web.url))
    browser.get(web.url + "/label")
    wait(browser, "#token")  # still asked for a token: not signed in as the attacker
    assert not browser.find_elements(By.CSS_SELECTOR, "#queue")


def test_the_pages_cannot_be_framed_by_another_origin(world):
    browser, web = world["browser"], world["web"]
    browser.get(world["attacker"].put("frame.html", f"<iframe id='f' src='{web.url}/review'></iframe>"))
    frame = wait(browser, "#f")
    WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.readyState") == "complete")
    browser.switch_to.frame(frame)
    try:
        assert not browser.find_elements(By.ID, "nav-review")  # Chromium shows its error page instead
    finally:
        browser.switch_to.default_content()
    shot(browser, "framed")


@pytest.mark.parametrize(
    "next_", ["//{host}/landed.html", "http://{host}/landed.html", "/\\{host}/landed.html", "/\t/{host}/landed.html"]
)
def test_sign_in_does_not_redirect_off_the_site(world, next_):
    browser, web = world["browser"], world["signin_web"]
    target = next_.format(host=urllib.parse.urlsplit(world["attacker"].url).netloc)
    browser.get(web.url + "/")
    browser.delete_all_cookies()
    browser.get(f"{web.url}/sign-in?next={urllib.parse.quote(target, safe='')}")
    wait(browser, "#token").send_keys(TOKEN)
    browser.find_element(By.ID, "sign-in").click()
    WebDriverWait(browser, 60).until(lambda b: "/sign-in" not in b.current_url)
    assert browser.current_url == web.url + "/" and not browser.find_elements(By.ID, "attacker")
    wait(browser, "#counts")  # the overview


def test_the_content_security_policy_lets_the_pages_own_script_and_style_run(world):
    """No inline script or style: the policy (script-src/style-src 'self') refuses nothing on any
    page, the stylesheet applies, and the script runs (the labelling tests above use it)."""
    browser, web = world["browser"], world["web"]
    browser.get_log("browser")  # drop what came before
    for path in ("/", "/search", "/label", "/review", "/duplicates?min_score=0.99", "/search?id=cat/x"):
        browser.get(web.url + path)
        wait(browser, "nav")
        assert browser.execute_script("return getComputedStyle(document.querySelector('nav')).display") == "flex"
    browser.get(web.url + "/label")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)  # the script's keyboard handler
    WebDriverWait(browser, 30).until(lambda b: "skipped" in b.find_element(By.ID, "status").text)
    violations = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not violations


def test_thumbnails_of_ids_a_browser_would_normalise_are_their_own(world):
    """Ids holding "..", "./" or a leading "/": the tile's thumbnail is the item's own image, not
    that of the id the browser would make of the URL path (an existing item here)."""
    client, browser, images = world["client"], world["browser"], world["images"]
    target = sorted((images / "cat").glob("*.jpg"))[0]
    others = sorted((images / "bird").glob("*.jpg"))[:3]
    tricky = [f"dots/../cat/{target.name}", f"./cat/{target.name}", f"/cat/{target.name}"]
    vector = client.embed([target.read_bytes()])[0]
    client.upsert_many([UpsertItem(i, embedding=vector, metadata={"uri": o.as_uri()}) for i, o in zip(tricky, others)])
    try:
        browser.get(world["web"].url + "/review")
        wait(browser, ".group .card")
        got = browser.execute_async_script(
            "const [ids, done] = [arguments[0], arguments[arguments.length - 1]];"
            "const tiles = [...document.querySelectorAll('.tile')].filter((t) => ids.includes(t.dataset.id));"
            "Promise.all(tiles.map(async (t) => {"
            "  const bytes = new Uint8Array(await (await fetch(t.querySelector('img').src)).arrayBuffer());"
            "  return [t.dataset.id, btoa(String.fromCharCode(...bytes))];"
            "})).then((pairs) => done(Object.fromEntries(pairs)));",
            tricky,
        )
        assert sorted(got) == sorted(tricky)
        for item_id, other in zip(tricky, others):
            assert base64.b64decode(got[item_id]) == thumbnail(other.as_uri(), [images.resolve()]), item_id
    finally:
        client.delete(tricky)


def test_sign_out_ends_the_session_and_a_copied_cookie_stops_working(world):
    browser, web = world["browser"], world["signin_web"]
    sign_in(browser, web, TOKEN)
    wait(browser, "#queue .card")
    copied = browser.get_cookie("moco_session")
    assert copied["httpOnly"] and copied["sameSite"] == "Strict" and TOKEN not in copied["value"]
    browser.find_element(By.ID, "sign-out").click()
    wait(browser, "#token")
    browser.add_cookie({"name": "moco_session", "value": copied["value"], "path": "/"})
    browser.get(web.url + "/label")
    wait(browser, "#token")  # the old id is unknown to the page now
    assert not browser.find_elements(By.CSS_SELECTOR, "#queue")
