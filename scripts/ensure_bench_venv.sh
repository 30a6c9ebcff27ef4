#!/usr/bin/env bash
# Prints the path of the benchmark virtualenv: the project's venv (reused through a .pth file, so
# torch is not installed twice) plus the benchmark peers of bench/requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(scripts/ensure_venv.sh)
# Keyed by the project venv too: each project venv (MOCO_VENV) gets its own benchmark venv on top.
hash=$( (cat requirements.txt requirements-dev.txt bench/requirements.txt; echo "$base") | sha256sum | cut -c1-12)
venv="${MOCO_BENCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/moco-retrieval/bench-venv-$hash}"
if [[ ! -f "$venv/.complete" ]]; then
  echo "building benchmark virtualenv $venv" >&2
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  site=$("$venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
  # An "import" line in a .pth runs at start-up; addsitedir also honours the project venv's own .pth files.
  "$base/bin/python" -c "import site; print(f\"import site; site.addsitedir({site.getsitepackages()[0]!r})\")" > "$site/project-venv.pth"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r bench/requirements.txt >&2
  touch "$venv/.complete"
fi
echo "$venv"
