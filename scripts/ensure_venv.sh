#!/usr/bin/env bash
# Prints the path of the project's virtualenv, building it first if it is missing or incomplete.
# The venv lives outside the repository, keyed by a hash of the requirements, so clones share it.
set -euo pipefail
cd "$(dirname "$0")/.."
hash=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-12)
venv="${MOCO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/moco-retrieval/venv-$hash}"
if [[ ! -f "$venv/.complete" ]]; then
  echo "building virtualenv $venv (first run only; torch takes a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r requirements-dev.txt >&2
  touch "$venv/.complete"
fi
# The project itself: an editable install, cheap, re-pointed at this checkout every time.
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . >&2
echo "$venv"
