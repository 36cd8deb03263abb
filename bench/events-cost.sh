#!/usr/bin/env bash
# What a journey event costs: Redis commands and Redis CPU per event, the
# gateway's CPU per request over tagging alone, Redis memory per stored
# journey, the rate this machine sustains and the spool that holds 10 s of
# it.  One gateway nginx (one worker) and one redis-server on loopback;
# wrk sends the mix: half the requests start a journey, half continue the
# journey of their citizen (CITIZENS citizens, each with one journey).
#
# Figures, all from counters read around each run:
#   cmd/event     INFO commandstats (commands run by scripts included,
#                 EVALSHA itself included) over events written
#   Redis µs/ev   used_cpu_user + used_cpu_sys over events written, the
#                 wait until the last event is written included
#   unit          the same for a plain XADD of the nine fields, sent by
#                 redis-benchmark unpipelined from 32 connections, same run
#   gw µs/req     the gateway worker's CPU (schedstat) per request: tagging
#                 only (events off), then tagging and events
#   growth        Redis µs/event with GROWTH_SMALL, then GROWTH journeys
#                 stored (filled with redis-cli --pipe in the gateway's
#                 key schema, the newest 64 of each citizen in its index),
#                 each after a second of warm-up
#   memory        INFO used_memory over new one-event journeys, the global
#                 stream deleted before each reading
#
# Environment (defaults in brackets):
#   DURATION [3]   seconds of wrk per run   CITIZENS [1000]
#   GROWTH_SMALL [10000]  GROWTH [1000000]  journeys stored for the growth runs
#   KEEP [0]       1: keep the working directory
#   CIVICGATE_MODULE  module to load [build/ngx_http_civicgate_module.so]
#   NGINX          nginx binary [/usr/sbin/nginx]

[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$top/scripts/lib.sh"

DURATION=${DURATION:-3}
CITIZENS=${CITIZENS:-1000}
GROWTH_SMALL=${GROWTH_SMALL:-10000}
GROWTH=${GROWTH:-1000000}
KEEP=${KEEP:-0}
module=${CIVICGATE_MODULE:-$top/build/ngx_http_civicgate_module.so}
nginx=${NGINX:-/usr/sbin/nginx}
# nginx itself reads NGINX (sockets inherited on a binary upgrade)
unset NGINX

die() { echo "events-cost: $*" >&2; exit 1; }

whole_numbers DURATION CITIZENS GROWTH_SMALL GROWTH
[ -f "$module" ] || die "module not found: $module (run: make build)"
for cmd in wrk curl redis-server redis-cli redis-benchmark perl; do
    command -v "$cmd" >/dev/null || die "$cmd not found"
done

work=$(mktemp -d /tmp/civicgate-events-cost.XXXXXX)
mkdir -p "$work/logs" "$work/tmp"
pids=()

cleanup() {
    stop_all
    if [ "$KEEP" = 1 ] || [ "$1" != 0 ]; then
        echo "events-cost: files kept in $work" >&2
    else
        rm -rf "$work"
    fi
}
on_exit cleanup

redis_port=$(free_port 16479)
start_redis "$redis_port" "$work"
rcli() { redis-cli -p "$redis_port" "$@"; }

tag_port=$(free_port 18480 "$redis_port")
ev_port=$(free_port $((tag_port + 1)) "$redis_port $tag_port")

( umask 077; echo "bench $(openssl rand -hex 32)" > "$work/keys" )
copy_module "$module" "$work"

server() {
    cat <<EOT
    server {
        listen  127.0.0.1:$1 backlog=4096;
        civicgate_journey  on;
        civicgate_channel  \$http_x_channel;
        civicgate_citizen  \$http_x_citizen_id;
        civicgate_service  bench;
        civicgate_events   $2;
        location / {
            add_header  X-Pseudonym  \$civicgate_citizen;
            return 200 "ok\n";
        }
        location = /metrics {
            civicgate_events  off;
            civicgate_metrics;
        }
    }
EOT
}

cat > "$work/gateway.conf" <<EOT
load_module       $work/ngx_http_civicgate_module.so;
worker_processes  1;
pid               $work/gateway.pid;
events { worker_connections 4096; }
http {
$(temp_paths "$work" gateway)
    access_log  off;
    keepalive_requests  1000000;
    civicgate_secret_file  $work/keys;
    # two shared cores: a Redis held up for 200 ms is not a failure here
    civicgate_redis        redis://127.0.0.1:$redis_port timeout=2s;
    # every event of a run, whatever Redis takes at once
    civicgate_event_buffer 256m;
$(server "$tag_port" off)
$(server "$ev_port" on)
}
EOT

nginx_test "$work" gateway || die "nginx -t failed ($work/gateway.conf)"
start_nginx "$work" gateway
master=$!
for i in $(seq 50); do
    curl -fs -o /dev/null "http://127.0.0.1:$ev_port/metrics" && break
    [ "$i" -lt 50 ] || die "the gateway did not start"
    sleep 0.1
done


# --- citizens, their journeys and pseudonyms --------------------------------

: > "$work/citizens"
for c in $(seq "$CITIZENS"); do
    id=$(printf '3171%012d' "$c")
    curl -fs -o /dev/null -D - -H "X-Citizen-Id: $id" -H 'X-Channel: web' \
        "http://127.0.0.1:$tag_port/" | tr -d '\r' | awk -v id="$id" -F': ' '
        tolower($1) == "x-journey-id" { j = $2 }
        tolower($1) == "x-pseudonym" { p = $2 }
        END { print id, j, p }' >> "$work/citizens"
done
[ "$(awk 'NF == 3' "$work/citizens" | wc -l)" -eq "$CITIZENS" ] \
    || die "could not mint the citizens' journeys"

# MODE: mix (half new, half continuing) or new (new journeys only)
cat > "$work/mix.lua" <<'EOT'
local reqs, n, i = {}, 0, 0

function init(args)
    local channels = { "web", "app", "sms", "email", "phone", "counter" }
    local c = 0
    for line in io.lines(args[1]) do
        local id, j = line:match("^(%S+) (%S+)")
        c = c + 1
        local ch = channels[(c - 1) % #channels + 1]
        reqs[#reqs + 1] = wrk.format("GET", "/e", { ["X-Channel"] = ch,
            ["X-Citizen-Id"] = id })
        if args[2] == "mix" then
            reqs[#reqs + 1] = wrk.format("GET", "/e", { ["X-Channel"] = ch,
                ["X-Citizen-Id"] = id, ["X-Journey-ID"] = j })
        end
    end
    n = #reqs
    i = math.random(n) - 1
end

function request()
    i = i % n + 1
    return reqs[i]
end
EOT


# --- counters ----------------------------------------------------------------

# "<event commands> <CPU seconds> <used_memory>" of the Redis server: every
# command but the ones this script sends
redis_sample() {
    rcli info all | tr -d '\r' | awk -F'[:,=]' '
        /^cmdstat_/ {
            name = substr($1, 9)
            if (name !~ /^(info|ping|dbsize|del|flushall|config\|.*|client\|.*|script\|.*|subscribe|select|hello|auth)$/)
                c += $3
        }
        $1 == "used_cpu_user" || $1 == "used_cpu_sys" { cpu += $2 }
        $1 == "used_memory" { mem = $2 }
        END { printf "%d %.6f %d\n", c, cpu, mem }'
}

written() {
    metric "$(curl -fs "http://127.0.0.1:$ev_port/metrics")" \
        'civicgate_events_total{result="written"}'
}

dropped() {
    metric "$(curl -fs "http://127.0.0.1:$ev_port/metrics")" \
        'civicgate_events_total{result="dropped"}'
}

spooled() {
    metric "$(curl -fs "http://127.0.0.1:$ev_port/metrics")" \
        'civicgate_events_total{result="spooled"}'
}

# wait until the events written stop growing (the spool is drained)
drained() {
    local last now same=0
    last=$(written)
    while [ "$same" -lt 5 ]; do
        sleep 0.1
        now=$(written)
        if [ "$now" = "$last" ]; then same=$((same + 1)); else same=0; fi
        last=$now
    done
    echo "$last"
}

# run PORT MODE: wrk, then the drain; prints
# "<requests> <events> <cmd/event> <Redis µs/event> <gw µs/request> <events/s>"
run() {
    local w0 w1 r0 r1 g0 g1 t0 t1 req
    w0=$(written)
    read -r -a r0 <<< "$(redis_sample)"
    g0=$(worker_cpu "$master")
    t0=$(date +%s.%N)
    wrk -t1 -c32 -d"$DURATION"s -s "$work/mix.lua" "http://127.0.0.1:$1/e" \
        -- "$work/citizens" "$2" > "$work/wrk.out" 2>&1 \
        || { cat "$work/wrk.out" >&2; die "wrk failed"; }
    w1=$(drained)
    t1=$(date +%s.%N)
    g1=$(worker_cpu "$master")
    read -r -a r1 <<< "$(redis_sample)"
    req=$(awk '/requests in/ { print $1 }' "$work/wrk.out")
    awk -v req="$req" -v ev=$((w1 - w0)) -v c0="${r0[0]}" -v c1="${r1[0]}" \
        -v u0="${r0[1]}" -v u1="${r1[1]}" -v g0="$g0" -v g1="$g1" \
        -v t0="$t0" -v t1="$t1" 'BEGIN {
        n = ev > 0 ? ev : 1
        printf "%d %d %.2f %.2f %.2f %.0f\n", req, ev, (c1 - c0) / n,
            (u1 - u0) * 1e6 / n, (g1 - g0) / 1000 / req, ev / (t1 - t0) }'
}

# the unit: a plain XADD of the nine fields, 32 connections, unpipelined
unit() {
    local r0 r1 n=20000
    read -r -a r0 <<< "$(redis_sample)"
    redis-benchmark -p "$redis_port" -c 32 -n "$n" -q XADD cg:unit '*' \
        time 1795990426920 eid 38226a941ae62935 \
        journey XT0YB-EQPHR-21NR2-VYHAV channel web service bench \
        method GET status 200 latency_ms 1 \
        citizen bc7150dd5a07d73c2bd9c44fe847faec > /dev/null
    read -r -a r1 <<< "$(redis_sample)"
    rcli del cg:unit > /dev/null
    awk -v u0="${r0[1]}" -v u1="${r1[1]}" -v n="$n" \
        'BEGIN { printf "%.2f\n", (u1 - u0) * 1e6 / n }'
}

# fill TOTAL: journeys stored up to TOTAL (dbsize less the citizens'
# indexes), one event each, in the gateway's schema
fill() {
    local have
    have=$(rcli eval "return #redis.call('KEYS', 'cg:{j:*')" 0)
    [ "$have" -lt "$1" ] || return 0
    perl -e '
        my ($from, $to, $file) = @ARGV;
        open my $f, "<", $file or die;
        my @p = map { (split)[2] } <$f>;
        my @b32 = split //, "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
        sub cmd { my $s = "*" . @_ . "\r\n";
                  $s .= "\$" . length($_) . "\r\n$_\r\n" for @_; $s }
        my $t = time * 1000;
        for my $i ($from .. $to - 1) {
            my $j = join "-", map { join "", map { $b32[rand 32] } 1 .. 5 }
                1 .. 4;
            my $p = $p[$i % @p];
            my $ms = int($t - rand 86400000);
            my $e = "$ms-0 $ms web bench 200 GET 1 "
                . sprintf("%016x", $i) . " $p";
            print cmd("RPUSH", "cg:{j:$j}:timeline", $e),
                cmd("EXPIRE", "cg:{j:$j}:timeline", 2592000);
            # the gateway keeps the newest 64 of a citizen
            print cmd("ZADD", "cg:{c:$p}:journeys", $ms, $j)
                if $i >= $to - 64 * @p;
        }' "$have" "$1" "$work/citizens" | rcli --pipe > /dev/null
}


# a second of the mix before measuring: Redis's key tables grow (and
# rehash, once past a power of two) while the run adds new journeys; the
# measured run then starts with them grown
warm() {
    wrk -t1 -c32 -d1s -s "$work/mix.lua" "http://127.0.0.1:$ev_port/e" \
        -- "$work/citizens" mix > /dev/null 2>&1 || die "wrk failed"
    drained > /dev/null
}


# --- runs ----------------------------------------------------------------------

echo "events-cost: $CITIZENS citizens, wrk -t1 -c32 -d${DURATION}s per run," \
     "one gateway worker, $(nproc) CPUs"

# warm-up (scripts loaded, connections open)
run "$ev_port" mix > /dev/null

read -r tq _ _ _ tgw _ <<< "$(run "$tag_port" mix)"
read -r mq me mc mr mgw mrate <<< "$(run "$ev_port" mix)"
u=$(unit)
echo "mix: $me events ($mq requests), $mc Redis commands/event," \
     "$mr µs Redis CPU/event; plain XADD unit $u µs: $(awk -v a="$mr" \
     -v b="$u" 'BEGIN { printf "%.2f", a / b }')x"
echo "gateway: tagging $tgw µs/request ($tq requests), with events" \
     "$mgw µs/request: +$(awk -v a="$mgw" -v b="$tgw" \
     'BEGIN { printf "%.2f", a - b }') µs"
echo "rate: $mrate events/s sustained (written, drain included)"

# memory per stored one-event journey: new journeys only
rcli flushall > /dev/null
read -r -a m0 <<< "$(redis_sample)"
read -r _ ne _ _ _ _ <<< "$(run "$ev_port" new)"
# shellcheck disable=SC2046  # the shards' streams, if any: one key each
rcli del cg:events $(rcli --scan --pattern 'cg:{events:*}') > /dev/null
read -r -a m1 <<< "$(redis_sample)"
echo "memory: $ne new one-event journeys, $(awk -v a="${m0[2]}" \
     -v b="${m1[2]}" -v n="$ne" 'BEGIN { printf "%.0f", (b - a) / n }')" \
     "bytes each (timeline and citizen index; event streams not counted)"

# flat as the keyspace grows
rcli flushall > /dev/null
fill "$GROWTH_SMALL"
warm
rcli config resetstat > /dev/null
read -r _ se sc sr _ _ <<< "$(run "$ev_port" mix)"
rcli info commandstats > "$work/commandstats-small.txt"
u1=$(unit)
fill "$GROWTH"
warm
rcli config resetstat > /dev/null
read -r _ le lc lr _ _ <<< "$(run "$ev_port" mix)"
rcli info commandstats > "$work/commandstats-large.txt"
u2=$(unit)
echo "growth: $GROWTH_SMALL journeys stored: $sr µs/event ($sc cmd/event," \
     "unit $u1); $GROWTH stored: $lr µs/event ($lc cmd/event, unit $u2):" \
     "$(awk -v a="$lr" -v b="$sr" 'BEGIN { printf "%.2f", a / b }')x," \
     "$(awk -v a="$lr" -v b="$sr" -v c="$u2" -v d="$u1" \
        'BEGIN { printf "%.2f", (a / c) / (b / d) }')x in units of each" \
     "run's own plain XADD"
echo "spooled: $(spooled) (all runs), dropped: $(dropped)"
