#!/usr/bin/env bash
# Unpacks the header-only build dependencies of repmlp_rt (CLI11, nlohmann-json, stb) into a
# folder, for machines where they cannot be installed with apt (e.g. GPU boxes with only a
# CUDA torch and pybind11). Run it where apt-get works, copy the folder over, then build with
#   REPMLP_THIRD_PARTY_PREFIX=/path/to/folder pip install --no-build-isolation .
# libstb's shared library is not needed: without it, CMake compiles stb_image from the header.
# usage: cpp/scripts/unpack_header_deps.sh [DEST]   (default: third_party_prefix)
set -euo pipefail
dest=$(realpath -m "${1:-third_party_prefix}")
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download libcli11-dev nlohmann-json3-dev libstb-dev
for deb in ./*.deb; do
  dpkg -x "$deb" "$dest"
done
echo "unpacked into $dest:"
ls "$dest/usr/include"
echo "build with: REPMLP_THIRD_PARTY_PREFIX=$dest pip install --no-build-isolation ."
