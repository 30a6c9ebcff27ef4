"""deploy/ against a real Prometheus (Debian's `prometheus` package) scraping a real server: every
PromQL expression of the Grafana dashboard and of the alert rules evaluates and returns data after
some traffic, the rules load and evaluate healthy, the down alert goes pending when the server goes
away, and promtool accepts the config, the rules and the server's /metrics text."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from moco_retrieval.api.v1 import retrieval_pb2 as pb
from moco_retrieval.net import free_port
from tests import REPO
from tests.server_harness import ServerProcess, make_export, png_bytes

pytestmark = pytest.mark.slow

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "retrieval.json"
ALERTS = DEPLOY / "alerts.yml"
JOB = "retrieval-server"
SCRAPE_S = 1
WAIT_S = 60.0
RATE_WINDOW = "1m"  # stands in for Grafana's $__rate_interval
THRESHOLD = re.compile(r"^(?P<quantity>.*?)\s*(?:==|!=|>=|<=|>|<)\s*[0-9.eE+-]+\s*$", re.DOTALL)


def tool(name: str) -> str:
    if shutil.which(name) is None:
        subprocess.run([str(REPO / "scripts" / "ensure_system_deps.sh")], check=True)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's prometheus package (scripts/ensure_system_deps.sh as root)")
    return path


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    return json.loads(body) if response.headers.get_content_type() == "application/json" else body


class Prometheus:
    def __init__(self, workdir: Path, metrics_port: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_S}s\n  evaluation_interval: {SCRAPE_S}s\n"
            f"rule_files:\n  - {ALERTS}\n"
            f"scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{metrics_port}']\n"
        )
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> list[dict]:
        data = get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert data["status"] == "success", f"{expr}: {data}"
        return data["data"]["result"]

    def wait_for(self, what: str, condition) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}"
            try:
                if condition():
                    return
            except (OSError, ValueError):
                pass  # not listening yet
            time.sleep(0.2)
        raise TimeoutError(f"Prometheus: {what} not seen within {WAIT_S:.0f} s")

    def scrapes(self) -> float:
        result = self.query(f'count_over_time(up{{job="{JOB}"}}[10m])')
        return float(result[0]["value"][1]) if result else 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def drive_traffic(server: ServerProcess) -> None:
    """Every kind of call the dashboard shows: Embed, Upsert, Search, Classify, LabelCorpus, and a bad
    request (undecodable image: INVALID_ARGUMENT and a decode error)."""
    stub = server.stub()
    images = [png_bytes(seed) for seed in range(12)]
    stub.Embed(pb.EmbedRequest(images=images[:4]))
    items = [pb.Item(id=f"img-{i}", image=img, label=("a", "b", "")[i % 3]) for i, img in enumerate(images)]
    acks = list(stub.Upsert(iter([pb.UpsertRequest(items=items[:6]), pb.UpsertRequest(items=items[6:])])))
    assert sum(a.upserted for a in acks) == len(items)
    for img in images[:3]:
        stub.Search(pb.SearchRequest(query=pb.Query(image=img), k=5))
        stub.Classify(pb.ClassifyRequest(query=pb.Query(image=img)))
    stub.Classify(pb.ClassifyRequest(query=pb.Query(id="img-2")))
    assert list(stub.LabelCorpus(pb.LabelCorpusRequest()))
    with pytest.raises(grpc.RpcError) as bad:
        stub.Embed(pb.EmbedRequest(images=[b"not an image"]))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Prometheus]]:
    root = tmp_path_factory.mktemp("monitoring")
    server = ServerProcess(make_export(root), root / "store").start()
    prometheus = Prometheus(root, server.metrics_port)
    try:
        prometheus.wait_for("a first scrape", lambda: prometheus.query(f'up{{job="{JOB}"}} == 1'))
        drive_traffic(server)
        before = prometheus.scrapes()
        # Samples after the traffic, so every rate() over the window sees the counters move.
        prometheus.wait_for("3 scrapes after the traffic", lambda: prometheus.scrapes() >= before + 3)
        yield server, prometheus
    finally:
        prometheus.stop()
        server.stop()


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_expressions_return_data(stack) -> None:
    _, prometheus = stack
    exprs = dashboard_expressions()
    assert len(exprs) >= 10
    empty = [e for e in exprs if not prometheus.query(e.replace("$__rate_interval", RATE_WINDOW))]
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)


def test_alert_rules_load_evaluate_and_measure_something(stack) -> None:
    """Healthy, the alerts are (rightly) empty; what each compares with its threshold must not be."""
    _, prometheus = stack

    def rules() -> list[dict]:
        groups = get(f"{prometheus.url}/api/v1/rules")["data"]["groups"]
        return [r for g in groups for r in g["rules"]]

    prometheus.wait_for(
        "every rule evaluated", lambda: rules() and all(not r["lastEvaluation"].startswith("0001") for r in rules())
    )
    loaded = rules()
    assert {r["name"] for r in loaded} == {
        "RetrievalServerDown",
        "RetrievalHighErrorRatio",
        "RetrievalHighLatencyP99",
        "RetrievalQueueSaturated",
        "RetrievalQueueRejecting",
        "RetrievalStoreDiskLow",
        "RetrievalStoreDiskFillingUp",
    }
    for rule in loaded:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        quantity = THRESHOLD.match(rule["query"])
        assert quantity, f"{rule['name']}: expected `<quantity> <comparison> <threshold>`: {rule['query']}"
        assert prometheus.query(quantity["quantity"]), f"{rule['name']}: no data for {quantity['quantity']}"


def test_promtool_checks(stack, tmp_path: Path) -> None:
    server, prometheus = stack
    promtool = tool("promtool")
    for args in (
        ["check", "config", str(DEPLOY / "prometheus.yml")],
        ["check", "config", str(prometheus.config)],
        ["check", "rules", str(ALERTS)],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    metrics_text = get(server.metrics_url)
    result = subprocess.run([promtool, "check", "metrics"], input=metrics_text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_down_alert_goes_pending_when_the_server_stops(stack) -> None:
    """Last: stops the server."""
    server, prometheus = stack
    assert server.stop() == 0

    def pending() -> bool:
        alerts = get(f"{prometheus.url}/api/v1/alerts")["data"]["alerts"]
        return any(
            a["labels"]["alertname"] == "RetrievalServerDown" and a["state"] in ("pending", "firing") for a in alerts
        )

    prometheus.wait_for("RetrievalServerDown pending", pending)
