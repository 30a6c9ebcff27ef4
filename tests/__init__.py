"""The test suite: one folder per package (moco_retrieval, moco_train, retrieval_server,
retrieval_client), deploy/ for the Docker image and monitoring, and the demo end to end."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
