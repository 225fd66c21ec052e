#!/usr/bin/env bash
# Sets up everything nativelm needs on a fresh Debian machine with Python 3.11:
#   system packages through apt (when root), a virtualenv in .venv, the package with its pinned
#   dependencies (constraints.txt). Idempotent: a second run with nothing changed takes seconds.
# Usage: bash infra/setup.sh [dev]     ("dev" adds the test tools)
#        NATIVELM_ARM64=1 bash infra/setup.sh   (adds only what a simulated ARM64 board needs: `make run ARM64=1`)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
# git: DVC needs the project to be a git repository; openssh: the simulated edge boards are real sshd;
# python3-venv: `python3 -m venv` for the simulated boards' runtime virtualenv (Debian splits it out);
# gcc, libc6-dev: native/build.sh compiles the nativelm ONNX Runtime operator library (docs/kernels.md).
apt_packages=(git openssh-server openssh-client python3-venv gcc libc6-dev)
# dev (tests) only: chromium, driven headless by Playwright (the system browser: Playwright's own
# browser download is never used), fonts so pages render text; postgresql for MLflow on PostgreSQL.
dev_apt_packages=(chromium fonts-liberation postgresql)
# The ARM64 operator build is cross-compiled; its kernels are tested, and the simulated ARM64 board's
# Debian arm64 Python runs, under qemu-user (that board's userland is fetched by apt at first use, docs/fleet.md).
arm64_apt_packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)
if [ "$extras" = dev ]; then apt_packages+=("${dev_apt_packages[@]}" "${arm64_apt_packages[@]}"); fi
if [ -n "${NATIVELM_ARM64:-}" ] && [ "$extras" != dev ]; then apt_packages+=("${arm64_apt_packages[@]}"); fi

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]} -- run this as root, or first: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

# the operator library for this machine (native/build/<triple>/libnativelm_ops.so); without a C
# compiler models still run, on the contrib-operator graph
if command -v "${CC:-gcc}" >/dev/null 2>&1; then
  bash native/build.sh >/dev/null
  # and the ARM64 build that provisioning sends to ARM64 boards, where the cross compiler is installed
  if command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; then bash native/build.sh aarch64 >/dev/null; fi
else
  echo "setup: warning: no C compiler (gcc): the nativelm operator library is not built, models use the fallback graph" >&2
fi

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
  echo "setup: nativelm needs Python 3.11 ($python is $("$python" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating virtualenv .venv"
  "$python" -m venv .venv
fi

spec=".[${extras}]"
[ -n "$extras" ] || spec="."
stamp=".venv/.nativelm-setup"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16) ${extras}"
if [ -f "$stamp" ] && grep -qxF "$want" "$stamp" 2>/dev/null; then
  echo "setup: .venv up to date"
  exit 0
fi
echo "setup: installing nativelm${extras:+ with [$extras]} and pinned dependencies (first time: a few minutes)"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e "$spec"
echo "$want" >> "$stamp"
echo "setup: done (.venv/bin/nativelm)"
