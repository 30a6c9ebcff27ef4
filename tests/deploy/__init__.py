"""Tests of the deployment: the Docker image recipe, Prometheus, alerts and the dashboard."""
