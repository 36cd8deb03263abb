#!/bin/sh
# Install the Debian packages civicgate needs to build, test and run, if any
# is missing.  Usage: scripts/deps.sh [build|test|demo|bench|deb|asan|fuzz]
set -eu

what=${1:-test}

pkgs="nginx-dev nginx libhiredis-dev libjansson-dev libssl-dev gcc make"
case "$what" in
    build) ;;
    # prometheus: promtool checks the alert rules of examples/prometheus;
    # chromium, its driver and selenium: the status page's browser test
    test) pkgs="$pkgs redis-server redis-tools perl openssl python3-cryptography
               valgrind gdb wrk curl
               debhelper dpkg-dev fakeroot prometheus chromium chromium-driver
               python3-selenium" ;;
    demo) pkgs="$pkgs redis-server redis-tools curl" ;;
    # the Lua peer: OpenResty-style Lua on Debian's nginx, lua-resty-redis
    # (packaged as nginx.redis); redis-tools also brings redis-benchmark
    bench) pkgs="$pkgs redis-server redis-tools wrk curl libnginx-mod-http-lua
                 lua-nginx-redis" ;;
    # the tools of dpkg-buildpackage; the rest of debian/control's
    # Build-Depends is in the list above
    deb) pkgs="$pkgs debhelper dpkg-dev fakeroot" ;;
    # nginx itself is compiled (scripts/nginx-src.sh fetches its source)
    asan) pkgs="$pkgs libpcre2-dev zlib1g-dev redis-server redis-tools perl
                python3-cryptography
                openssl" ;;
    fuzz) pkgs="$pkgs libpcre2-dev zlib1g-dev clang libclang-rt-14-dev" ;;
    *) echo "usage: $0 [build|test|demo|bench|deb|asan|fuzz]" >&2; exit 2 ;;
esac

missing=""
for p in $pkgs; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' \
        || missing="$missing $p"
done

# any nginx flavour that provides /usr/sbin/nginx will do
if [ -x /usr/sbin/nginx ]; then
    missing=$(echo "$missing" | sed 's/ nginx$//; s/ nginx / /')
fi

[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "civicgate: missing packages:$missing" >&2
    echo "civicgate: run as root, or: sudo apt-get install$missing" >&2
    exit 1
fi

echo "civicgate: installing:$missing"
export DEBIAN_FRONTEND=noninteractive

# packaged daemons must not start on public ports: tests start their own
policy=/usr/sbin/policy-rc.d
if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' > $policy
    chmod +x $policy
    trap 'rm -f $policy' EXIT
fi

# apt's own progress stays visible: downloads can take minutes
apt-get update
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $missing
