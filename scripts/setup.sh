#!/usr/bin/env bash
# Idempotent set-up: Debian packages stoker needs, and a venv with stoker + dev tools.
# Re-running it is cheap: apt only runs when a package is missing, pip only when
# pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  qemu-system-x86   # the VMM (-M microvm)
  qemu-utils        # qemu-img (the benchmark's copy-on-write overlays)
  mmdebstrap        # builds the default Debian image
  erofs-utils       # packs it as a compressed read-only erofs
  e2fsprogs         # mkfs.ext4 for each VM's throw-away writable layer (and ext4 images)
  squashfs-tools    # images packed as squashfs (format = "squashfs")
  passwd            # useradd --root for the users of image specs
  busybox-static    # the initramfs' only userland
  cpio kmod         # inspecting initramfs / modules when debugging
  zstd              # zstd-compressed kernel modules (trixie kernels) and OCI layers
  lz4               # unpacking the kernel's vmlinux (QEMU boots it through PVH; Firecracker needs it)
  build-essential flex bison bc libelf-dev   # `stoker kernel build` (the microVM kernel)
  xz-utils          # the linux-source tarball
  postgresql        # `stoker serve` on PostgreSQL (the multi-host tests start a throw-away cluster)
  git               # `stoker serve` jobs whose source is a git URL + ref; the network tests' git server
  iproute2 util-linux   # the network tests and bench run in their own namespace (ip, unshare)
  systemd           # systemd-analyze verify of deploy/stoker.service (the unit's test)
  chromium          # the dashboard's browser tests (headless, driven by Playwright)
  nix-bin           # nix: and nixos: image bases (the Nix tests build flakes with it, offline)
  ca-certificates
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: stoker needs Python >= 3.11 ($PYTHON is $("$PYTHON" --version))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.stoker-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
