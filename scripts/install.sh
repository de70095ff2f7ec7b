#!/usr/bin/env bash
# Install what ambasync needs; the one install step shared by the README (make), .ci/run and the Dockerfile.
# Idempotent: a second call finds everything present and installs nothing.
#
#   scripts/install.sh                 system packages + the project, editable, with test extras
#   scripts/install.sh --system-only   only the Debian packages (libminc-dev, minc-tools)
#   scripts/install.sh --no-dev        system packages + the project, non-editable, no extras (Docker)
#   scripts/install.sh --with-bench    also aria2 and requests (the benchmark's baselines)
#
# Environment: PYTHON (default python3).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
system_only=0
dev=1
extras="test"
packages=(libminc-dev minc-tools)
for arg in "$@"; do
  case "$arg" in
    --system-only) system_only=1 ;;
    --no-dev) dev=0 ;;
    --with-bench) packages+=(aria2); extras="test,bench" ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
# The dev path also gets Debian's Chromium and its driver: tests/test_view_browser.py drives that
# system browser with selenium (nothing downloads a browser at install time).
if ((dev && !system_only)); then packages+=(chromium chromium-driver); fi

say() { echo "install.sh: $*" >&2; }

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { say "need root or sudo to install ${missing[*]}"; exit 1; }
    sudo="sudo"
  fi
  say "installing Debian packages: ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present: ${packages[*]}"
fi
((system_only)) && exit 0

if ((dev)); then
  # The editable install is redone only when what it depends on changed (make test-fast stays fast).
  stamp=".install-stamp"
  want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16) $extras $("$PYTHON" -c 'import sys; print(sys.prefix)')"
  # ...and only if the installed package is this checkout's (another clone may have installed its own)
  here='import ambasync, pathlib, sys; sys.exit(pathlib.Path(ambasync.__file__).resolve().parent != pathlib.Path("ambasync").resolve())'
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PYTHON" -c "$here" 2>/dev/null; then
    say "ambasync already installed (editable, extras: $extras)"
    exit 0
  fi
  say "installing ambasync (editable, extras: $extras) into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
  echo "$want" > "$stamp"
else
  # Exactly what tests/test_wheel.py checks: build the wheel, install it (not editable).
  wheels="$(mktemp -d)"
  say "building the ambasync wheel"
  "$PYTHON" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$wheels" .
  say "installing ambasync into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-cache-dir "$wheels"/ambasync-*.whl
  rm -rf "$wheels" build ./*.egg-info
fi
