"""Tests of retrieval_server."""
