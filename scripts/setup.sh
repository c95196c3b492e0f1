#!/usr/bin/env bash
# One-step setup on a fresh Debian machine with Node 20: installs the pinned pnpm, the Debian packages
# cowstack's tests and benchmarks drive (qemu-img/qemu-io, libnbd tools and Python bindings, fio,
# nbdkit, qemu-storage-daemon, e2fsprogs, fincore), the workspace dependencies, and builds every
# package.
# Safe to run again: it installs only what is missing. Uses sudo when not run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi

# command-or-test : Debian package
wanted=(
  "qemu-img:qemu-utils"
  "qemu-io:qemu-utils"
  "nbdinfo:libnbd-bin"
  "nbdcopy:libnbd-bin"
  "nbdsh:libnbd-bin"
  "fio:fio"
  "nbdkit:nbdkit"
  "qemu-storage-daemon:qemu-system-common"
  "mkfs.ext4:e2fsprogs"
  "fusermount3:fuse3"
  "fincore:util-linux"
)
missing=()
for pair in "${wanted[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then missing+=(python3-libnbd); fi
if [ "${#missing[@]}" -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup: installing Debian packages: ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

pnpm_version=$(node -p 'require("./package.json").packageManager.split("@")[1]')
if [ "$(pnpm --version 2>/dev/null || true)" != "$pnpm_version" ]; then
  echo "setup: installing pnpm $pnpm_version"
  "${sudo_cmd[@]}" npm install -g --silent "pnpm@$pnpm_version"
fi

pnpm install --frozen-lockfile --reporter=silent
pnpm -s build
echo "setup: ready (node $(node --version), pnpm $(pnpm --version))"
