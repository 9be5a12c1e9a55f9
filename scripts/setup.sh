#!/usr/bin/env bash
# Set up everything livesplice needs on a fresh Debian 12 machine (as root). Idempotent.
# System packages: QEMU for the test bed, busybox for its initramfs, kmod, and what building kernel
# objects and modules needs; mmdebstrap, e2fsprogs and qemu-utils for the system image of the reboot
# tests (a Debian 12 with systemd, made once and cached). Python: a virtual environment in .venv with livesplice installed.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 busybox-static kmod cpio xz-utils zstd rsync patch diffutils util-linux
          gcc make flex bison bc libelf-dev libssl-dev dwarves python3-venv
          mmdebstrap e2fsprogs qemu-utils openssh-client)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
elif [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  apt-get update -q  # stock kernels are looked up with apt: its lists must be there and fresh
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,man]'
echo "setup: done (.venv/bin/livesplice)"
