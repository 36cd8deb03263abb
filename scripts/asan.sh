#!/bin/sh
# Build nginx and the module with AddressSanitizer and UndefinedBehaviorSanitizer
# from Debian's nginx source and configure flags, into build/asan/, then run
# the whole suite against them (make test-asan; docs/testing.md).
#
#   scripts/asan.sh                   build (incrementally), then prove -r t/
#   scripts/asan.sh test t/foo.t ...  build, then prove those files
#   scripts/asan.sh build             build only
#
# Any sanitizer report from any nginx process fails the test that ran it.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
asan=$top/build/asan
src=$top/build/nginx-full
what=${1:-test}
[ $# -gt 0 ] && shift

san="-fsanitize=address,undefined -fno-omit-frame-pointer"
# no _FORTIFY_SOURCE: its checked copies hide accesses from ASan
# NGX_DEBUG_PALLOC: every pool allocation is its own malloc, so ASan sees
# overruns inside pools; alignment: nginx reads headers through unaligned
# word loads on purpose (x86)
ccopt="-g -O1 $san -fno-sanitize=alignment -DNGX_DEBUG_PALLOC=1"
ldopt="$san"

build() {
    sh "$top/scripts/nginx-src.sh"
    mkdir -p "$asan"
    if [ ! -f "$asan/nginx-src/configure" ] \
       || [ "$src/conf_flags" -nt "$asan/nginx-src/conf_flags" ]; then
        rm -rf "$asan/nginx-src"
        cp -a "$src" "$asan/nginx-src"
    fi

    # configure again only when its inputs change; make is incremental
    stamp="$asan/nginx-src/.civicgate-configured"
    want="$(cat "$top/config") $ccopt $ldopt"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        (cd "$asan/nginx-src" &&
         bash -c '. ./conf_flags; exec ./configure "${NGX_CONF_FLAGS[@]}" "$@"' \
            configure --with-cc-opt="$ccopt" --with-ld-opt="$ldopt" \
            --add-dynamic-module="$top" > "$asan/configure.log" 2>&1) \
            || { tail -30 "$asan/configure.log"; exit 1; }
        printf '%s' "$want" > "$stamp"
    fi

    (cd "$asan/nginx-src" && make -s -j2 -f objs/Makefile binary modules)
    install -m 0755 "$asan/nginx-src/objs/nginx" "$asan/nginx"
    install -m 0644 "$asan/nginx-src/objs/ngx_http_civicgate_module.so" \
        "$asan/ngx_http_civicgate_module.so"
}

case $what in
    build|test) ;;
    *) echo "usage: $0 [build|test [file...]]" >&2; exit 2 ;;
esac

build
[ "$what" = build ] && exit 0

# A report stops the process: a worker's ends in "exited on signal 6", and
# the report itself is in error.log (nginx points stderr there), stderr.log
# or the output of nginx -t: t/lib/Civicgate/Test.pm fails the test on
# either when CIVICGATE_SANITIZER is set.  Leak checking is off: see
# docs/testing.md.
common="abort_on_error=1:disable_coredump=1:print_stacktrace=1"
# detect_odr_violation=0: a dynamic module defines ngx_modules and
# ngx_module_names as the binary does, by design (nginx looks them up in
# the module with dlsym)
export ASAN_OPTIONS="$common:detect_leaks=0:detect_odr_violation=0"
export UBSAN_OPTIONS="$common:halt_on_error=1:suppressions=$top/scripts/ubsan.supp"
export CIVICGATE_NGINX=$asan/nginx
export CIVICGATE_MODULE=$asan/ngx_http_civicgate_module.so
export CIVICGATE_SANITIZER=address,undefined

[ $# -eq 0 ] && set -- "$top/t/"
# shellcheck disable=SC2086
exec prove -r ${PROVE_FLAGS:-} "$@"

