"""deploy/docker-compose.yml checked without a Docker engine: its files exist, every RETRIEVAL_*
variable is a real server option and makes a valid configuration, and the milvus profile is wired
together (replicas on the Milvus service, Envoy on the replicas' port and health service,
Prometheus discovering the replicas). `promtool check config` on deploy/prometheus.yml runs in
test_monitoring.py."""

from __future__ import annotations

import argparse
import os
import re
from urllib.parse import urlparse

import pytest
import yaml

from retrieval_server.config import ENV_PREFIX, add_serve_arguments, config_from_args
from retrieval_server.server import SERVICE_NAME
from tests import REPO

DEPLOY = REPO / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
MILVUS_PROFILE = {"etcd", "minio", "milvus", "replica", "envoy"}


def substituted(value: str) -> str:
    """Compose's ${NAME:-default}, with the defaults."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_profiles_split_the_services() -> None:
    assert {name for name, s in SERVICES.items() if "milvus" in s.get("profiles", [])} == MILVUS_PROFILE
    assert {name for name, s in SERVICES.items() if not s.get("profiles")} == {"server", "prometheus", "grafana"}
    assert SERVICES["replica"]["deploy"]["replicas"] == 2
    named_volumes = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = substituted(volume).split(":")[0]
            if volume.startswith("${"):
                continue  # the user's folder (MODEL_DIR: the encoder to serve)
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named_volumes, f"{name} mounts undeclared volume {source}"
        for dependency in service.get("depends_on", []):
            assert dependency in SERVICES
            if name not in MILVUS_PROFILE:
                assert dependency not in MILVUS_PROFILE, f"{name} would need the milvus profile"


@pytest.mark.parametrize("service", ["server", "replica"])
def test_server_environment_is_a_valid_configuration(service: str, monkeypatch) -> None:
    env = SERVICES[service]["environment"]
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    known = {f"{ENV_PREFIX}{action.dest.upper()}" for action in parser._actions if action.dest != "help"}
    assert set(env) <= known, f"not server options: {set(env) - known}"
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, substituted(str(value)))
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)  # the environment becomes the defaults
    cfg = config_from_args(parser.parse_args([]))
    assert (cfg.host, cfg.port, cfg.metrics_port) == ("0.0.0.0", 50051, 9100)
    assert cfg.backend == ("milvus" if service == "replica" else "embedded")


def test_replicas_use_the_milvus_service() -> None:
    uri = urlparse(SERVICES["replica"]["environment"]["RETRIEVAL_MILVUS_URI"])
    assert (uri.scheme, uri.hostname, uri.port) == ("http", "milvus", 19530)  # Milvus's gRPC port
    assert SERVICES["milvus"]["environment"] == {"ETCD_ENDPOINTS": "etcd:2379", "MINIO_ADDRESS": "minio:9000"}
    assert "ports" not in SERVICES["replica"]  # replicas are reached through Envoy only


def test_envoy_balances_the_replicas_by_grpc_health() -> None:
    envoy = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())["static_resources"]
    (listener,) = envoy["listeners"]
    port = listener["address"]["socket_address"]["port_value"]
    assert f"{port}:{port}" in SERVICES["envoy"]["ports"]
    (cluster,) = envoy["clusters"]
    assert cluster["type"] == "STRICT_DNS"  # every replica's address, re-resolved
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]  # gRPC needs HTTP/2 upstream
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE_NAME
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert (address["address"], str(address["port_value"])) == (
        "replica",
        SERVICES["replica"]["environment"]["RETRIEVAL_PORT"],
    )
    route = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    assert route["virtual_hosts"][0]["routes"][0]["route"]["cluster"] == cluster["name"]


def test_prometheus_finds_every_replica_under_the_servers_job() -> None:
    (job,) = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    assert job["job_name"] == "retrieval-server"  # what the dashboard and alerts select on
    (dns,) = job["dns_sd_configs"]
    assert dns["names"] == ["replica"] and dns["type"] == "A"
    assert str(dns["port"]) == SERVICES["replica"]["environment"]["RETRIEVAL_METRICS_PORT"]
