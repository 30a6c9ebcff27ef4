"""One definition per option: the dataclass field gives the flag, its environment variable and its default."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from moco_retrieval.options import add_options, from_args, option


@dataclass(frozen=True)
class Config:
    roots: list[Path] = option([], "--root", help="folders; repeat or list several")
    schedule: list[int] = option([120, 160], help="epochs")
    port: int = option(50051, help="port")


def parse(argv: list[str], env_prefix: str | None = None) -> Config:
    parser = argparse.ArgumentParser()
    add_options(parser, Config, env_prefix=env_prefix)
    return from_args(Config, parser.parse_args(argv))


@pytest.mark.parametrize(
    "argv", [["--root", "/a", "/b"], ["--root", "/a", "--root", "/b"], ["--root", "/a", "--root", "/b", "--port", "1"]]
)
def test_a_list_option_collects_every_value_given(argv: list[str]) -> None:
    assert parse(argv).roots == [Path("/a"), Path("/b")]


def test_a_list_option_given_replaces_its_default() -> None:
    assert parse([]).schedule == [120, 160]
    assert parse(["--schedule", "10"]).schedule == [10]
    assert parse([]).roots == []


def test_environment_variables_set_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_PORT", "7")
    monkeypatch.setenv("APP_SCHEDULE", "5 9")
    assert parse([], env_prefix="APP_") == Config(roots=[], schedule=[5, 9], port=7)
    assert parse(["--port", "8", "--schedule", "1"], env_prefix="APP_") == Config(roots=[], schedule=[1], port=8)
