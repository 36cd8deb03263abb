#!/bin/sh
# libFuzzer targets for the module's parsers (make fuzz; docs/testing.md).
#
#   scripts/fuzz.sh build            build every target into build/fuzz/
#   scripts/fuzz.sh run [target...]  build, then run each target for
#                                    FUZZ_SECONDS (default 60) on its corpus
#
# nginx and the module are compiled once with clang, coverage, ASan and
# UBSan (the module statically, as an addon), in build/fuzz/nginx-src; each
# target links its harness fuzz/<target>.c against those objects, so it
# calls the module's own functions.  A crash, leak or sanitizer report
# fails the run; its input is kept in build/fuzz/crashes/<target>/.
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/build/fuzz
src=$top/build/nginx-full
tree=$out/nginx-src
what=${1:-run}
[ $# -gt 0 ] && shift

cc=${FUZZ_CC:-clang}
# NGX_DEBUG_PALLOC: every pool allocation is its own malloc, so ASan sees
# overruns inside pools (as in scripts/asan.sh)
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined"
san="$san -fno-sanitize=alignment -fno-omit-frame-pointer"
ccopt="-g -O1 $san -fsanitize=fuzzer-no-link -DNGX_DEBUG_PALLOC=1"
libs="-lcrypt -lpcre2-8 -lssl -lcrypto -lz -lhiredis -ljansson -ldl -lpthread"

configure() {
    sh "$top/scripts/nginx-src.sh"
    mkdir -p "$out"
    if [ ! -f "$tree/configure" ] || [ "$src/conf_flags" -nt "$tree/conf_flags" ]
    then
        rm -rf "$tree"
        cp -a "$src" "$tree"
    fi

    stamp="$tree/.civicgate-configured"
    want="$(cat "$top/config") $cc $ccopt"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        # --add-module: the module's objects are linked statically
        (cd "$tree" &&
         bash -c '. ./conf_flags; exec ./configure "${NGX_CONF_FLAGS[@]}" "$@"' \
            configure --with-cc="$cc" --with-cc-opt="$ccopt" \
            --with-ld-opt="$san -fsanitize=fuzzer-no-link" \
            --add-module="$top" > "$out/configure.log" 2>&1) \
            || { tail -30 "$out/configure.log"; exit 1; }
        printf '%s' "$want" > "$stamp"
    fi
}

build() {
    configure
    (cd "$tree" && make -s -j2 -f objs/Makefile binary)

    # nginx's own main() gives way to libFuzzer's
    objcopy --redefine-sym main=ngx_fuzz_nginx_main \
        "$tree/objs/src/core/nginx.o" "$out/nginx.o"
    find "$tree/objs" -name '*.o' ! -path '*/src/core/nginx.o' \
        | sort > "$out/objects"

    incs="-I$top/module -I$top/fuzz"
    for d in src/core src/event src/event/modules src/os/unix objs \
             src/http src/http/modules src/http/v2; do
        incs="$incs -I$tree/$d"
    done

    for f in "$top"/fuzz/*.c; do
        t=$(basename "$f" .c)
        [ "$t" = fuzz ] && continue
        bin=$out/$t
        if [ -f "$bin" ] && [ "$bin" -nt "$f" ] && [ "$bin" -nt "$tree/objs/nginx" ] \
           && [ "$bin" -nt "$top/fuzz/fuzz.h" ]; then
            continue
        fi
        # shellcheck disable=SC2086
        $cc $ccopt -Wall -Wextra -Werror -Wno-unused-parameter $incs \
            -c -o "$out/$t.o" "$f"
        # shellcheck disable=SC2046,SC2086
        $cc $san -fsanitize=fuzzer -o "$bin" "$out/$t.o" "$out/nginx.o" \
            $(cat "$out/objects") $libs
    done
}

run() {
    seconds=${FUZZ_SECONDS:-60}
    targets=${*:-$(cd "$top/fuzz" && ls -- *.c | sed 's/\.c$//' | grep -vx fuzz)}
    failed=""
    for t in $targets; do
        corpus=$out/corpus/$t
        crashes=$out/crashes/$t
        mkdir -p "$corpus" "$crashes"
        echo "fuzz: $t for ${seconds}s"
        # new inputs go to build/fuzz/corpus; the committed seeds are read only.
        # An allocation over 2 GB fails (NULL) as it would in a worker,
        # instead of ending the run: hiredis 0.14 callocs whatever element
        # count a reply announces, and the module must cope with the error.
        if ! ASAN_OPTIONS="max_allocation_size_mb=2048:allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
             "$out/$t" -max_total_time="$seconds" -timeout=10 \
                -rss_limit_mb=2560 -malloc_limit_mb=2560 -print_final_stats=1 \
                -artifact_prefix="$crashes/" "$corpus" "$top/fuzz/corpus/$t" \
                > "$out/$t.log" 2>&1
        then
            failed="$failed $t"
            grep -A30 -m1 'ERROR: \|runtime error\|ALARM\|deadly signal' \
                "$out/$t.log" || tail -30 "$out/$t.log"
        fi
        grep -E '^stat::number_of_executed_units|^stat::new_units_added' \
            "$out/$t.log" | sed "s/^/  $t: /"
    done
    if [ -n "$failed" ]; then
        echo "fuzz: FAILED:$failed (inputs in build/fuzz/crashes/)" >&2
        exit 1
    fi
    echo "fuzz: all targets ran without a finding"
}

case $what in
    build) build ;;
    run) build; run "$@" ;;
    *) echo "usage: $0 [build|run [target...]]" >&2; exit 2 ;;
esac
