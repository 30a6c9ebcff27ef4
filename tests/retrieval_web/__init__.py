"""Tests of retrieval_web: the web page in a real headless browser, and its thumbnail guard."""
