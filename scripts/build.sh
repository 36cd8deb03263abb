#!/bin/sh
# Build ngx_http_civicgate_module.so against Debian's nginx-dev, with the
# configure flags Debian's nginx was built with, so the module is
# binary-compatible with /usr/sbin/nginx.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
build=$top/build
src=/usr/share/nginx/src
extra_cflags=${CIVICGATE_CFLAGS:-}

mkdir -p "$build"

# configure writes into its source tree: work on a private copy
if [ ! -f "$build/nginx/configure" ] || [ "$src/conf_flags" -nt "$build/nginx/configure" ]; then
    rm -rf "$build/nginx"
    cp -a "$src" "$build/nginx"
fi

stamp="$build/nginx/.civicgate-configured"
want="$(cat "$top/config") $extra_cflags"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    cd "$build/nginx"
    cflags="$(dpkg-buildflags --get CFLAGS) $(dpkg-buildflags --get CPPFLAGS)"
    ldflags="$(dpkg-buildflags --get LDFLAGS)"
    bash -c '. ./conf_flags; exec ./configure "${NGX_CONF_FLAGS[@]}" "$@"' \
        configure \
        --with-cc-opt="$cflags -fPIC -Wall -Wextra -Werror $extra_cflags" \
        --with-ld-opt="$ldflags -fPIC" \
        --add-dynamic-module="$top" > "$build/configure.log" 2>&1 \
        || { tail -30 "$build/configure.log"; exit 1; }
    printf '%s' "$want" > "$stamp"
fi

cd "$build/nginx"
make -s -f objs/Makefile modules
# a new inode: running nginx processes keep the file they mapped
cp objs/ngx_http_civicgate_module.so "$build/.ngx_http_civicgate_module.so.$$"
mv -f "$build/.ngx_http_civicgate_module.so.$$" "$build/ngx_http_civicgate_module.so"
