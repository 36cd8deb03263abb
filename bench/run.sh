#!/usr/bin/env bash
# civicgate benchmark: wrk on loopback against one gateway nginx that serves
# each scenario on its own port, in front of a backend nginx returning a
# small JSON body.
#
#   A   plain proxy_pass to a keepalive upstream (the baseline, ratio 1.00)
#   B   A + civicgate channel, journey ID and citizen pseudonym, passed to
#       the backend with proxy_set_header
#   C   A + limit_req keyed by citizen, burst large and nodelay: measures the
#       overhead of a shared-memory limit, rejects nothing
#   D   B + journey events to Redis
#   E   A + civicgate_limit store=local      F  the same, store=redis
#   G   A + civicgate_consent, warm cache (CONSENT_TTL=0: no cache)
#   H   F with sync=100ms (skipped, with nginx's reason, by a build that
#       does not know the parameter)
#   I   the full gateway: F's limit, G's consent and D's events together
#   J   I with H's limit (sync=100ms) instead of F's
#   L1  the Lua peer (bench/peer.lua, lua-resty-redis): the event XADDed
#       from an ngx.timer.at(0) after the response
#   L2  the Lua peer: INCR + EXPIRE fixed-window limit
#   L3  the Lua peer: HGET of the citizen's consent
#   L4  the Lua peer: L2, L3 and the event's XADD in one pipelined round trip
#
# Every request carries X-Channel and X-Citizen-Id (CITIZENS distinct
# citizens, channels in turn); every other request also carries a valid
# journey ID, so B both mints and verifies.
#
# Scenarios run interleaved in rounds (A B C, then C B A, ...) after a
# warm-up, because single runs on a shared machine swing by tens of per cent.
# Reported per scenario: median req/s, median p50 and p99 latency, the
# median of the per-round ratio to A (with its range), the gateway worker's
# CPU per request and, for Redis scenarios, Redis commands (INFO
# commandstats, the commands scripts run included) and Redis CPU per
# request; then each civicgate Redis scenario beside its peer (D-L1, F-L2,
# G-L3, I-L4, J-L4, H-C), the command mix per scenario, and the event scenarios'
# Redis CPU in units of a plain XADD of the same fields (redis-benchmark,
# 32 connections, unpipelined, measured after every round).  Every response
# must be 2xx, there must be no socket errors, and every event must reach
# Redis; the script exits non-zero on errors, never because of a ratio.
#
#   bench/run.sh keyspace   the keyspace mode instead (bench/keyspace.sh):
#                           D's Redis cost per event with Redis filled to
#                           ~10 000, then ~1 000 000 journeys
#
# Environment (defaults in brackets):
#   DURATION [5]      seconds per run        ROUNDS [5]     rounds
#   WARMUP [1]        seconds of warm-up per scenario, before round 1
#   THREADS [1]       wrk threads            CONNECTIONS [32]  wrk connections
#   CITIZENS [1000]   distinct citizen IDs
#   JOURNEYS [CITIZENS x CONTINUED / 100]  journey IDs reused: by default
#                     one per continuing citizen, as a journey is a citizen's
#   CONTINUED [50]    per cent of requests that carry one of those IDs; the
#                     others start a journey (a new ID, new keys in Redis)
#   SCENARIOS ["A B C D E F G H I J L1 L2 L3 L4"]  which, in round-1 order
#   UNIT_XADDS [20000]  XADDs per measurement of the unit
#   REDIS_TIMEOUT [500]  ms, civicgate's and the Lua peer's Redis timeout
#                     on the request path; a Redis stalled longer (a machine
#                     far overloaded) makes limits fall back and events be
#                     written again, which fails or marks the run
#   REDIS [auto]      start redis-server: auto (if a scenario needs it), 1, 0
#   KEEP [0]          1: keep the working directory (configs, logs, wrk output)
#   GATEWAY_WORKERS [1]  the gateway's worker_processes; gw us is then the
#                     sum over its workers
#   CIVICGATE_MODULE  module to load [build/ngx_http_civicgate_module.so]
#   NGINX             nginx binary [/usr/sbin/nginx]
#   LUA_MODULES       where ndk_http_module.so and ngx_http_lua_module.so
#                     are [/usr/lib/nginx/modules]
#
# Adding a scenario X: set desc[X], write conf_X (the server's contents)
# and, if it needs them:
#   http_X            prints http-level lines (zones, maps)
#   setup_X           runs once before the runs (consents granted...)
#   probe_X           prints two counters read from the gateway (over
#                     HTTP, never from Redis: it runs inside the measured
#                     window): what it did for X (journeys handled, events
#                     written...) and what went wrong (forged IDs, events
#                     dropped...); around every run the first must grow by
#                     wrk's response count (plus requests in flight when
#                     runs stop) and the second must not grow
#   stored_X          prints what reached Redis (entries added to a
#                     stream), read outside the measured window; must grow
#                     as probe_X's first counter
#   needs_redis[X]=1  starts redis-server (port in $redis_port) and reports
#                     Redis commands and CPU per request
#   lua[X]=1          loads the Lua module in the gateway
#   optional[X]=WHAT  nginx -t must accept X alone, or X is skipped
#   peer[X]=Y         reports X beside Y
#   redelivers[X]=1   X's events may be written more than once (at least
#                     once delivery): more than expected is a note
# Only one scenario runs at a time, so counters shared by the whole gateway
# still give per-run figures.

# bash is needed; `sh bench/run.sh` re-runs it under bash
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

me=bench
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

journey_knobs
SCENARIOS=${SCENARIOS:-A B C D E F G H I J L1 L2 L3 L4}
UNIT_XADDS=${UNIT_XADDS:-20000}
REDIS_TIMEOUT=${REDIS_TIMEOUT:-500}
REDIS=${REDIS:-auto}
LUA_MODULES=${LUA_MODULES:-/usr/lib/nginx/modules}
GATEWAY_WORKERS=${GATEWAY_WORKERS:-1}
mode=${1:-rounds}

whole_numbers DURATION ROUNDS WARMUP THREADS CONNECTIONS CITIZENS JOURNEYS CONTINUED \
    UNIT_XADDS REDIS_TIMEOUT GATEWAY_WORKERS
if [ "$ROUNDS" -lt 1 ] || [ "$DURATION" -lt 1 ] || [ "$GATEWAY_WORKERS" -lt 1 ]; then
    die "DURATION, ROUNDS and GATEWAY_WORKERS must be at least 1"
fi
[ -f "$module" ] || die "module not found: $module (run: make build)"
need_commands wrk curl openssl


# --- scenarios -------------------------------------------------------------

declare -A desc needs_redis optional lua peer redelivers

desc[A]="plain proxy_pass"
conf_A() {
    cat <<EOT
        location / {
            proxy_pass http://backend;
        }
EOT
}

desc[B]="A + civicgate channel, journey, citizen"
conf_B() {
    conf_journeys off
    journey_metrics
}
journey_metrics() {
    cat <<EOT

        location = /metrics {
            civicgate_metrics;
            civicgate_journey  off;
        }
EOT
}
# requests that went through journey handling, and forged IDs seen: every
# request B serves mints or reuses an ID, and the bench sends no forged one
probe_B() {
    local m
    m=$(metrics B) || return 1
    echo "$(( $(metric "$m" 'civicgate_journeys_total{result="minted"}')
             + $(metric "$m" 'civicgate_journeys_total{result="reused"}') ))" \
         "$(metric "$m" 'civicgate_journeys_total{result="forged"}')"
}

desc[C]="A + limit_req (burst, nodelay)"
http_C() {
    cat <<EOT
    limit_req_zone \$http_x_citizen_id zone=bench_citizen:10m rate=1000r/s;
EOT
}
conf_C() {
    cat <<EOT
        location / {
            limit_req   zone=bench_citizen burst=100000 nodelay;
            proxy_pass  http://backend;
        }
EOT
}

metrics_location() {
    cat <<EOT

        location = /metrics {
            civicgate_metrics;
            civicgate_journey  off;
            civicgate_events   off;
        }
EOT
}

desc[D]="B + journey events to Redis"
needs_redis[D]=1
conf_D() {
    conf_journeys on
    journey_metrics
}
http_D() {
    events_http
}
# events written, and events lost (dropped from a full spool).  Events that
# waited in the spool while Redis fell behind are written after the run;
# the wait counts in the run's duration (see measure).
probe_D() {
    probe_events D
}
stored_D() {
    events_added
}
redelivers[D]=1

# metrics SCENARIO: the gateway's metrics, read from the scenario's server
metrics() {
    curl -fs "http://127.0.0.1:${port[$1]}/metrics"
}

# civicgate's events: cg:events, and with civicgate_event_shards N > 1 the
# shards' streams cg:{events:0} .. cg:{events:N-1}
events_added() {
    local s total=0
    for s in cg:events $(redis-cli -p "$redis_port" --scan \
                         --pattern 'cg:{events:*}' 2>/dev/null); do
        total=$(( total + $(stream_added -p "$redis_port" "$s") ))
    done
    echo "$total"
}

desc[E]="A + civicgate_limit store=local"
http_E() {
    limit_zone bench_local local
}
conf_E() {
    conf_limit bench_local
    metrics_location
}
probe_E() {
    probe_limit E bench_local
}

desc[F]="A + civicgate_limit store=redis"
needs_redis[F]=1
http_F() {
    limit_zone bench_redis redis
}
conf_F() {
    conf_limit bench_redis
    metrics_location
}
probe_F() {
    probe_limit F bench_redis
}

desc[G]="A + consent (cache ttl=${CONSENT_TTL:-60s})"
needs_redis[G]=1
http_G() {
    consent_http
}
conf_G() {
    conf_consent
    cat <<EOT

        location /civicgate/admin/ {
            civicgate_admin;
        }
EOT
    metrics_location
}
# every citizen the bench sends holds the consent before the runs (G and
# I share the consent records: one grant each)
setup_G() {
    grant_consents G
}
consents_granted=0
grant_consents() {
    [ "$consents_granted" = 0 ] || return 0
    consents_granted=1
    grant_all "${port[$1]}" "$work/grants.curl"
}
probe_G() {
    probe_consent G
}

# the sync= mode of store=redis zones: local decisions, one batched Redis
# call per interval and zone.  A module without it rejects the
# configuration: the scenario is then skipped (see optional).
desc[H]="A + civicgate_limit store=redis sync=100ms"
needs_redis[H]=1
optional[H]="civicgate_limit_zone ... store=redis sync=100ms"
http_H() {
    limit_zone bench_sync redis sync=100ms
}
conf_H() {
    conf_limit bench_sync
    metrics_location
}
probe_H() {
    probe_limit H bench_sync
}

desc[I]="full: store=redis limit, consent, events"
needs_redis[I]=1
http_I() {
    http_full
}
conf_I() {
    conf_full_admin bench_full
}
# conf_full_admin ZONE: the full gateway, the admin endpoint (for the
# grants) and the metrics
conf_full_admin() {
    conf_full "$1"
    cat <<EOT

        location /civicgate/admin/ {
            civicgate_admin;
            civicgate_journey  off;
            civicgate_events   off;
        }
EOT
    metrics_location
}
setup_I() {
    grant_consents I
}
probe_I() {
    probe_full I
}
stored_I() {
    events_added
}
redelivers[I]=1

# I with H's limit: decided from shared memory, reconciled every 100 ms
desc[J]="full, the limit with sync=100ms"
needs_redis[J]=1
optional[J]="civicgate_limit_zone ... store=redis sync=100ms"
http_J() {
    http_full bench_full_sync redis sync=100ms
}
conf_J() {
    conf_full_admin bench_full_sync
}
setup_J() {
    grant_consents J
}
probe_J() {
    probe_full J bench_full_sync
}
stored_J() {
    events_added
}
redelivers[J]=1


# The Lua peer (bench/peer.lua, loaded in the same gateway): what a user
# would build on Debian's nginx with libnginx-mod-http-lua and
# lua-resty-redis for the same jobs
desc[L1]="Lua peer: XADD from a timer after response"
needs_redis[L1]=1
lua[L1]=1
conf_L1() {
    cat <<EOT
        location / {
            proxy_pass  http://backend;
            log_by_lua_block { require("peer").event("peer:events") }
        }
EOT
    peer_locations
}
probe_L1() {
    probe_peer "L1 written" "L1 failed"
}
stored_L1() {
    stream_added -p "$redis_port" peer:events
}

desc[L2]="Lua peer: INCR+EXPIRE fixed-window limit"
needs_redis[L2]=1
lua[L2]=1
conf_L2() {
    cat <<EOT
        location / {
            access_by_lua_block { require("peer").limit() }
            proxy_pass  http://backend;
        }
EOT
    peer_locations
}
probe_L2() {
    probe_peer "L2 passed" "L2 failed" "L2 rejected"
}

desc[L3]="Lua peer: consent HGET per request"
needs_redis[L3]=1
lua[L3]=1
conf_L3() {
    cat <<EOT
        location / {
            access_by_lua_block { require("peer").consent() }
            proxy_pass  http://backend;
        }
EOT
    peer_locations
}
setup_L3() {
    grant_peer_consents L3
}
probe_L3() {
    probe_peer "L3 granted" "L3 failed" "L3 denied"
}

desc[L4]="Lua peer: limit+consent+XADD, one pipeline"
needs_redis[L4]=1
lua[L4]=1
conf_L4() {
    cat <<EOT
        location / {
            access_by_lua_block { require("peer").full("peer:events:full") }
            proxy_pass  http://backend;
        }
EOT
    peer_locations
}
setup_L4() {
    grant_peer_consents L4
}
probe_L4() {
    probe_peer "L4 written" "L4 failed" "L4 rejected" "L4 denied"
}
stored_L4() {
    stream_added -p "$redis_port" peer:events:full
}

lua_http_done=0
lua_http() {
    [ "$lua_http_done" = 0 ] || return 0
    lua_http_done=1
    cat <<EOT
    lua_package_path        "$work/?.lua;;";
    lua_shared_dict         peer 1m;
    # L1's events wait in timers while Redis is behind: the defaults (1024
    # pending, 256 running) would drop them (each running timer takes one
    # of worker_connections, raised for the Lua scenarios)
    lua_max_pending_timers  65536;
    lua_max_running_timers  65536;
    init_by_lua_block {
        require("peer").configure{ port = $redis_port, secret = "bench-peer",
                                   timeout = $REDIS_TIMEOUT }
    }
EOT
}
for s in L1 L2 L3 L4; do
    eval "http_$s() { lua_http; }"
done

peer_locations() {
    cat <<EOT

        location = /peer/metrics {
            content_by_lua_block { require("peer").metrics() }
        }

        location = /peer/admin/grant {
            content_by_lua_block { require("peer").grant() }
        }
EOT
}

# probe_peer DONE FAILED...: the peer's counters (bench/peer.lua) as a
# probe: DONE, and the sum of the FAILED ones
probe_peer() {
    local m done=$1 k fail=0
    shift
    m=$(curl -fs "http://127.0.0.1:${port[${done%% *}]}/peer/metrics") || return 1
    for k in "$@"; do
        fail=$((fail + $(peer_counter "$m" "$k")))
    done
    echo "$(peer_counter "$m" "$done") $fail"
}
peer_counter() {
    printf '%s\n' "$1" | awk -v k="$2" '$1 " " $2 == k { v = $3 } END { print v + 0 }'
}

# the peer's consent records, for every citizen the bench sends
peer_granted=0
grant_peer_consents() {
    local c sep=""
    [ "$peer_granted" = 0 ] || return 0
    peer_granted=1
    for c in warm $(seq -f '3171%012g' 1 "$CITIZENS"); do
        printf '%surl = "http://127.0.0.1:%s/peer/admin/grant"\n' "$sep" "${port[$1]}"
        printf 'header = "X-Citizen-Id: %s"\noutput = "/dev/null"\n' "$c"
        sep=$'next\n'
    done > "$work/peer-grants.curl"
    curl -fsS --parallel --parallel-max 8 --no-progress-meter -K "$work/peer-grants.curl" \
        || die "could not grant the peer's consents"
}

# each civicgate Redis scenario beside the job done another way: the Lua
# peer, or nginx's limit_req for the sync= limit
peer[D]=L1
peer[F]=L2
peer[G]=L3
peer[I]=L4
peer[J]=L4
peer[H]=C

case "$mode" in
    rounds) ;;
    # the keyspace mode drives D only; B mints the continuing journeys' IDs
    keyspace)
        SCENARIOS="B D"
        # shellcheck source=bench/keyspace.sh
        . "$top/bench/keyspace.sh"
        ;;
    *) die "unknown mode '$mode' (usage: bench/run.sh [rounds|keyspace])" ;;
esac
for s in $SCENARIOS; do
    [ -n "${desc[$s]:-}" ] || die "unknown scenario '$s' (known: ${!desc[*]})"
done
if [ "$mode" = rounds ]; then
    case " $SCENARIOS " in *" A "*) ;; *) die "SCENARIOS must include A, the baseline" ;; esac
fi
read -r -a order <<< "$SCENARIOS"


# --- working directory -----------------------------------------------------

work_dir civicgate-bench


# --- Redis, when a scenario needs it ---------------------------------------

redis_port=""
if [ "$REDIS" = auto ]; then
    REDIS=0
    for s in $SCENARIOS; do
        [ "${needs_redis[$s]:-0}" = 1 ] && REDIS=1
    done
fi
if [ "$REDIS" = 1 ]; then
    need_commands redis-server redis-cli redis-benchmark
    redis_port=$(free_port 16379)
    start_redis "$redis_port" "$work"
fi



# --- configurations --------------------------------------------------------

backend_port=$(free_port 18100 "$redis_port")
declare -A port
p=18200
for s in $SCENARIOS; do
    port[$s]=$(free_port $p "$redis_port $backend_port ${port[*]}")
    p=$((port[$s] + 1))
done

write_keys

copy_module "$module" "$work"
cp "$top/bench/peer.lua" "$work/peer.lua"

backend_conf "$backend_port" "${BACKEND_WORKERS:-1}" > "$work/backend.conf"

# gateway_conf SCENARIO...: the gateway's configuration serving those
# scenarios; the Lua module is loaded only for the Lua peer's
gateway_conf() {
    local s connections=4096
    for s in "$@"; do
        if [ "${lua[$s]:-0}" = 1 ]; then
            echo "load_module $LUA_MODULES/ndk_http_module.so;"
            echo "load_module $LUA_MODULES/ngx_http_lua_module.so;"
            connections=70000
            break
        fi
    done
    gateway_head gateway "$connections" "$backend_port" \
        "$([ -z "$redis_port" ] || echo "    civicgate_redis  redis://127.0.0.1:$redis_port timeout=${REDIS_TIMEOUT}ms;")"
    scenarios_http "$@"
    for s in "$@"; do
        scenario_server "$s" "${port[$s]}"
    done
    echo "}"
}

# a scenario that needs what this build may not have yet is skipped, with
# nginx's reason, when nginx -t rejects it alone
kept=()
for s in "${order[@]}"; do
    if [ -n "${optional[$s]:-}" ]; then
        (gateway_conf "$s") > "$work/check-$s.conf"
        if ! nginx_test "$work" "check-$s" 2> "$work/logs/check-$s.txt"; then
            echo "bench: skipping $s: this build rejects ${optional[$s]}:"
            sed 's/^/bench:   /' "$work/logs/check-$s.txt"
            continue
        fi
    fi
    kept+=("$s")
done
order=("${kept[@]}")

gateway_conf "${order[@]}" > "$work/gateway.conf"

for c in backend gateway; do
    nginx_test "$work" "$c" \
        || die "nginx -t failed for the $c configuration ($work/$c.conf)"
done

start_nginx "$work" backend
backend_master=$!
start_nginx "$work" gateway
gateway_master=$!

for i in $(seq 100); do
    ok=1
    curl -fs -o /dev/null "http://127.0.0.1:$backend_port/" || ok=0
    for s in "${order[@]}"; do
        code=$(curl -s -o /dev/null -w '%{http_code}' -H 'X-Citizen-Id: warm' \
                   "http://127.0.0.1:${port[$s]}/api/bench") || true
        [ "${code:-000}" != 000 ] || ok=0
    done
    [ "$ok" = 1 ] && break
    [ "$i" -lt 100 ] || die "nginx did not start (see $work/logs)"
    sleep 0.1
done


for s in "${order[@]}"; do
    if declare -F "setup_$s" >/dev/null; then
        "setup_$s"
    fi
done


# --- requests --------------------------------------------------------------

# journey IDs to reuse, minted by the gateway itself with the bench key
: > "$work/journeys"
if [ "$JOURNEYS" -gt 0 ]; then
    [ -n "${port[B]:-}" ] || die "JOURNEYS > 0 needs scenario B to mint IDs; set JOURNEYS=0"
    mint_journeys "http://127.0.0.1:${port[B]}/api/bench"
fi

bench_lua

# the keyspace mode's runs stop after a number of responses (one thread)
{
    cat "$work/bench.lua"
    cat <<'EOT'

local responses = 0

function response(status, headers, body)
    responses = responses + 1
    if stop_after > 0 and responses >= stop_after then
        wrk.thread:stop()
    end
end
EOT
} > "$work/bench-count.lua"


# --- runs ------------------------------------------------------------------

errors=0
wrk_script=$work/bench.lua
stop_after=0
share=$CONTINUED

# run_wrk SCENARIO SECONDS OUTPUT
run_wrk() {
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2"s --latency -s "$wrk_script" \
        "http://127.0.0.1:${port[$1]}/api/bench" -- "$CITIZENS" "$work/journeys" \
        "$share" "$stop_after" \
        > "$3" 2>&1 \
        || { echo "bench: wrk failed for $1:" >&2; cat "$3" >&2; return 1; }
}

# CPU nanoseconds used by this shell's children that have ended (bash's
# "times", run in this shell, not in a subshell that has no children):
# around a run, wrk's own
children_cpu() {
    times > "$work/times"
    awk 'NR == 2 {
        n = 0
        for (i = 1; i <= 2; i++) {
            split($i, t, /[ms]/)
            n += (t[1] * 60 + t[2]) * 1e9
        }
        printf "%.0f\n", n
    }' "$work/times" > "$work/times.ns"
}

# one line per run: round scenario requests rps p50 p99 non2xx sockerr cmds
# redis_us gw_us; per Redis run, its command mix in $work/mix
results=$work/results
: > "$results"
: > "$work/mix"
: > "$work/unit"

# measure ROUND SCENARIO SECONDS
measure() {
    local round=$1 s=$2 out=$work/wrk/$2-$1.txt
    local p0="" p1="" st0="" st1="" line req rps p50 p99 bad sock
    local cmds="-" cpu="-" mix="" g0 g1 gw drain=0
    local b0 b1 w0 w1 secs
    local probe="" stored=""
    declare -F "probe_$s" >/dev/null && probe=probe_$s
    declare -F "stored_$s" >/dev/null && stored=stored_$s
    [ -z "$probe" ] || p0=$("$probe") || die "$probe failed"
    [ -z "$stored" ] || st0=$("$stored")
    [ -z "$redis_port" ] || redis_sample "$work/redis0" "$redis_port"
    # the gateway worker's CPU (scheduler statistics): per request, a figure
    # far steadier than req/s on a shared machine
    g0=$(worker_cpu "$gateway_master")
    b0=$(worker_cpu "$backend_master")
    children_cpu
    read -r w0 < "$work/times.ns"
    run_wrk "$s" "$3" "$out"
    children_cpu
    read -r w1 < "$work/times.ns"
    line=$(parse_wrk "$out") || die "cannot parse wrk output: $out"
    read -r req rps p50 p99 bad sock <<< "$line"
    # work the gateway still owes (events waiting in its spool, timers
    # pending) belongs to this run: wait for it, and count the wait in the
    # run's duration (wrk's own is requests / rate)
    if [ -n "$probe" ]; then
        drain=$(drain_wait "${p0%% *}" "$req" "${drain_limit:-30000}" "$probe")
        rps=$(drained_rps "$req" "$rps" "$drain")
    fi
    g1=$(worker_cpu "$gateway_master")
    b1=$(worker_cpu "$backend_master")
    [ -z "$redis_port" ] || redis_sample "$work/redis1" "$redis_port"
    [ -z "$stored" ] || st1=$("$stored")
    [ -z "$probe" ] || p1=$("$probe") || die "$probe failed"
    [ -z "$probe" ] || check_probe "$round" "$s" "$probe" "$req" "$p0" "$p1"
    # nothing lost: every event of the run is in Redis
    [ -z "$stored" ] \
        || check_count "$round" "$s" "events that reached Redis" "$req" "$st0" "$st1"
    if [ -n "$redis_port" ]; then
        read -r cmds cpu _ _ mix < <(redis_delta "$work/redis0" "$work/redis1" "$req")
    fi
    check_wrk "$round" "$s" "$bad" "$sock" "$out"
    [ "$round" = warmup ] && return 0
    gw=$(us_per "$g0" "$g1" "$req")
    # the run's wall time, its wait for the gateway's work included
    secs=$(awk -v r="$req" -v x="$rps" 'BEGIN { printf "%.6f", r / (x > 0 ? x : 1) }')
    echo "$round $s $req $rps $p50 $p99 $bad $sock $cmds $cpu $gw" \
         "$(us_per "$b0" "$b1" "$req") $(us_per "$w0" "$w1" "$req") $secs" \
         >> "$results"
    [ -z "$redis_port" ] || echo "$round $s $mix" >> "$work/mix"
    # a run stopped after a number of responses has no meaningful rate
    rps="$rps req/s"
    [ "$stop_after" -eq 0 ] || rps="$req responses"
    printf '  round %-2s %-2s %15s  p50 %7s ms  p99 %7s ms%s\n' \
        "$round" "$s" "$rps" "$p50" "$p99" \
        "$([ "$drain" -gt 0 ] && echo "  (+${drain} ms until its work was done)")"
}

# the unit of event cost: a plain XADD of the same nine fields as an
# event, unpipelined from 32 connections (as the Lua peer sends them; one
# connection would add Redis's wake-ups to every command)
unit_fields=(time 1795990426920 eid 38226a941ae62935
             journey XT0YB-EQPHR-21NR2-VYHAV channel web service bench
             method GET status 200 latency_ms 1
             citizen bc7150dd5a07d73c2bd9c44fe847faec)

# measure_unit ROUND: Redis CPU per XADD, with its commands (a check)
measure_unit() {
    local out=$work/wrk/unit-$1.txt n cmds cpu
    redis-cli -p "$redis_port" del cg:unit > /dev/null
    redis_sample "$work/unit0" "$redis_port"
    redis-benchmark -h 127.0.0.1 -p "$redis_port" -c 32 -P 1 -n "$UNIT_XADDS" -q \
        XADD cg:unit '*' "${unit_fields[@]}" > "$out" 2>&1 \
        || die "redis-benchmark failed ($out)"
    redis_sample "$work/unit1" "$redis_port"
    n=$(redis-cli -p "$redis_port" xlen cg:unit)
    redis-cli -p "$redis_port" del cg:unit > /dev/null
    if [ "$n" != "$UNIT_XADDS" ]; then
        echo "bench: unit round $1: $n of $UNIT_XADDS XADDs in Redis ($out)" >&2
        errors=$((errors + 1))
    fi
    read -r cmds cpu _ _ _ < <(redis_delta "$work/unit0" "$work/unit1" "$UNIT_XADDS")
    # the floor: the same XADDs pipelined 32 at a time on one connection,
    # as a gateway worker sends a batch
    redis_sample "$work/unit0" "$redis_port"
    redis-benchmark -h 127.0.0.1 -p "$redis_port" -c 1 -P 32 -n "$UNIT_XADDS" -q \
        XADD cg:unit '*' "${unit_fields[@]}" >> "$out" 2>&1 \
        || die "redis-benchmark failed ($out)"
    redis_sample "$work/unit1" "$redis_port"
    redis-cli -p "$redis_port" del cg:unit > /dev/null
    read -r _ piped _ _ _ < <(redis_delta "$work/unit0" "$work/unit1" "$UNIT_XADDS")
    plain_writes "$1" > "$work/plain.resp"
    redis_sample "$work/unit0" "$redis_port"
    redis-cli -p "$redis_port" --pipe < "$work/plain.resp" > "$work/plain.out" 2>&1 \
        || die "redis-cli --pipe failed ($work/plain.out)"
    redis_sample "$work/unit1" "$redis_port"
    if ! grep -q '^errors: 0,' "$work/plain.out"; then
        echo "bench: unit round $1: the plain writes failed ($work/plain.out)" >&2
        errors=$((errors + 1))
    fi
    redis-cli -p "$redis_port" -n 9 flushdb > /dev/null
    read -r _ plain _ _ _ < <(redis_delta "$work/unit0" "$work/unit1" "$UNIT_XADDS")
    [ "$1" = warmup ] || echo "$1 $cpu $cmds $piped $plain" >> "$work/unit"
}

# plain_writes ROUND: in RESP, for UNIT_XADDS events in D's mix (half of
# them new journeys, the others one of CITIZENS journeys), what the batch
# script writes, as plain commands in database 9: the stream entry, the
# timeline step, for a new journey the timeline's expiry and the
# citizen's index entry
plain_writes() {
    awk -v n="$UNIT_XADDS" -v round="$1" -v citizens="$CITIZENS" '
        function cmd(a, k,   i, out) {
            out = "*" k "\r\n"
            for (i = 1; i <= k; i++)
                out = out "$" length(a[i]) "\r\n" a[i] "\r\n"
            printf "%s", out
        }
        BEGIN {
            a[1] = "SELECT"; a[2] = "9"; cmd(a, 2)
            for (i = 1; i <= n; i++) {
                c = sprintf("%032x", i % citizens)
                j = (i % 2) ? sprintf("N%s-%08d", round, i) : sprintf("C%08d", i % citizens)
                t = 1795990426920 + i
                split("XADD cg:unit MAXLEN ~ 10000 * time " t " eid 38226a941ae62935 journey " j \
                      " channel web service bench method GET status 200 latency_ms 1 citizen " c, a, " ")
                cmd(a, 24)
                a[1] = "RPUSH"; a[2] = "cg:unit:t:" j
                a[3] = t "-0 " t " web bench 200 GET 1 38226a941ae62935 " c
                cmd(a, 3)
                if (i % 2) {
                    a[1] = "EXPIRE"; a[3] = "86400"; cmd(a, 3)
                    a[1] = "ZADD"; a[2] = "cg:unit:c:" c; a[3] = "NX"; a[4] = t; a[5] = j
                    cmd(a, 5)
                }
            }
        }'
}

# the unit is measured when a scenario writes events
event_scenarios=""
for s in "${order[@]}"; do
    case "$s" in D|I|J|L1|L4) event_scenarios="$event_scenarios $s" ;; esac
done

# median of the unit's rounds, Redis CPU microseconds per XADD
unit_median() {
    awk "$awk_stats"'{ l = l " " $2 } END { if (l != "") printf "%.3f", median(l) }' \
        "$work/unit"
}

# the same for the pipelined XADDs (column 4) or the plain writes (5)
unit_column_median() {
    awk -v col="$1" "$awk_stats"'{ l = l " " $col } END { if (l != "") printf "%.3f", median(l) }' \
        "$work/unit"
}

# the work of the requests before the runs (the start-up checks, the
# setups) must be done before the first run counts: every probe's counters
# (and what reached Redis) unchanged for half a second, within 30 s
settle() {
    local s a b i
    for s in "${order[@]}"; do
        declare -F "probe_$s" >/dev/null || continue
        a=""
        for i in $(seq 60); do
            b="$("probe_$s") $(! declare -F "stored_$s" >/dev/null || "stored_$s")"
            [ "$a" = "$b" ] && break
            a=$b
            sleep 0.5
        done
    done
}
settle

echo "bench: wrk -t$THREADS -c$CONNECTIONS, $CITIZENS citizens," \
     "$CONTINUED% continuing a journey, gateway worker_processes $GATEWAY_WORKERS"
for s in "${order[@]}"; do
    echo "  $s  port ${port[$s]}  ${desc[$s]}"
done

if [ "$mode" = keyspace ]; then
    keyspace_runs
    keyspace_report
    fail_on_errors
    exit 0
fi

echo "bench: ${DURATION}s runs, $ROUNDS rounds"
if [ "$WARMUP" -gt 0 ]; then
    for s in "${order[@]}"; do
        measure warmup "$s" "$WARMUP"
    done
    [ -z "$event_scenarios" ] || measure_unit warmup
fi

for ((r = 1; r <= ROUNDS; r++)); do
    for s in $(round_order "$r" "${order[@]}"); do
        measure "$r" "$s" "$DURATION"
    done
    [ -z "$event_scenarios" ] || measure_unit "$r"
done


# --- report ----------------------------------------------------------------

echo
{
    for s in "${order[@]}"; do
        echo "desc $s ${desc[$s]}"
        [ -z "${peer[$s]:-}" ] || echo "peer $s ${peer[$s]}"
        [ "${needs_redis[$s]:-0}" = 0 ] || echo "redis $s"
    done
    cat "$results"
} | awk -v order="${order[*]}" -v redis="${redis_port:+1}" \
        -v ncpu="$(nproc)" "$awk_stats"'
    $1 == "desc" { d = $3; for (i = 4; i <= NF; i++) d = d " " $i; desc[$2] = d; next }
    $1 == "peer" { peer[$2] = $3; next }
    $1 == "redis" { usesredis[$2] = 1; next }
    {
        r = $1; s = $2
        rps[s] = rps[s] " " $4; p50[s] = p50[s] " " $5; p99[s] = p99[s] " " $6
        bad[s] += $7 + $8; v[r, s] = $4; g[r, s] = $11; gw[s] = gw[s] " " $11
        be[s] = be[s] " " $12; wk[s] = wk[s] " " $13
        budget[s] = budget[s] " " (ncpu * 1e6 / ($4 > 0 ? $4 : 1))
        if (redis && $9 != "-" && (s in usesredis)) {
            cmd[s] = cmd[s] " " $9; cpu[s] = cpu[s] " " $10
            c[r, s] = $9; u[r, s] = $10
        }
        rounds[r] = 1; seen[s] = 1
    }
    # paired per-round ratios of table t between scenarios a and b
    function paired(t, a, b,    r, l) {
        l = ""
        for (r in rounds) {
            if (t == "v" && (r, a) in v && v[r, b] > 0) l = l " " v[r, a] / v[r, b]
            if (t == "g" && (r, a) in g && g[r, b] > 0) l = l " " g[r, a] / g[r, b]
            if (t == "c" && (r, a) in c && c[r, b] > 0) l = l " " c[r, a] / c[r, b]
            if (t == "u" && (r, a) in u && u[r, b] > 0) l = l " " u[r, a] / u[r, b]
        }
        return l
    }
    END {
        n = split(order, sc, " ")
        printf "%-2s %-42s %9s %8s %8s %6s %11s %8s %7s %6s", "", "scenario",
               "req/s", "p50 ms", "p99 ms", "ratio", "range", "non-2xx",
               "gw us", "cpu"
        if (redis) printf " %8s %9s", "cmd/req", "redis us"
        printf "\n"
        for (k = 1; k <= n; k++) {
            s = sc[k]; ratios = paired("v", s, "A"); cratios = paired("g", "A", s)
            printf "%-2s %-42s %9.0f %8.3f %8.3f %6.2f %11s %8d %7.2f %6.2f", s,
                   substr(desc[s], 1, 42), median(rps[s]), median(p50[s]),
                   median(p99[s]), median(ratios), minmax(ratios), bad[s],
                   median(gw[s]), median(cratios)
            if (redis && cmd[s] != "")
                printf " %8.3f %9.3f", median(cmd[s]), median(cpu[s])
            printf "\n"
        }
        print ""
        print "req/s, p50, p99: medians over rounds; ratio: median of the per-round"
        print "req/s ratio to A in the same round, range: its min-max."
        print "gw us: the gateway worker'"'"'s CPU microseconds per request; cpu: the"
        print "median per-round ratio of A'"'"'s gw us to the scenario'"'"'s (the req/s"
        print "ratio the gateway would reach were it alone on its CPU)."
        if (redis) {
            print "cmd/req: Redis commands per request (INFO commandstats, scripts"
            print "included); redis us: Redis CPU microseconds per request."
        }
        print ""
        print "Where each request'"'"'s CPU goes, microseconds (medians over rounds):"
        printf "%-2s %8s %8s %8s %8s %8s %9s %8s\n", "", "gateway", "backend",
               "redis", "wrk", "sum", "machine", "other"
        for (k = 1; k <= n; k++) {
            s = sc[k]
            rr = (redis && cpu[s] != "") ? median(cpu[s]) : 0
            sum = median(gw[s]) + median(be[s]) + rr + median(wk[s])
            printf "%-2s %8.2f %8.2f %8.2f %8.2f %8.2f %9.2f %8.2f\n", s,
                   median(gw[s]), median(be[s]), rr, median(wk[s]), sum,
                   median(budget[s]), median(budget[s]) - sum
        }
        print "machine: the CPU time the machine has per request at the run'"'"'s rate"
        print "(" ncpu " cores); other: what the four leave of it, idle time and"
        print "everything else on the machine (the kernel'"'"'s loopback work is"
        print "counted in the process it runs for)."
        header = 0
        for (k = 1; k <= n; k++) {
            s = sc[k]; p = peer[s]
            if (p == "" || !(p in seen)) continue
            if (!header) {
                print ""
                print "Beside the same job done another way (per-round paired ratios, medians):"
                printf "%-2s %-4s %8s %11s %8s %10s %8s\n", "", "vs", "req/s x",
                       "range", "gw us x", "redis us x", "cmd x"
                header = 1
            }
            printf "%-2s %-4s %8.2f %11s %8.2f", s, p, median(paired("v", s, p)),
                   minmax(paired("v", s, p)), median(paired("g", s, p))
            l = paired("u", s, p)
            if (l != "") printf " %10.2f %8.2f", median(l), median(paired("c", s, p))
            else printf " %10s %8s", "-", "-"
            printf "\n"
        }
        if (header) {
            print "req/s x: the scenario'"'"'s req/s over its peer'"'"'s (above 1: faster);"
            print "gw us x, redis us x, cmd x: its cost over the peer'"'"'s (below 1: cheaper)."
        }
    }'

if [ -n "$redis_port" ]; then
    echo
    echo "Redis commands per request, by command: calls, and Redis's time in"
    echo "them in us (a script's includes the commands it runs); medians over"
    echo "rounds:"
    awk "$awk_stats"'
        {
            s = $2; if (!(s in seen)) { seen[s] = 1; ord[++n] = s }
            for (i = 3; i <= NF; i++) {
                split($i, kv, "="); split(kv[2], cu, "/")
                k = s SUBSEP kv[1]
                if (!(k in calls)) names[s] = names[s] " " kv[1]
                calls[k] = calls[k] " " cu[1]; usec[k] = usec[k] " " cu[2]
            }
        }
        END {
            for (j = 1; j <= n; j++) {
                s = ord[j]; line = ""
                m = split(names[s], nm, " ")
                # the most frequent first
                for (i = 2; i <= m; i++)
                    for (l = i; l > 1 && median(calls[s SUBSEP nm[l - 1]]) \
                                          < median(calls[s SUBSEP nm[l]]); l--) {
                        t = nm[l]; nm[l] = nm[l - 1]; nm[l - 1] = t
                    }
                for (i = 1; i <= m; i++) {
                    k = s SUBSEP nm[i]
                    if (median(calls[k]) < 0.005) continue
                    line = line sprintf("  %s %.2f (%.1f us)", nm[i],
                                        median(calls[k]), median(usec[k]))
                }
                if (line != "") printf "%-2s%s\n", s, line
            }
        }' "$work/mix"
fi

if [ -n "$event_scenarios" ]; then
    unit=$(unit_median)
    piped=$(unit_column_median 4)
    plain=$(unit_column_median 5)
    echo
    echo "Events against the unit, a plain XADD of the same nine fields from 32"
    echo "connections, unpipelined: $unit us of Redis CPU per XADD (median of" \
         "$(wc -l < "$work/unit") runs"
    echo "of $UNIT_XADDS); pipelined 32 at a time on one connection, the floor"
    echo "of any event written to Redis: $piped us.  Per request, each one"
    echo "event (I, J and L4 with their limit and consent):"
    for s in $event_scenarios; do
        awk -v s="$s" -v unit="$unit" -v piped="$piped" "$awk_stats"'
            $2 == s && $10 != "-" { c = c " " $9; u = u " " $10 }
            END {
                if (u == "") exit
                printf "  %-2s %6.2f Redis commands and %7.2f us of Redis CPU per event: %5.2f units, %5.2f floors\n",
                       s, median(c), median(u), (unit > 0 ? median(u) / unit : 0),
                       (piped > 0 ? median(u) / piped : 0)
            }' "$results"
    done
    echo "D's writes as plain commands pipelined (XADD and RPUSH; EXPIRE and ZADD"
    echo "for a new journey; no script): $plain us of Redis CPU per event."
    awk -v plain="$plain" -v ncpu="$(nproc)" "$awk_stats"'
        { m = ncpu * 1e6 / ($4 > 0 ? $4 : 1) }
        $2 == "A" { a = a " " m }
        $2 == "B" { b = b " " m }
        END {
            if (a == "" || b == "") exit
            printf "With them, and no more gateway CPU than B, D would reach at most\n"
            printf "%.2f of A: A has %.1f us of the machine per request, B %.1f.\n",
                   median(a) / (median(b) + plain), median(a), median(b)
        }' "$results"
fi

fail_on_errors
