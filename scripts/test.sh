#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian/Ubuntu machine, then run all tests
# (slow ones included). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Fashion-MNIST (real data), QEMU + debootstrap (arm64 checks), OpenSSH + dropbear (device bench tests).
APT_PACKAGES="dataset-fashion-mnist qemu-user-static debootstrap debian-archive-keyring openssh-server openssh-client dropbear-bin"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "installing system packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

# torch/torchvision pinned to the pair that installs CPU-runnable wheels together on Python 3.11 x86_64.
# setuptools >= 70.1 (bdist_wheel built in): tests/test_install.py builds the wheel offline, --no-build-isolation.
python3 -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 'setuptools>=70.1' -e '.[dev]'
python3 -m pytest "$@"
