#!/bin/sh
# Unpack the full source of Debian's nginx into build/nginx-full/ (once):
# nginx-dev ships only the headers, and the sanitizer build and the fuzz
# targets compile nginx itself.  The upstream tarball comes from Debian's
# archive with apt-get source, through a private source list and package
# index under build/apt/, so the system's apt configuration is left alone.
# conf_flags (Debian's configure arguments) is copied from nginx-dev.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/build/nginx-full
apt=$top/build/apt
dev=/usr/share/nginx/src

[ -f "$out/src/core/nginx.c" ] && [ "$out/conf_flags" -nt "$dev/conf_flags" ] \
    && exit 0

version=$(dpkg-query -W -f '${Version}' nginx-dev)
upstream=${version%%-*}

mkdir -p "$apt/lists/partial" "$apt/sources" "$apt/download"
for suite in bookworm bookworm-security; do
    case $suite in
        *-security) uri=http://deb.debian.org/debian-security ;;
        *) uri=http://deb.debian.org/debian ;;
    esac
    printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\n%s\n\n' \
        "$uri" "$suite" \
        'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg'
done > "$apt/sources/nginx.sources"

aptopts="-q -o Dir::Etc::SourceList=/dev/null
         -o Dir::Etc::SourceParts=$apt/sources
         -o Dir::State::Lists=$apt/lists -o APT::Sandbox::User=root"

tarball=$apt/download/nginx_$upstream.orig.tar.gz
if [ ! -f "$tarball" ]; then
    # shellcheck disable=SC2086
    apt-get $aptopts update >/dev/null
    # only the upstream tarball: its checksum is verified against the
    # signed index; the version's own Debian patches are not needed to
    # build a binary-compatible nginx with the same configure flags
    # shellcheck disable=SC2086
    (cd "$apt/download" &&
     apt-get $aptopts source --download-only --tar-only "nginx=$version" \
         >/dev/null 2>&1 || true)
fi
[ -f "$tarball" ] || { echo "civicgate: cannot fetch nginx_$upstream.orig.tar.gz" >&2; exit 1; }

rm -rf "$out" "$out.tmp"
mkdir -p "$out.tmp"
tar -xzf "$tarball" -C "$out.tmp" --strip-components=1
cp "$dev/conf_flags" "$out.tmp/conf_flags"
mv "$out.tmp" "$out"
