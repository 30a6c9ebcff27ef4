# The two commands: `make demo` (the main job, end to end) and `make test` (the test suite).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV = $(shell scripts/ensure_venv.sh)
PYTEST_ARGS ?=

.PHONY: demo test proto
demo:
	@venv="$(VENV)"; "$$venv/bin/python" -m scripts.demo $(DEMO_ARGS)

test:
	@scripts/ensure_system_deps.sh
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" "$$venv/bin/python" -m pytest $(PYTEST_ARGS)

# Regenerate the Python gRPC code from proto/ (tests fail when it is stale).
proto:
	@venv="$(VENV)"; "$$venv/bin/python" -m scripts.gen_proto
