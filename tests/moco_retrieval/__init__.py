"""Tests of moco_retrieval."""
