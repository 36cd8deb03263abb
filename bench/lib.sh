# shellcheck shell=bash
# What bench/run.sh, bench/cluster.sh and bench/status.sh share; sourced,
# never run, after the script has set me (the prefix of its messages).
# Sourcing it checks the dependencies (scripts/deps.sh), sets top, the
# knobs every benchmark reads (DURATION, ROUNDS, WARMUP, THREADS,
# CONNECTIONS, KEEP, $module, $nginx) and die(); the rest are functions:
# the working directory, the scenarios' nginx fragments, the wrk script,
# Redis INFO readings and the checks around a run.  The helpers of
# scripts/lib.sh come with it.

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
KEEP=${KEEP:-0}
# shellcheck disable=SC2034  # read by the scripts
module=${CIVICGATE_MODULE:-$top/build/ngx_http_civicgate_module.so}
nginx=${NGINX:-/usr/sbin/nginx}
# nginx itself reads NGINX (sockets inherited on a binary upgrade)
unset NGINX

# shellcheck disable=SC2154  # me is set by the script
die() { echo "$me: $*" >&2; exit 1; }

# journey_knobs: the mix of the journey benchmarks (bench/run.sh,
# bench/cluster.sh): CITIZENS, CONTINUED and JOURNEYS
journey_knobs() {
    CITIZENS=${CITIZENS:-1000}
    CONTINUED=${CONTINUED:-50}
    JOURNEYS=${JOURNEYS:-$(( ${CITIZENS:-1000} * ${CONTINUED:-50} / 100 ))}
}

# need_commands COMMAND...: dies unless every one is installed
need_commands() {
    local cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null || die "$cmd not found"
    done
}


# --- working directory -----------------------------------------------------

# work_dir NAME [CLEANUP]: a new working directory $work (logs, tmp, wrk)
# named after NAME; on exit CLEANUP (remove_work by default) runs
work_dir() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    pids=()
    on_exit "${2:-remove_work}"
    # workers run unprivileged when started as root: let them reach the files
    chmod 0755 "$work"
    mkdir -p "$work/logs" "$work/tmp" "$work/wrk"
}

# remove_work STATUS: every process stopped; the directory removed, unless
# KEEP=1 or the script failed
# shellcheck disable=SC2317  # called on exit
remove_work() {
    stop_all
    if [ "$KEEP" = 1 ] || [ "$1" -ne 0 ]; then
        echo "$me: kept $work"
    else
        rm -rf "$work"
    fi
}

# write_keys: the gateways' secret file, $work/keys
write_keys() {
    (
        umask 077
        echo "bench $(openssl rand -hex 32)" > "$work/keys"
    )
}


# --- nginx configurations --------------------------------------------------

# backend_conf PORT WORKERS: the backend nginx, a small JSON body
backend_conf() {
    cat <<EOT
worker_processes  $2;
pid               $work/backend.pid;
error_log         $work/logs/backend-error.log;
events { worker_connections 4096; }
http {
$(temp_paths "$work" backend)
    access_log  off;
    keepalive_requests  1000000;
    server {
        listen  127.0.0.1:$1 backlog=4096;
        location / {
            default_type  application/json;
            return 200 '{"service":"bench","status":"ok"}\n';
        }
    }
}
EOT
}

# gateway_head NAME CONNECTIONS BACKEND_PORT REDIS_LINES: a gateway's
# configuration up to its scenarios: GATEWAY_WORKERS workers, the key,
# Redis, the backend's keepalive pool
gateway_head() {
    cat <<EOT
load_module $work/ngx_http_civicgate_module.so;
worker_processes  ${GATEWAY_WORKERS:-1};
pid               $work/$1.pid;
error_log         $work/logs/$1-error.log;
events { worker_connections $2; }
http {
$(temp_paths "$work" "$1")
    access_log  off;
    keepalive_requests  1000000;

    civicgate_secret_file  $work/keys;
$4

    upstream backend {
        server  127.0.0.1:$3;
        keepalive  64;
        keepalive_requests  1000000;
    }

    proxy_http_version  1.1;
    proxy_set_header    Connection  "";
EOT
}

# scenarios_http SCENARIO...: the http-level lines of those that have them
scenarios_http() {
    local s
    for s in "$@"; do
        if declare -F "http_$s" >/dev/null; then
            echo "    # scenario $s"
            "http_$s"
        fi
    done
}

# scenario_server SCENARIO PORT: the scenario's server (desc, conf_SCENARIO)
# shellcheck disable=SC2154  # desc is the script's
scenario_server() {
    cat <<EOT

    # scenario $1: ${desc[$1]}
    server {
        listen  127.0.0.1:$2 backlog=4096;
EOT
    "conf_$1"
    echo "    }"
}

# The scenarios' fragments, which both benchmarks serve: each script adds
# its own locations (metrics, admin) where it needs them.

# http-level lines of the event scenarios, once per configuration: a spool
# for every event of a run that Redis cannot take at once (about 460 000):
# wrk offers more than Redis's share of the CPU can write
events_http_done=0
events_http() {
    [ "$events_http_done" = 0 ] || return 0
    events_http_done=1
    echo "    civicgate_event_buffer 128m;"
    echo "    civicgate_event_stream_maxlen 10000;"
}

# consent_http: the purpose and the consent cache (CONSENT_TTL), once per
# configuration
consent_http_done=0
consent_http() {
    [ "$consent_http_done" = 0 ] || return 0
    consent_http_done=1
    cat <<EOT
    civicgate_consent_purposes {
        bench  "Uji"  "Benchmark";
    }
    civicgate_consent_cache  zone=bench_consent:10m ttl=${CONSENT_TTL:-60s};
EOT
}

# limit_zone ZONE STORE...: a civicgate_limit_zone keyed by citizen
limit_zone() {
    local zone=$1
    shift
    cat <<EOT
    civicgate_limit_zone \$http_x_citizen_id zone=$zone:10m rate=1000r/s store=$*;
EOT
}

# conf_limit ZONE: the zone's limit, burst large and nodelay (rejects
# nothing), in front of the backend
conf_limit() {
    cat <<EOT
        location / {
            civicgate_limit  zone=$1 burst=100000 nodelay;
            proxy_pass       http://backend;
        }
EOT
}

# tagging EVENTS: channel, citizen, journey and service, events on or off
tagging() {
    cat <<EOT
        civicgate_channel  \$http_x_channel;
        civicgate_citizen  \$http_x_citizen_id;
        civicgate_journey  on;
        civicgate_service  bench;
        civicgate_events   $1;

EOT
}

# pass_tags WIDTH: the tags passed to the backend, then proxy_pass; the
# directives' names padded to WIDTH
pass_tags() {
    local h
    # shellcheck disable=SC2016  # nginx variables
    for h in 'Connection           ""' \
             'X-Journey-ID         $civicgate_journey_id' \
             'X-Civicgate-Channel  $civicgate_channel' \
             'X-Civicgate-Citizen  $civicgate_citizen' \
             'X-Civicgate-Service  $civicgate_service'
    do
        printf '            %-*s %s;\n' "$1" proxy_set_header "$h"
    done
    printf '            %-*s %s;\n' "$1" proxy_pass http://backend
}

# conf_journeys EVENTS: the tagging scenario, events on or off
conf_journeys() {
    tagging "$1"
    echo "        location / {"
    pass_tags 17
    echo "        }"
}

# conf_consent: the consent of every request, in front of the backend
conf_consent() {
    cat <<EOT
        civicgate_citizen  \$http_x_citizen_id;

        location / {
            civicgate_consent  bench;
            proxy_pass         http://backend;
        }
EOT
}

# http_full [ZONE STORE...], conf_full [ZONE]: the full gateway, a
# store=redis limit (bench_full, exact), the consent and the events
# together
http_full() {
    events_http
    consent_http
    if [ $# = 0 ]; then
        limit_zone bench_full redis
    else
        limit_zone "$@"
    fi
}
conf_full() {
    tagging on
    cat <<EOT
        location / {
            civicgate_limit    zone=${1:-bench_full} burst=100000 nodelay;
            civicgate_consent  bench;
            # a location's proxy_set_header replaces the inherited ones:
            # without this line the keepalive pool is lost
EOT
    pass_tags 18
    echo "        }"
}


# --- probes: the gateway's counters ----------------------------------------

# Each prints two counters from the metrics the script's metrics() reads
# for KEY: what was done, and what went wrong.

# probe_events KEY: events written, and events lost (dropped from a full
# spool)
probe_events() {
    local m
    m=$(metrics "$1") || return 1
    echo "$(metric "$m" 'civicgate_events_total{result="written"}')" \
         "$(metric "$m" 'civicgate_events_total{result="dropped"}')"
}

# probe_limit KEY ZONE: limited requests passed, and those rejected or
# decided without Redis
probe_limit() {
    local m
    m=$(metrics "$1") || return 1
    echo "$(metric "$m" "civicgate_limit_requests_total{zone=\"$2\",result=\"passed\"}")" \
         "$(( $(metric "$m" "civicgate_limit_requests_total{zone=\"$2\",result=\"rejected\"}")
             + $(metric "$m" "civicgate_limit_fallbacks_total{zone=\"$2\",on_error=\"local\"}") ))"
}

# probe_consent KEY: consents granted, and refused
probe_consent() {
    local m
    m=$(metrics "$1") || return 1
    echo "$(metric "$m" 'civicgate_consent_checks_total{purpose="bench",result="granted"}')" \
         "$(metric "$m" 'civicgate_consent_checks_total{purpose="bench",result="denied"}')"
}

# probe_full KEY [ZONE]: events written; events dropped, requests limited,
# consents refused
probe_full() {
    local m z=${2:-bench_full}
    m=$(metrics "$1") || return 1
    echo "$(metric "$m" 'civicgate_events_total{result="written"}')" \
         "$(( $(metric "$m" 'civicgate_events_total{result="dropped"}')
             + $(metric "$m" "civicgate_limit_requests_total{zone=\"$z\",result=\"rejected\"}")
             + $(metric "$m" "civicgate_limit_fallbacks_total{zone=\"$z\",on_error=\"local\"}")
             + $(metric "$m" 'civicgate_consent_checks_total{purpose="bench",result="denied"}') ))"
}


# --- requests --------------------------------------------------------------

# grant_all PORT FILE [WHAT]: the bench consent for every citizen the bench
# sends (and "warm"), through the admin endpoint on PORT; FILE holds the
# requests
grant_all() {
    local c sep=""
    for c in warm $(seq -f '3171%012g' 1 "$CITIZENS"); do
        printf '%surl = "http://127.0.0.1:%s/civicgate/admin/consents/bench"\n' \
            "$sep" "$1"
        printf 'request = "PUT"\ndata = "{\\"citizen\\":\\"%s\\"}"\n' "$c"
        printf 'output = "/dev/null"\n'
        sep=$'next\n'
    done > "$2"
    curl -fsS --parallel --parallel-max 8 --no-progress-meter -K "$2" \
        || die "could not grant the bench consents${3:+ ($3)}"
}

# mint_journeys URL: JOURNEYS journey IDs to reuse in $work/journeys,
# minted by the gateway at URL with the bench key
mint_journeys() {
    local i
    : > "$work/journeys"
    for i in $(seq "$JOURNEYS"); do
        curl -fs -o /dev/null -D - "$1" \
            | tr -d '\r' \
            | awk -F': ' 'tolower($1) == "x-journey-id" { print $2 }' \
            >> "$work/journeys"
    done
    [ "$(wc -l < "$work/journeys")" -eq "$JOURNEYS" ] \
        || die "could not mint $JOURNEYS journey IDs"
}

# bench_lua: wrk's script in $work/bench.lua; args: citizens, the file of
# journey IDs, the per cent of requests continuing one, and (read by
# bench/run.sh's counting variant) the responses after which to stop.
# wrk's Lua only picks among requests prepared once per thread.
bench_lua() {
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
    local k = 0
    for c = 1, citizens do
        local h = {
            ["X-Channel"] = channels[(c - 1) % #channels + 1],
            ["X-Citizen-Id"] = string.format("3171%012d", c),
        }
        if #ids > 0 and (c - 1) % 100 < share then
            k = k + 1
            h["X-Journey-ID"] = ids[(k - 1) % #ids + 1]
        end
        reqs[c] = wrk.format("GET", "/api/bench", h)
    end
    n = citizens
    i = math.random(n) - 1
    stop_after = tonumber(args[4]) or 0
end

function request()
    i = i % n + 1
    return reqs[i]
end
EOT
}


# --- Redis -----------------------------------------------------------------

# redis_sample FILE PORT...: the counters of those servers now, summed,
# one per line: "cpu SECONDS" (used_cpu_user + used_cpu_sys) and per
# command "NAME CALLS USEC" (INFO commandstats, which counts the commands
# that scripts run as well as the scripts; the samples' own INFO left
# out); and per server "node I CPU CALLS", its own
redis_sample() {
    local f=$1 p i=0
    shift
    for p in "$@"; do
        redis-cli -p "$p" info all | tr -d '\r' | awk -F'[:,=]' -v i=$i '
            $1 == "used_cpu_user" || $1 == "used_cpu_sys" { cpu += $2 }
            $1 ~ /^cmdstat_/ && $1 != "cmdstat_info" { print substr($1, 9), $3, $5; n += $3 }
            END { printf "cpu %.6f\nnode %d %.6f %d\n", cpu, i, cpu, n }'
        i=$((i + 1))
    done | awk '
        $1 == "node" { print; next }
        { if (!($1 in c)) k[++n] = $1; c[$1] += $2; u[$1] += $3 }
        END {
            for (i = 1; i <= n; i++)
                if (k[i] == "cpu") printf "cpu %.6f\n", c["cpu"]
                else print k[i], c[k[i]], u[k[i]]
        }' > "$f"
}

# redis_delta FILE0 FILE1 N: "COMMANDS CPU_US CPU_SHARES CMD_SHARES MIX"
# per item over N items between two samples: commands and Redis CPU
# microseconds summed over the servers sampled, each server's share of
# them in per cent ("a/b/c"), and per command "name=calls/usec" per item
redis_delta() {
    awk -v n="$3" '
        FNR == NR {
            if ($1 == "node") { c0[$2] = $3; n0[$2] = $4 }
            else { calls[$1] = $2; usec[$1] = $3 }
            next
        }
        $1 == "cpu" { cpu = $2 - calls["cpu"]; next }
        $1 == "node" { k++; dc[$2] = $3 - c0[$2]; dn[$2] = $4 - n0[$2]; tn += dn[$2]; next }
        {
            d = $2 - calls[$1]
            if (d <= 0) next
            cmds += d
            mix = mix sprintf(" %s=%.3f/%.3f", $1, d / n, ($3 - usec[$1]) / n)
        }
        END {
            if (n <= 0) n = 1
            for (i = 0; i < k; i++) {
                sc = sc (i ? "/" : "") sprintf("%.0f", cpu > 0 ? 100 * dc[i] / cpu : 0)
                sn = sn (i ? "/" : "") sprintf("%.0f", tn > 0 ? 100 * dn[i] / tn : 0)
            }
            printf "%.3f %.3f %s %s%s\n", cmds / n, cpu * 1e6 / n, sc, sn, mix
        }' "$1" "$2"
}

# used_memory PORT: the server's used_memory (INFO memory), bytes
used_memory() {
    redis-cli -p "$1" info memory | tr -d '\r' \
        | awk -F: '$1 == "used_memory" { print $2 }'
}

# stream_added [REDIS-CLI OPTION...] KEY: entries ever added to the
# stream KEY, trimmed or not (XINFO STREAM's entries-added), 0 if none
stream_added() {
    local n
    n=$(redis-cli "${@:1:$#-1}" xinfo stream "${!#}" 2>/dev/null \
        | awk 'prev == "entries-added" { print; exit } { prev = $0 }')
    echo "${n:-0}"
}


# --- runs ------------------------------------------------------------------

# drain_wait DONE0 REQUESTS LIMIT_MS PROBE [ARG...]: milliseconds until
# the first counter of PROBE ARG... has grown by REQUESTS from DONE0 (at
# most LIMIT_MS); 0 if it had at the first look
drain_wait() {
    local done0=$1 req=$2 limit=$3 t0 now p count first=1
    shift 3
    t0=$(date +%s%3N)
    while :; do
        p=$("$@") || return 1
        count=${p%% *}
        now=$(date +%s%3N)
        # done at the first look: no wait (the look itself may take a
        # while on a loaded machine)
        if [ $((count - done0)) -ge "$req" ] && [ "$first" = 1 ]; then
            echo 0
            return 0
        fi
        if [ $((count - done0)) -ge "$req" ] || [ $((now - t0)) -gt "$limit" ]; then
            echo $((now - t0))
            return 0
        fi
        first=0
        sleep 0.05
    done
}

# drained_rps REQUESTS RPS WAIT_MS: the run's rate with the wait for the
# gateway's work counted in its duration (wrk's own is requests / rate)
drained_rps() {
    awk -v r="$1" -v x="$2" -v w="$3" \
        'BEGIN { printf "%.0f", r / (r / (x > 0 ? x : 1) + w / 1000) }'
}

# check_count ROUND RUN WHAT REQUESTS BEFORE AFTER: every response wrk
# counted was counted first (by the gateway, or in Redis); on top come
# requests in flight when a run stops, this run's or the last.  civicgate
# delivers events at least once: a write that timed out but reached Redis
# is written again, so where redelivers[SCENARIO] is 1 (RUN is SCENARIO or
# SCENARIO/TARGET) more than that is a note, elsewhere an error.
check_count() {
    local n=$(($6 - $5))
    if [ "$n" -lt "$4" ]; then
        echo "$me: $2 round $1: wrk saw $4 responses; $3: $n" >&2
        errors=$((errors + 1))
    elif [ "$n" -gt $(($4 + 2 * CONNECTIONS)) ]; then
        if [ "${redelivers[${2%/*}]:-0}" = 1 ]; then
            echo "$me: $2 round $1: wrk saw $4 responses; $3: $n" \
                 "(events written again after a Redis timeout: see the gateway's log)"
        else
            echo "$me: $2 round $1: wrk saw $4 responses; $3: $n" >&2
            errors=$((errors + 1))
        fi
    fi
}

# check_probe ROUND RUN PROBE REQUESTS BEFORE AFTER: the probe's counters
# around a run of REQUESTS responses: the first grew by them, the second
# did not grow
check_probe() {
    local done0 fail0 done1 fail1
    read -r done0 fail0 <<< "$5"
    read -r done1 fail1 <<< "$6"
    check_count "$1" "$2" "the gateway counted as handled" "$4" "$done0" "$done1"
    if [ "$fail1" -ne "$fail0" ]; then
        echo "$me: $2 round $1: $((fail1 - fail0)) requests failed" \
             "(events dropped, requests rejected or errors; see $3)" >&2
        errors=$((errors + 1))
    fi
}

# check_wrk ROUND RUN NON2XX SOCKET_ERRORS OUTPUT: every response 2xx,
# no socket error
check_wrk() {
    if [ "$3" -ne 0 ] || [ "$4" -ne 0 ]; then
        echo "$me: $2 round $1: $3 non-2xx responses," \
             "$4 socket errors ($5)" >&2
        errors=$((errors + 1))
    fi
}

# fail_on_errors: exits 1 when a check above failed
fail_on_errors() {
    if [ "$errors" -ne 0 ]; then
        echo "$me: FAILED: $errors error(s) above; the figures are not valid" >&2
        exit 1
    fi
}
