"""Tests of retrieval_client."""
