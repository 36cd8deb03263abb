#!/usr/bin/env bash
# civicgate benchmark: wrk on loopback against one gateway nginx that serves
# each scenario on its own port, in front of a backend nginx returning a
# small JSON body.
#
#   A  plain proxy_pass to a keepalive upstream (the baseline, ratio 1.00)
#   B  A + civicgate channel, journey ID and citizen pseudonym, passed to the
#      backend with proxy_set_header
#   C  A + limit_req keyed by citizen, burst large and nodelay: measures the
#      overhead of a shared-memory limit, rejects nothing
#
# Every request carries X-Channel and X-Citizen-Id (CITIZENS distinct
# citizens, channels in turn); every other request also carries a valid
# journey ID, so B both mints and verifies.
#
# Scenarios run interleaved in rounds (A B C, then C B A, ...) after a
# warm-up, because single runs on a shared machine swing by tens of per cent.
# Reported per scenario: median req/s, median p50 and p99 latency, and the
# median of the per-round ratio to A (with its range).  Every response must
# be 2xx and there must be no socket errors; the script exits non-zero on
# errors, never because of a ratio.
#
# Environment (defaults in brackets):
#   DURATION [5]      seconds per run        ROUNDS [5]     rounds
#   WARMUP [1]        seconds of warm-up per scenario, before round 1
#   THREADS [1]       wrk threads            CONNECTIONS [32]  wrk connections
#   CITIZENS [1000]   distinct citizen IDs   JOURNEYS [100] journey IDs reused
#   CONTINUED [50]    per cent of requests that carry one of those IDs; the
#                     others start a journey (a new ID, new keys in Redis)
#   SCENARIOS ["A B C"]  which scenarios, in round-1 order
#   REDIS [auto]      start redis-server: auto (if a scenario needs it), 1, 0
#   KEEP [0]          1: keep the working directory (configs, logs, wrk output)
#   CIVICGATE_MODULE  module to load [build/ngx_http_civicgate_module.so]
#   NGINX             nginx binary [/usr/sbin/nginx]
#
# Adding a scenario X: set desc[X], write conf_X (the server's contents)
# and, if it needs them:
#   http_X            prints http-level lines (zones, maps)
#   probe_X           prints two counters read from the gateway or Redis:
#                     what it did for X (journeys handled, events written...)
#                     and what went wrong (forged IDs, events dropped...);
#                     around every run the first must grow by wrk's response
#                     count (plus requests in flight when runs stop) and the
#                     second must not grow
#   needs_redis[X]=1  starts redis-server (port in $redis_port) and reports
#                     Redis commands per request and CPU per 1000 requests
# Only one scenario runs at a time, so counters shared by the whole gateway
# still give per-run figures.

# bash is needed; `sh bench/run.sh` re-runs it under bash
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$top/scripts/lib.sh"

sh "$top/scripts/deps.sh" bench

DURATION=${DURATION:-5}
DURATION=${DURATION%s}
ROUNDS=${ROUNDS:-5}
WARMUP=${WARMUP:-1}
THREADS=${THREADS:-1}
CONNECTIONS=${CONNECTIONS:-32}
CITIZENS=${CITIZENS:-1000}
CONTINUED=${CONTINUED:-50}
JOURNEYS=${JOURNEYS:-100}
SCENARIOS=${SCENARIOS:-A B C}
REDIS=${REDIS:-auto}
KEEP=${KEEP:-0}
module=${CIVICGATE_MODULE:-$top/build/ngx_http_civicgate_module.so}
nginx=${NGINX:-/usr/sbin/nginx}

die() { echo "bench: $*" >&2; exit 1; }

whole_numbers DURATION ROUNDS WARMUP THREADS CONNECTIONS CITIZENS JOURNEYS CONTINUED
if [ "$ROUNDS" -lt 1 ] || [ "$DURATION" -lt 1 ]; then
    die "DURATION and ROUNDS must be at least 1"
fi
[ -f "$module" ] || die "module not found: $module (run: make build)"
for cmd in wrk curl openssl; do
    command -v "$cmd" >/dev/null || die "$cmd not found"
done


# --- scenarios -------------------------------------------------------------

declare -A desc needs_redis

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
    cat <<EOT
        civicgate_channel  \$http_x_channel;
        civicgate_citizen  \$http_x_citizen_id;
        civicgate_journey  on;
        civicgate_service  bench;
        civicgate_events   off;

        location / {
            proxy_set_header  Connection           "";
            proxy_set_header  X-Journey-ID         \$civicgate_journey_id;
            proxy_set_header  X-Civicgate-Channel  \$civicgate_channel;
            proxy_set_header  X-Civicgate-Citizen  \$civicgate_citizen;
            proxy_set_header  X-Civicgate-Service  \$civicgate_service;
            proxy_pass        http://backend;
        }

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
    m=$(curl -fs "http://127.0.0.1:${port[B]}/metrics") || return 1
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
    conf_B | sed 's/civicgate_events   off;/civicgate_events   on;/'
}
# a spool for every event of a run that Redis cannot take at once (about
# 460 000): wrk offers more than Redis's share of the CPU can write
http_D() {
    echo "    civicgate_event_buffer 128m;"
    echo "    civicgate_event_stream_maxlen 10000;"
}
# events written, and events lost (dropped from a full spool).  Events that
# waited in the spool while Redis fell behind are written after the run;
# the wait counts in the run's duration (see measure).
probe_D() {
    local m
    m=$(curl -fs "http://127.0.0.1:${port[D]}/metrics") || return 1
    echo "$(metric "$m" 'civicgate_events_total{result="written"}')" \
         "$(metric "$m" 'civicgate_events_total{result="dropped"}')"
}

desc[E]="A + civicgate_limit store=local"
http_E() {
    cat <<EOT
    civicgate_limit_zone \$http_x_citizen_id zone=bench_local:10m rate=1000r/s store=local;
EOT
}
conf_E() {
    cat <<EOT
        location / {
            civicgate_limit  zone=bench_local burst=100000 nodelay;
            proxy_pass       http://backend;
        }
EOT
    metrics_location
}
probe_E() {
    probe_limit E bench_local
}

desc[F]="A + civicgate_limit store=redis"
needs_redis[F]=1
http_F() {
    cat <<EOT
    civicgate_limit_zone \$http_x_citizen_id zone=bench_redis:10m rate=1000r/s store=redis;
EOT
}
conf_F() {
    cat <<EOT
        location / {
            civicgate_limit  zone=bench_redis burst=100000 nodelay;
            proxy_pass       http://backend;
        }
EOT
    metrics_location
}
probe_F() {
    probe_limit F bench_redis
}

# limited requests passed, and those rejected or decided without Redis
probe_limit() {
    local m
    m=$(curl -fs "http://127.0.0.1:${port[$1]}/metrics") || return 1
    echo "$(metric "$m" "civicgate_limit_requests_total{zone=\"$2\",result=\"passed\"}")" \
         "$(( $(metric "$m" "civicgate_limit_requests_total{zone=\"$2\",result=\"rejected\"}")
             + $(metric "$m" "civicgate_limit_fallbacks_total{zone=\"$2\",on_error=\"local\"}") ))"
}

desc[G]="A + consent (cache ttl=${CONSENT_TTL:-60s})"
needs_redis[G]=1
http_G() {
    cat <<EOT
    civicgate_consent_purposes {
        bench  "Uji"  "Benchmark";
    }
    civicgate_consent_cache  zone=bench_consent:10m ttl=${CONSENT_TTL:-60s};
EOT
}
conf_G() {
    cat <<EOT
        civicgate_citizen  \$http_x_citizen_id;

        location / {
            civicgate_consent  bench;
            proxy_pass         http://backend;
        }

        location /civicgate/admin/ {
            civicgate_admin;
        }
EOT
    metrics_location
}
# every citizen the bench sends holds the consent before the runs
setup_G() {
    local c sep=""
    for c in warm $(seq -f '3171%012g' 1 "$CITIZENS"); do
        printf '%surl = "http://127.0.0.1:%s/civicgate/admin/consents/bench"\n' \
            "$sep" "${port[G]}"
        printf 'request = "PUT"\ndata = "{\\"citizen\\":\\"%s\\"}"\n' "$c"
        printf 'output = "/dev/null"\n'
        sep=$'next\n'
    done > "$work/grants.curl"
    curl -fsS --parallel --parallel-max 8 --no-progress-meter -K "$work/grants.curl" \
        || die "could not grant the bench consents"
}
probe_G() {
    local m
    m=$(curl -fs "http://127.0.0.1:${port[G]}/metrics") || return 1
    echo "$(metric "$m" 'civicgate_consent_checks_total{purpose="bench",result="granted"}')" \
         "$(metric "$m" 'civicgate_consent_checks_total{purpose="bench",result="denied"}')"
}

for s in $SCENARIOS; do
    [ -n "${desc[$s]:-}" ] || die "unknown scenario '$s' (known: ${!desc[*]})"
done
case " $SCENARIOS " in *" A "*) ;; *) die "SCENARIOS must include A, the baseline" ;; esac


# --- working directory -----------------------------------------------------

work=$(mktemp -d "${TMPDIR:-/tmp}/civicgate-bench.XXXXXX")
pids=()

# shellcheck disable=SC2317  # called on exit
cleanup() {
    stop_all
    if [ "$KEEP" = 1 ] || [ "$1" -ne 0 ]; then
        echo "bench: kept $work"
    else
        rm -rf "$work"
    fi
}
on_exit cleanup

# workers run unprivileged when started as root: let them reach the files
chmod 0755 "$work"
mkdir -p "$work/logs" "$work/tmp" "$work/wrk"


# --- Redis, when a scenario needs it ---------------------------------------

redis_port=""
if [ "$REDIS" = auto ]; then
    REDIS=0
    for s in $SCENARIOS; do
        [ "${needs_redis[$s]:-0}" = 1 ] && REDIS=1
    done
fi
if [ "$REDIS" = 1 ]; then
    for cmd in redis-server redis-cli; do
        command -v "$cmd" >/dev/null || die "$cmd not found"
    done
    redis_port=$(free_port 16379)
    start_redis "$redis_port" "$work"
fi

# "<commands processed> <CPU seconds>" of the Redis server
redis_sample() {
    redis-cli -p "$redis_port" info all | tr -d '\r' | awk -F: '
        $1 == "total_commands_processed" { c = $2 }
        $1 == "used_cpu_user" || $1 == "used_cpu_sys" { cpu += $2 }
        END { printf "%d %.6f\n", c, cpu }'
}


# --- configurations --------------------------------------------------------

backend_port=$(free_port 18100 "$redis_port")
declare -A port
p=18200
for s in $SCENARIOS; do
    port[$s]=$(free_port $p "$redis_port $backend_port ${port[*]}")
    p=$((port[$s] + 1))
done

(
    umask 077
    echo "bench $(openssl rand -hex 32)" > "$work/keys"
)

copy_module "$module" "$work"

cat > "$work/backend.conf" <<EOT
worker_processes  ${BACKEND_WORKERS:-1};
pid               $work/backend.pid;
error_log         $work/logs/backend-error.log;
events { worker_connections 4096; }
http {
$(temp_paths "$work" backend)
    access_log  off;
    keepalive_requests  1000000;
    server {
        listen  127.0.0.1:$backend_port backlog=4096;
        location / {
            default_type  application/json;
            return 200 '{"service":"bench","status":"ok"}\n';
        }
    }
}
EOT

{
    cat <<EOT
load_module $work/ngx_http_civicgate_module.so;
worker_processes  1;
pid               $work/gateway.pid;
error_log         $work/logs/gateway-error.log;
events { worker_connections 4096; }
http {
$(temp_paths "$work" gateway)
    access_log  off;
    keepalive_requests  1000000;

    civicgate_secret_file  $work/keys;
$([ -z "$redis_port" ] || echo "    civicgate_redis  redis://127.0.0.1:$redis_port timeout=500ms;")

    upstream backend {
        server  127.0.0.1:$backend_port;
        keepalive  64;
        keepalive_requests  1000000;
    }

    proxy_http_version  1.1;
    proxy_set_header    Connection  "";
EOT
    for s in $SCENARIOS; do
        if declare -F "http_$s" >/dev/null; then
            echo "    # scenario $s"
            "http_$s"
        fi
    done
    for s in $SCENARIOS; do
        cat <<EOT

    # scenario $s: ${desc[$s]}
    server {
        listen  127.0.0.1:${port[$s]} backlog=4096;
EOT
        "conf_$s"
        echo "    }"
    done
    echo "}"
} > "$work/gateway.conf"

for c in backend gateway; do
    nginx_test "$work" "$c" \
        || die "nginx -t failed for the $c configuration ($work/$c.conf)"
done

for c in backend gateway; do
    start_nginx "$work" "$c"
done
gateway_master=$!

for i in $(seq 100); do
    ok=1
    curl -fs -o /dev/null "http://127.0.0.1:$backend_port/" || ok=0
    for s in $SCENARIOS; do
        code=$(curl -s -o /dev/null -w '%{http_code}' -H 'X-Citizen-Id: warm' \
                   "http://127.0.0.1:${port[$s]}/api/bench") || true
        [ "${code:-000}" != 000 ] || ok=0
    done
    [ "$ok" = 1 ] && break
    [ "$i" -lt 100 ] || die "nginx did not start (see $work/logs)"
    sleep 0.1
done


for s in $SCENARIOS; do
    if declare -F "setup_$s" >/dev/null; then
        "setup_$s"
    fi
done


# --- requests --------------------------------------------------------------

# journey IDs to reuse, minted by the gateway itself with the bench key
: > "$work/journeys"
if [ "$JOURNEYS" -gt 0 ]; then
    [ -n "${port[B]:-}" ] || die "JOURNEYS > 0 needs scenario B to mint IDs; set JOURNEYS=0"
    for i in $(seq "$JOURNEYS"); do
        curl -fs -o /dev/null -D - "http://127.0.0.1:${port[B]}/api/bench" \
            | tr -d '\r' \
            | awk -F': ' 'tolower($1) == "x-journey-id" { print $2 }' \
            >> "$work/journeys"
    done
    [ "$(wc -l < "$work/journeys")" -eq "$JOURNEYS" ] \
        || die "could not mint $JOURNEYS journey IDs"
fi

# wrk's Lua only picks among requests prepared once per thread
cat > "$work/bench.lua" <<'EOT'
local reqs, n, i = {}, 0, 0

function init(args)
    local citizens = tonumber(args[1]) or 1000
    local share = tonumber(args[3]) or 50
    local ids = {}
    if args[2] and args[2] ~= "" then
        for line in io.lines(args[2]) do
            if line ~= "" then ids[#ids + 1] = line end
        end
    end
    local channels = { "web", "app", "sms", "email", "phone", "social",
                       "counter" }
    for c = 1, citizens do
        local h = {
            ["X-Channel"] = channels[(c - 1) % #channels + 1],
            ["X-Citizen-Id"] = string.format("3171%012d", c),
        }
        if #ids > 0 and (c - 1) % 100 < share then
            h["X-Journey-ID"] = ids[(c - 1) % #ids + 1]
        end
        reqs[c] = wrk.format("GET", "/api/bench", h)
    end
    n = citizens
    i = math.random(n) - 1
end

function request()
    i = i % n + 1
    return reqs[i]
end
EOT


# --- runs ------------------------------------------------------------------

errors=0

# run_wrk SCENARIO SECONDS OUTPUT
run_wrk() {
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2"s --latency -s "$work/bench.lua" \
        "http://127.0.0.1:${port[$1]}/api/bench" -- "$CITIZENS" "$work/journeys" \
        "$CONTINUED" \
        > "$3" 2>&1 \
        || { echo "bench: wrk failed for $1:" >&2; cat "$3" >&2; return 1; }
}

# PROBE DONE0 REQUESTS: milliseconds until the probe's first counter has
# grown by REQUESTS (at most 30 s)
drain_wait() {
    local t0 now p done
    t0=$(date +%s%3N)
    while :; do
        p=$("$1") || return 1
        done=${p%% *}
        now=$(date +%s%3N)
        if [ $((done - $2)) -ge "$3" ] || [ $((now - t0)) -gt 30000 ]; then
            echo $((now - t0 < 100 ? 0 : now - t0))
            return 0
        fi
        sleep 0.05
    done
}

# one line per run: round scenario requests rps p50 p99 non2xx sockerr cmds
# cpu gw_us
results=$work/results
: > "$results"

# measure ROUND SCENARIO SECONDS
measure() {
    local round=$1 s=$2 out=$work/wrk/$2-$1.txt
    local r0="" r1="" p0="" p1="" line req rps p50 p99 bad sock cmds="-" cpu="-"
    local done0 fail0 done1 fail1 g0 g1 gw
    local probe=""
    declare -F "probe_$s" >/dev/null && probe=probe_$s
    [ -z "$probe" ] || p0=$("$probe") || die "$probe failed"
    [ -z "$redis_port" ] || r0=$(redis_sample)
    # the gateway worker's CPU (scheduler statistics): per request, a figure
    # far steadier than req/s on a shared machine
    g0=$(worker_cpu "$gateway_master")
    run_wrk "$s" "$3" "$out"
    line=$(parse_wrk "$out") || die "cannot parse wrk output: $out"
    read -r req rps p50 p99 bad sock <<< "$line"
    # work the gateway still owes (events waiting in its spool) belongs to
    # this run: wait for it, and count the wait in the run's duration
    drain=0
    if [ -n "$probe" ]; then
        drain=$(drain_wait "$probe" "${p0%% *}" "$req")
        rps=$(awk -v r="$req" -v d="$3" -v w="$drain" \
              'BEGIN { printf "%.0f", r / (d + w / 1000) }')
    fi
    g1=$(worker_cpu "$gateway_master")
    [ -z "$redis_port" ] || r1=$(redis_sample)
    [ -z "$probe" ] || p1=$("$probe") || die "$probe failed"
    if [ -n "$probe" ]; then
        read -r done0 fail0 <<< "$p0"
        read -r done1 fail1 <<< "$p1"
        # every response wrk counted was counted first by the gateway; on top
        # come requests in flight when a run stops, this run's or the last
        if [ $((done1 - done0)) -lt "$req" ] \
            || [ $((done1 - done0)) -gt $((req + 2 * CONNECTIONS)) ] \
            || [ "$fail1" -ne "$fail0" ]
        then
            echo "bench: $s round $round: wrk saw $req responses; the gateway" \
                 "counted $((done1 - done0)) handled, $((fail1 - fail0)) failed" >&2
            errors=$((errors + 1))
        fi
    fi
    if [ -n "$redis_port" ]; then
        # commands per request (minus the INFO of the sample itself) and
        # Redis CPU milliseconds per 1000 requests
        read -r cmds cpu < <(echo "$r0 $r1 $req" | awk '{
            n = $5 > 0 ? $5 : 1
            printf "%.3f %.3f\n", ($3 - $1 - 1) / n, ($4 - $2) * 1e6 / n }')
    fi
    if [ "$bad" -ne 0 ] || [ "$sock" -ne 0 ]; then
        echo "bench: $s round $round: $bad non-2xx responses," \
             "$sock socket errors ($out)" >&2
        errors=$((errors + 1))
    fi
    [ "$round" = warmup ] && return 0
    gw=$(us_per "$g0" "$g1" "$req")
    echo "$round $s $req $rps $p50 $p99 $bad $sock $cmds $cpu $gw" >> "$results"
    printf '  round %-2s %s  %8s req/s  p50 %7s ms  p99 %7s ms%s\n' \
        "$round" "$s" "$rps" "$p50" "$p99" \
        "$([ "$drain" -gt 0 ] && echo "  (+${drain} ms until its events were written)")"
}

read -r -a order <<< "$SCENARIOS"
echo "bench: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $ROUNDS rounds," \
     "$CITIZENS citizens, $CONTINUED% continuing a journey, gateway worker_processes 1"
for s in "${order[@]}"; do
    echo "  $s  port ${port[$s]}  ${desc[$s]}"
done

if [ "$WARMUP" -gt 0 ]; then
    for s in "${order[@]}"; do
        measure warmup "$s" "$WARMUP"
    done
fi

for ((r = 1; r <= ROUNDS; r++)); do
    for s in $(round_order "$r" "${order[@]}"); do
        measure "$r" "$s" "$DURATION"
    done
done



# --- report ----------------------------------------------------------------

echo
{
    for s in "${order[@]}"; do
        echo "desc $s ${desc[$s]}"
    done
    cat "$results"
} | awk -v order="${order[*]}" -v redis="${redis_port:+1}" "$awk_stats"'
    $1 == "desc" { d = $3; for (i = 4; i <= NF; i++) d = d " " $i; desc[$2] = d; next }
    {
        r = $1; s = $2
        rps[s] = rps[s] " " $4; p50[s] = p50[s] " " $5; p99[s] = p99[s] " " $6
        bad[s] += $7 + $8; v[r, s] = $4; g[r, s] = $11; gw[s] = gw[s] " " $11
        if (redis) { cmd[s] = cmd[s] " " $9; cpu[s] = cpu[s] " " $10 }
        rounds[r] = 1
    }
    END {
        n = split(order, sc, " ")
        printf "%-2s %-40s %9s %8s %8s %6s %11s %8s %7s %6s", "", "scenario",
               "req/s", "p50 ms", "p99 ms", "ratio", "range", "non-2xx",
               "gw us", "cpu"
        if (redis) printf " %8s %11s", "cmd/req", "redis ms/1k"
        printf "\n"
        for (k = 1; k <= n; k++) {
            s = sc[k]; ratios = ""; cratios = ""
            for (r in rounds)
                if (v[r, "A"] > 0 && (r, s) in v) {
                    ratios = ratios " " v[r, s] / v[r, "A"]
                    if (g[r, s] > 0)
                        cratios = cratios " " g[r, "A"] / g[r, s]
                }
            printf "%-2s %-40s %9.0f %8.3f %8.3f %6.2f %11s %8d %7.2f %6.2f", s,
                   substr(desc[s], 1, 40), median(rps[s]), median(p50[s]),
                   median(p99[s]), median(ratios), minmax(ratios), bad[s],
                   median(gw[s]), median(cratios)
            if (redis) printf " %8.3f %11.3f", median(cmd[s]), median(cpu[s])
            printf "\n"
        }
        print ""
        print "req/s, p50, p99: medians over rounds; ratio: median of the per-round"
        print "req/s ratio to A in the same round, range: its min-max."
        print "gw us: the gateway worker'"'"'s CPU microseconds per request; cpu: the"
        print "median per-round ratio of A'"'"'s gw us to the scenario'"'"'s (the req/s"
        print "ratio the gateway would reach were it alone on its CPU)."
    }'

if [ "$errors" -ne 0 ]; then
    echo "bench: FAILED: $errors error(s) above; the figures are not valid" >&2
    exit 1
fi
