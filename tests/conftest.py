"""Shared fixtures. Tests run on the CPU with one intra-op thread each, on real files and processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import REPO

DEMO_DATA = REPO / "data" / "demo"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_data() -> Path:
    """The bundled CIFAR-10 sample: train/<class>/*.jpg (1,600) and test/<class>/*.jpg (400)."""
    assert (DEMO_DATA / "train").is_dir(), "data/demo is missing: run scripts/make_demo_sample.py"
    return DEMO_DATA
