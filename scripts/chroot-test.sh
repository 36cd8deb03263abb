#!/usr/bin/env bash
# Run the README's commands the way a new user would, on a stock Debian
# system with nothing installed by hand: a root made with debootstrap
# (minbase, then build-essential, make, git and perl), a fresh clone of
# this repository's HEAD, then `make test` and `make demo` as root.
#
# Usage: scripts/chroot-test.sh bookworm|trixie [TARGET...]
#
# TARGETs run in order, each in the same throw-away copy of the root:
#   test   make test (the default, with demo)
#   demo   make demo, stopped with Ctrl-C (SIGINT to its process group)
#          once the walkthrough is printed; it must stop cleanly
#   t/*.t  that test file alone (prove -v), after what make test installs
#          and builds
#   other  make TARGET
#
# The base root is made once, under $CIVICGATE_ROOTS (default
# /var/tmp/civicgate-roots/RELEASE), and reused; every run works in an
# overlay on top of it that is thrown away, so each run starts from the
# stock system.  Runs as root (debootstrap, mount, chroot).  Only committed
# work is tested: the clone is of HEAD, or of $CIVICGATE_REF.
#
# Environment:
#   CIVICGATE_ROOTS   where the base roots live
#   CIVICGATE_REF     the commit to test (default HEAD)
#   CIVICGATE_LOGS    where the logs go (default build/chroot-RELEASE)
#   MIRROR            Debian mirror (default: the one apt uses here)
#   PROVE_FLAGS       passed to make test
#   DEMO_TIMEOUT      seconds the demo may take to start (default 1200)

set -euo pipefail

usage() { echo "usage: $0 bookworm|trixie [test|demo|TARGET...]" >&2; exit 2; }
die() { echo "chroot-test: $*" >&2; exit 1; }
say() { printf 'chroot-test: [%s] %s\n' "$(date -u +%T)" "$*"; }

[ $# -ge 1 ] || usage
release=$1
shift
case "$release" in
    bookworm|trixie) ;;
    *) usage ;;
esac
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(test demo)

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, mount and chroot)"

top=$(cd "$(dirname "$0")/.." && pwd)
roots=${CIVICGATE_ROOTS:-/var/tmp/civicgate-roots}
base=$roots/$release
run=$roots/$release.run.$$
logdir=${CIVICGATE_LOGS:-$top/build/chroot-$release}

# the mirror of the first Debian source apt uses here
default_mirror() {
    local m
    m=$(grep -rhoE '(URIs:|^deb) +https?://[^ ]+/debian/?( |$)' \
            /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | awk '{ print $2; exit }')
    echo "${m:-http://deb.debian.org/debian}"
}
mirror=${MIRROR:-$(default_mirror)}

mkdir -p "$roots" "$logdir"

# in_root DIR CMD...: CMD in the chroot DIR, with a clean environment
in_root() {
    local dir=$1
    shift
    chroot "$dir" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        "$@"
}

# private binds: on a host whose /dev is shared (systemd), mounts below
# them would otherwise show on the host too
mount_system() {
    mount -t proc proc "$1/proc"
    mount --bind /dev "$1/dev"
    mount --make-private "$1/dev"
    mount --bind /dev/pts "$1/dev/pts"
    mount --make-private "$1/dev/pts"
    mount -t tmpfs tmpfs "$1/dev/shm"
}

# ends what still runs in the root (by pid), then unmounts everything
# under it, deepest first
release_root() {
    local dir=$1 p m
    for p in /proc/[0-9]*; do
        if [ "$(readlink "$p/root" 2>/dev/null)" = "$dir" ]; then
            kill -KILL "${p#/proc/}" 2>/dev/null || true
        fi
    done
    while read -r m; do
        umount "$m" 2>/dev/null || umount -l "$m" || true
    done < <(awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' \
                 /proc/self/mounts | sort -r)
}

# what a stock Debian install has, and what the README asks for
make_base() {
    local tmp=$base.new
    say "creating the $release root in $base from $mirror (once)"
    release_root "$tmp"
    rm -rf "$tmp"
    debootstrap --variant=minbase "$release" "$tmp" "$mirror" \
        > "$logdir/debootstrap.log" 2>&1 \
        || { tail -20 "$logdir/debootstrap.log"; die "debootstrap failed"; }
    cat > "$tmp/etc/apt/sources.list" <<EOF
deb $mirror $release main
deb $mirror $release-updates main
deb http://security.debian.org/debian-security $release-security main
EOF
    # as the Debian installer writes it: localhost is both 127.0.0.1 and ::1
    cat > "$tmp/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	civicgate-test

# The following lines are desirable for IPv6 capable hosts
::1     localhost ip6-localhost ip6-loopback
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters
EOF
    echo civicgate-test > "$tmp/etc/hostname"
    cp /etc/resolv.conf "$tmp/etc/resolv.conf"
    mount_system "$tmp"
    trap 'release_root "$base.new"' EXIT
    in_root "$tmp" sh -c 'apt-get update &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y \
            build-essential make git perl && apt-get clean' \
        > "$logdir/base-packages.log" 2>&1 \
        || { tail -20 "$logdir/base-packages.log"; die "apt-get failed"; }
    release_root "$tmp"
    trap - EXIT
    mv "$tmp" "$base"
}

start=$(date +%s)
# one run makes the base root; the others wait for it
exec 9>"$roots/$release.lock"
flock 9
[ -d "$base/usr" ] || make_base
flock -u 9
say "base root ready ($(( $(date +%s) - start )) s)"

# a throw-away overlay of the base root
mkdir -p "$run/upper" "$run/work" "$run/root"
mount -t overlay overlay \
    -o "lowerdir=$base,upperdir=$run/upper,workdir=$run/work" "$run/root"
root=$run/root
cleanup() {
    release_root "$root"
    rm -rf "$run"
}
trap cleanup EXIT
mount_system "$root"
cp /etc/resolv.conf "$root/etc/resolv.conf"

# the user's clone, bound in as /src
commit=$(git -C "$top" rev-parse --verify "${CIVICGATE_REF:-HEAD}^{commit}")
git clone -q "$top" "$run/src"
git -C "$run/src" checkout -q --detach "$commit"
mkdir -p "$root/src"
mount --bind "$run/src" "$root/src"
say "testing ${commit:0:12} in $release;" \
    "logs in $logdir"

# a free loopback port for the demo (the host's network is shared)
demo_port() {
    local p=8080
    while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do
        p=$((p + 1))
    done
    echo "$p"
}

# make demo in its own process group; once the walkthrough is out, Ctrl-C
# as a terminal sends it: SIGINT to the whole group
run_demo() {
    local log=$1 port pid i rc=0 curl_ok
    port=$(demo_port)
    [ "$port" = 8080 ] || say "8080 is busy here: CIVICGATE_DEMO_PORT=$port"
    # a job started with & ignores SIGINT, and so would everything it
    # runs; at a terminal, nothing does
    : > "$log"
    env --default-signal=INT,QUIT \
        setsid chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb \
        LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        CIVICGATE_DEMO_PORT="$port" \
        sh -c 'cd /src && exec make demo' > "$log" 2>&1 < /dev/null &
    pid=$!
    for ((i = 0; i < ${DEMO_TIMEOUT:-1200}; i++)); do
        grep -q '^Press Ctrl-C to stop' "$log" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    if ! grep -q '^Press Ctrl-C to stop' "$log"; then
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait "$pid" || true
        echo "the demo did not start"
        return 1
    fi
    curl_ok=$(in_root "$root" sh -c "curl -s -o /dev/null -w '%{http_code}' \
        -H 'X-Channel: web' http://127.0.0.1:$port/healthz" || true)
    echo "GET /healthz: $curl_ok"
    kill -INT -- "-$pid"
    for ((i = 0; i < 30; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill -0 "$pid" 2>/dev/null && {
        kill -KILL -- "-$pid" 2>/dev/null || true
        echo "the demo did not stop within 30 s of Ctrl-C"
        rc=1
    }
    wait "$pid" || true
    grep -q '^demo: stopped$' "$log" || { echo "no 'demo: stopped'"; rc=1; }
    if grep -E '^make(\[[0-9]+\])?: \*\*\*' "$log"; then
        echo "make reported an error"
        rc=1
    fi
    [ "$curl_ok" = 200 ] || rc=1
    return "$rc"
}

failed=()
for target in "${targets[@]}"; do
    log=$logdir/$target.log
    t0=$(date +%s)
    say "make $target ..."
    rc=0
    case "$target" in
        demo) run_demo "$log" >> "$log.result" 2>&1 || rc=$? ;;
        t/*.t)
            log=$logdir/$(basename "$target" .t).log
            in_root "$root" sh -c "cd /src && sh scripts/deps.sh test \
                && sh scripts/build.sh && prove -v $target" \
                > "$log" 2>&1 < /dev/null || rc=$? ;;
        *) in_root "$root" sh -c "cd /src && make $target \
               ${PROVE_FLAGS:+PROVE_FLAGS='$PROVE_FLAGS'}" \
               > "$log" 2>&1 < /dev/null || rc=$? ;;
    esac
    [ ! -f "$log.result" ] || { cat "$log.result"; rm -f "$log.result"; }
    say "make $target: exit $rc in $(( $(date +%s) - t0 )) s ($log)"
    if [ "$rc" != 0 ]; then
        failed+=("$target")
        # prove's summary and the failed tests, else the end of the log
        awk '/^Test Summary Report/ { s = 1 } s || /^#   Failed test/' \
            "$log" | grep . || tail -30 "$log"
    fi
done

say "$release: ${#targets[@]} target(s) in $(( $(date +%s) - start )) s;" \
    "failed: ${failed[*]:-none}"
[ ${#failed[@]} = 0 ]
