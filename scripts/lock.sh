#!/usr/bin/env bash
# Regenerate constraints/cpu.txt: resolve `.[cpu,test]` (plus the extras later issues add) into a
# throw-away venv and freeze it. Run after changing dependencies in pyproject.toml; commit the result
# only after the test suite passed on it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS=${EXTRAS:-cpu,test}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q torch==2.13.0
"${pip[@]}" install -q -c <(echo "torch==2.13.0+cpu") -e ".[$EXTRAS]"
{
  grep '^#' constraints/cpu.txt
  "${pip[@]}" freeze | grep -v -E '^(-e |ray_app|ray-app)' | sort -f
} > constraints/cpu.txt.new
mv constraints/cpu.txt.new constraints/cpu.txt
echo "wrote constraints/cpu.txt ($(grep -c '==' constraints/cpu.txt) pins)"
