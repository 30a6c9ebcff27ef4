"""The review page at 1k, 10k and 100k items: page weight, time to first byte and first contentful
paint (headless Chromium's Performance API) of the paginated page, beside the page as it was before
(commit BASELINE_COMMIT: every proposal rendered on each request, up to 500 per label), both served
from the same store in the same run.

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/review_page.py                  # 1k, 10k, 100k
    $BVENV/bin/python bench/review_page.py --sizes 2000     # smoke run

Store: random 128-d unit vectors (vector-only upserts, no images: the thumbnails are 404s on both
pages), 1 in 100 labelled with one of 10 labels, so that LabelCorpus proposes a label for the other
99%. The paginated page computes LabelCorpus once, in the background, then serves pages from that
snapshot: its first visit ("cold") waits at most a second and shows the progress, the visits after
it ("warm") read the snapshot. Measured for it: the cold visit in Chromium, the time until the
snapshot is ready, warm pages over HTTP (the first page, the next four, one label's most confident
first; medians of REPEATS) and in Chromium, the threshold count, the page
process's memory; Info over gRPC (every page asks it, and the server counts the labels with a scan
of the store). For the page before: one visit in Chromium (it streams LabelCorpus on every
request). And LabelCorpus alone over gRPC, the floor of any page that computes proposals per request.
Results go to bench/results/review_page.json. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import grpc
import numpy as np
from common import machine_info, ratio, rss_bytes
from selenium import webdriver
from server_bench import CHANNEL_OPTIONS, BenchServer, make_model, packed

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.api.v1 import retrieval_pb2_grpc as pb_grpc
from retrieval_client import RetrievalClient
from retrieval_web.process import WebProcess

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "review_page.json"
BASELINE_COMMIT = "7aedd3e"  # the last commit with the all-at-once review page
DIM = 128
LABELS = 10
LABEL_EVERY = 100
REPEATS = 5
PAINT_SCRIPT = """
const done = arguments[arguments.length - 1];
const read = () => {
  const nav = performance.getEntriesByType("navigation")[0];
  const fcp = performance.getEntriesByName("first-contentful-paint")[0];
  if (!fcp || !nav.loadEventEnd) { setTimeout(read, 50); return; }
  done({ttfb_ms: nav.responseStart - nav.startTime, fcp_ms: fcp.startTime,
        dom_content_loaded_ms: nav.domContentLoadedEventEnd - nav.startTime,
        html_bytes: nav.decodedBodySize, cards: document.querySelectorAll(".card").length});
};
read();
"""


def ingest(stub: pb_grpc.RetrievalStub, size: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def label(j: int) -> str:
        return f"label-{(j // LABEL_EVERY) % LABELS}" if j % LABEL_EVERY == 0 else ""

    def requests():
        for s in range(0, size, 500):
            items = [
                pb.Item(id=f"v{j:07d}", embedding=packed(x[j]), label=label(j)) for j in range(s, min(s + 500, size))
            ]
            yield pb.UpsertRequest(items=items)

    start = time.perf_counter()
    if sum(ack.failed for ack in stub.Upsert(requests())):
        raise RuntimeError("the server refused items")
    return time.perf_counter() - start


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def baseline_package(work: Path) -> Path:
    """The page of BASELINE_COMMIT as the package retrieval_web_before in a folder to put on PYTHONPATH."""
    archive = subprocess.run(
        ["git", "archive", BASELINE_COMMIT, "clients/retrieval_web"], cwd=REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    folder = work / "baseline"
    folder.mkdir()
    (work / "clients" / "retrieval_web").rename(folder / "retrieval_web_before")
    return folder


def fetch(url: str) -> dict:
    """One GET: time to the response's headers (the page is rendered whole before they go), total, size."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=3600)
    start = time.perf_counter()
    connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
    response = connection.getresponse()
    first = time.perf_counter()
    body = response.read()
    end = time.perf_counter()
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"GET {url}: {response.status} {body[:300]!r}")
    return {"ttfb_ms": (first - start) * 1e3, "total_ms": (end - start) * 1e3, "bytes": len(body), "html": body}


def median_fetch(url: str) -> dict:
    runs = [fetch(url) for _ in range(REPEATS)]
    return {
        "ttfb_ms": round(statistics.median(r["ttfb_ms"] for r in runs), 1),
        "total_ms": round(statistics.median(r["total_ms"] for r in runs), 1),
        "bytes": runs[-1]["bytes"],
        "cards": runs[-1]["html"].count(b'<div class="card'),
    }


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    driver.set_page_load_timeout(3600)
    driver.set_script_timeout(60)
    return driver


def paint(driver: webdriver.Chrome, url: str) -> dict:
    """Navigation timing and first contentful paint of one visit, rounded; then a blank page, so that
    the page's script and thumbnails make no requests while the next measurement runs."""
    driver.get(url)
    entry = driver.execute_async_script(PAINT_SCRIPT)
    driver.get("about:blank")
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in entry.items()}


def median_paint(driver: webdriver.Chrome, url: str, runs: int = 3) -> dict:
    visits = [paint(driver, url) for _ in range(runs)]
    return {k: statistics.median(v[k] for v in visits) for k in visits[0]}


def wait_for_snapshot(url: str) -> None:
    while True:
        progress = json.loads(fetch(url + "/api/review/progress")["html"])
        if not progress["computing"]:
            if progress["error"]:
                raise RuntimeError(progress["error"])
            return
        time.sleep(0.2)


def paginated(web: WebProcess, driver: webdriver.Chrome) -> dict:
    url = web.url
    start = time.perf_counter()
    cold = paint(driver, url + "/review")  # a fresh page process: no snapshot yet
    wait_for_snapshot(url)
    snapshot_s = time.perf_counter() - start
    first = fetch(url + "/review")["html"].decode()
    pages = [median_fetch(url + "/review")]
    next_url = re.search(r'id="next-page" href="([^"]+)"', first)
    for _ in range(4):
        if next_url is None:
            break
        target = url + next_url.group(1).replace("&amp;", "&")
        pages.append(median_fetch(target))
        next_url = re.search(r'id="next-page" href="([^"]+)"', fetch(target)["html"].decode())
    return {
        "cold_visit_chromium": cold,
        "cold_shows": "the progress" if cold["cards"] == 0 else "the first page",
        "snapshot_ready_s": round(snapshot_s, 2),
        "warm_first_page": pages[0],
        "warm_next_pages": {
            "count": len(pages) - 1,
            "ttfb_ms_median": statistics.median(p["ttfb_ms"] for p in pages[1:]) if len(pages) > 1 else None,
            "bytes_max": max((p["bytes"] for p in pages[1:]), default=None),
        },
        "warm_one_label_most_confident_first": median_fetch(url + "/review?label=label-3&order=highest"),
        "threshold_count": median_fetch(url + "/api/review/count?threshold=0.5"),
        "warm_first_page_chromium": median_paint(driver, url + "/review"),
        "web_rss_mb": round(rss_bytes(web.proc.pid) / 2**20),
    }


def before(web: WebProcess, driver: webdriver.Chrome) -> dict:
    visit = paint(driver, web.url + "/review")
    return {"visit_chromium": visit, "web_rss_mb": round(rss_bytes(web.proc.pid) / 2**20)}


def bench_size(size: int, work: Path, model: Path, baseline: Path, driver: webdriver.Chrome) -> dict:
    server = BenchServer(model, work / f"store-{size}", work, [])
    server.start()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(baseline), os.environ.get("PYTHONPATH")]))}
    try:
        channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
        ingest_s = ingest(pb_grpc.RetrievalStub(channel), size)
        channel.close()
        with RetrievalClient(server.address, timeout=3600) as client:
            start = time.perf_counter()
            proposals = sum(1 for _ in client.label_corpus())
            label_corpus_s = time.perf_counter() - start
            info_ms = statistics.median(timed(client.info) for _ in range(REPEATS)) * 1e3
        web = WebProcess("--address", server.address, env=env, cwd=REPO)
        try:
            new = paginated(web, driver)
        finally:
            web.close()
        old = WebProcess("--address", server.address, env=env, cwd=REPO, module="retrieval_web_before")
        try:
            was = before(old, driver)
        finally:
            old.close()
    finally:
        server.stop_timed()
    warm = new["warm_first_page_chromium"]
    return {
        "items": size,
        "proposals": proposals,
        "ingest_s": round(ingest_s, 1),
        "label_corpus_grpc_s": round(label_corpus_s, 2),
        "info_grpc_ms": round(info_ms, 1),
        "paginated": new,
        "before": was,
        "before_over_paginated": {
            "html_bytes": ratio(was["visit_chromium"]["html_bytes"], warm["html_bytes"]),
            "ttfb": ratio(was["visit_chromium"]["ttfb_ms"], warm["ttfb_ms"]),
            "fcp": ratio(was["visit_chromium"]["fcp_ms"], warm["fcp_ms"]),
            "fcp_against_cold": ratio(was["visit_chromium"]["fcp_ms"], new["cold_visit_chromium"]["fcp_ms"]),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated item counts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = {
        "benchmark": "review_page",
        "setup": {
            "dim": DIM,
            "labelled": f"1 in {LABEL_EVERY} items, {LABELS} labels",
            "page": "100 proposals a page (the default), lowest confidence first",
            "before": f"commit {BASELINE_COMMIT}: all on one page (at most 500 a label), LabelCorpus per request",
            "repeats": REPEATS,
        },
        "machine": machine_info(),
        "sizes": [],
    }
    driver = browser()
    try:
        with tempfile.TemporaryDirectory(prefix="review-bench-") as tmp:
            work = Path(tmp)
            model = make_model(work / "model.pt", DIM)
            baseline = baseline_package(work)
            for size in (int(s) for s in args.sizes.split(",")):
                result = bench_size(size, work, model, baseline, driver)
                print(json.dumps(result), flush=True)
                report["sizes"].append(result)
                report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
