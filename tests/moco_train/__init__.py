"""Tests of moco_train."""
