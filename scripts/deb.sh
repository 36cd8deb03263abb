#!/bin/sh
# Build the Debian package libnginx-mod-http-civicgate into build/deb/,
# the Debian way (debian/rules: dh with dh-sequence-nginx), from a copy of
# the source tree: dpkg-buildpackage writes into the parent directory and
# the build leaves files in the tree it builds.
# Extra arguments go to dpkg-buildpackage.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/build/deb

version=$(dpkg-parsechangelog -l "$top/debian/changelog" -S Version)
src=$out/civicgate-${version%-*}

rm -rf "$out"
mkdir -p "$src"

(cd "$top" && tar --exclude=./.git --exclude=./build \
    --exclude=./lua-free-tests/build --exclude=./fuzz/build -cf - .) \
    | tar -C "$src" -xf -

(cd "$src" && dpkg-buildpackage -b -us -uc "$@")

rm -rf "$src"
ls -l "$out"/*.deb
