# The two commands: `make demo` (the main job, end to end) and `make test` (lint + the whole test suite, what CI runs).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV = $(shell scripts/ensure_venv.sh)
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint format proto
demo:
	@venv="$(VENV)"; "$$venv/bin/python" -m scripts.demo $(DEMO_ARGS)

# Test files are spread over one worker per core (at most 4), each file whole on one worker so
# its module fixtures (a server, a browser, a training matrix) are built once.
test: lint
	@scripts/ensure_system_deps.sh
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" "$$venv/bin/python" -m pytest -n auto --maxprocesses 4 --dist loadfile $(PYTEST_ARGS)

# The quick loop: lint + everything but the tests marked slow (several processes, Prometheus, Docker, demo).
test-fast: lint
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" "$$venv/bin/python" -m pytest -m "not slow" $(PYTEST_ARGS)

lint:
	@venv="$(VENV)"; "$$venv/bin/ruff" check . && "$$venv/bin/ruff" format --check --quiet .

format:
	@venv="$(VENV)"; "$$venv/bin/ruff" check --fix . && "$$venv/bin/ruff" format .

# Regenerate the Python gRPC code from proto/ (tests fail when it is stale).
proto:
	@venv="$(VENV)"; "$$venv/bin/python" -m scripts.gen_proto
