#!/usr/bin/env bash
# civicgate status benchmark, in two parts, against its own redis-server and
# nginx instances on loopback.
#
# 1. Requests per second of GET /status (civicgate_status), beside nginx
#    serving a static file with the same bytes from a plain location of the
#    same server, each with and without If-None-Match (the 304 path):
#
#      S200  static file, 200          G200  GET /status, 200
#      S304  static file, 304          G304  GET /status, 304
#
#    wrk on one gateway worker (worker_processes 1), scenarios interleaved
#    in rounds (S200 G200 S304 G304, then backwards, ...) after a warm-up;
#    reported: median req/s and latency, the median per-round ratio of each
#    status scenario to its static twin, and the gateway worker's CPU per
#    request.  Every response must have the expected status (a map logs any
#    other to a file) and wrk must see no socket error.
#
# 2. Fan-out: N Server-Sent Events clients (FANOUT, default "1000 10000")
#    on a gateway with 2 workers; an admin PUT changes a service; measured
#    is the time from the PUT to the moment the last client reads the
#    "service" event (and the median client), FANOUT_ROUNDS times per N.
#    bench/sse-fanout.c, built with gcc, holds the clients (epoll).  An N
#    that the open-file limit or the ephemeral port range cannot take is
#    skipped with a message.
#
# Environment (defaults in brackets):
#   DURATION [5]        seconds per wrk run     ROUNDS [5]   wrk rounds
#   WARMUP [1]          seconds of warm-up per scenario
#   CONNECTIONS [32]    wrk connections         THREADS [1]  wrk threads
#   SERVICES [8]        configured services, at least 3 (two of them set to
#                       degraded and maintenance, with messages, before
#                       measuring; the fan-out changes the third)
#   PARTS ["rps fanout"]  which parts to run
#   FANOUT ["1000 10000"] client counts         FANOUT_ROUNDS [5]
#   KEEP [0]            1: keep the working directory
#   CIVICGATE_MODULE    module to load [build/ngx_http_civicgate_module.so]
#   NGINX               nginx binary [/usr/sbin/nginx]

# bash is needed; `sh bench/status.sh` re-runs it under bash
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

me=bench
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

SERVICES=${SERVICES:-8}
PARTS=${PARTS:-rps fanout}
FANOUT=${FANOUT:-1000 10000}
FANOUT_ROUNDS=${FANOUT_ROUNDS:-5}

whole_numbers DURATION ROUNDS WARMUP THREADS CONNECTIONS SERVICES FANOUT_ROUNDS
for n in $FANOUT; do
    case "$n" in ''|*[!0-9]*) die "FANOUT must list whole numbers" ;; esac
done
if [ "$ROUNDS" -lt 1 ] || [ "$DURATION" -lt 1 ] || [ "$SERVICES" -lt 3 ] \
    || [ "$FANOUT_ROUNDS" -lt 1 ]
then
    die "DURATION, ROUNDS and FANOUT_ROUNDS must be at least 1, SERVICES 3"
fi
[ -f "$module" ] || die "module not found: $module (run: make build)"
need_commands wrk curl openssl gcc redis-server redis-cli


# --- working directory -----------------------------------------------------

fanout_pid=""

# shellcheck disable=SC2317  # called on exit
cleanup() {
    if [ -n "$fanout_pid" ]; then
        kill -TERM "$fanout_pid" 2>/dev/null || true
        wait "$fanout_pid" 2>/dev/null || true
    fi
    remove_work "$1"
}
work_dir civicgate-bench-status cleanup
mkdir -p "$work/www" "$work/redis"

# the gateways may hold many streams: as many files as we are allowed
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
nofile=$(ulimit -n)
[ "$nofile" = unlimited ] && nofile=1048576


# --- Redis -----------------------------------------------------------------

redis_port=$(free_port 16479)
start_redis "$redis_port" "$work"


# --- gateways --------------------------------------------------------------

# one gateway for requests per second (one worker, like bench/run.sh) and
# one for the fan-out (two workers, one listening socket each: reuseport)
rps_port=$(free_port 18300 "$redis_port")
fan_port=$(free_port 18310 "$redis_port $rps_port")

write_keys

copy_module "$module" "$work"

services=()
for ((i = 1; i <= SERVICES; i++)); do
    services+=("service-$i")
done

service_locations() {
    local s
    for s in "${services[@]}"; do
        echo "        location /api/$s/ { civicgate_service $s; return 204; }"
    done
}

# gateway_conf NAME PORT WORKERS CONNECTIONS LISTEN_FLAGS
gateway_conf() {
    cat <<EOT
load_module $work/ngx_http_civicgate_module.so;
worker_processes  $3;
worker_rlimit_nofile  $nofile;
pid               $work/$1.pid;
error_log         $work/logs/$1-error.log;
events { worker_connections $4; }
http {
$(temp_paths "$work" "$1")
    keepalive_requests  1000000;

    # log only what a benchmark must never get: a 200 without If-None-Match
    # and a 304 with it are expected, anything else is logged and fails it
    map "\$status:\$http_if_none_match" \$unexpected {
        "200:"     0;
        "~^304:."  0;
        default    1;
    }
    access_log  $work/logs/$1-unexpected.log combined if=\$unexpected;

    civicgate_secret_file  $work/keys;
    civicgate_redis        redis://127.0.0.1:$redis_port timeout=500ms;

    server {
        listen  127.0.0.1:$2 backlog=4096 $5;

$(service_locations)

        location /status {
            civicgate_status;
        }

        # the file's descriptor and metadata cached: the best nginx does
        location /static/ {
            alias       $work/www/;
            open_file_cache        max=16 inactive=1h;
            open_file_cache_valid  1h;
            add_header  Cache-Control     no-cache;
            add_header  Content-Language  en;
            add_header  Vary              Accept-Language;
        }

        location /civicgate/admin/ {
            civicgate_admin;
        }

        location = /metrics {
            civicgate_metrics;
        }
    }
}
EOT
}

max_clients=0
for n in $FANOUT; do
    [ "$n" -gt "$max_clients" ] && max_clients=$n
done
fan_conns=$((max_clients + 1024))
[ "$fan_conns" -gt "$nofile" ] && fan_conns=$nofile

gateway_conf rps "$rps_port" 1 4096 "" > "$work/rps.conf"
gateway_conf fan "$fan_port" 2 "$fan_conns" reuseport > "$work/fan.conf"

declare -A master
for c in rps fan; do
    nginx_test "$work" "$c" || die "nginx -t failed for $work/$c.conf"
    start_nginx "$work" "$c"
    master[$c]=$!
done

for i in $(seq 100); do
    ok=1
    for p in "$rps_port" "$fan_port"; do
        code=$(curl -s -o /dev/null -w '%{http_code}' \
                   "http://127.0.0.1:$p/status") || true
        [ "${code:-000}" = 200 ] || ok=0
    done
    [ "$ok" = 1 ] && break
    [ "$i" -lt 100 ] || die "the gateways did not start (see $work/logs)"
    sleep 0.1
done

# the status both gateways serve: two services not operational, with
# messages in both languages
admin="http://127.0.0.1:$rps_port/civicgate/admin/services"
curl -fs -o /dev/null -X PUT -H 'Content-Type: application/json' \
    -d '{"state":"degraded","message":{"id":"Respons lambat","en":"Slow responses"}}' \
    "$admin/${services[0]}" || die "admin PUT failed"
curl -fs -o /dev/null -X PUT -H 'Content-Type: application/json' \
    -d '{"state":"maintenance","message":{"id":"Pemeliharaan terjadwal","en":"Scheduled maintenance"},"since":"2026-11-30T15:00:00Z","until":"2026-11-30T19:00:00Z"}' \
    "$admin/${services[1]}" || die "admin PUT failed"

# wait until the gateway serves the change (it arrives by pub/sub)
for i in $(seq 50); do
    curl -fs -H 'Accept-Language: en' "http://127.0.0.1:$rps_port/status" \
        | grep -q '"maintenance"' && break
    [ "$i" -lt 50 ] || die "the gateway does not show the change"
    sleep 0.1
done

# CPU nanoseconds used by all the workers of a gateway
workers_cpu() {
    local w sum=0
    for w in $(pgrep -P "${master[$1]}"); do
        sum=$((sum + $(awk '{ print $1 }' "/proc/$w/schedstat")))
    done
    echo "$sum"
}

# open files of each worker of a gateway: how the streams spread
worker_files() {
    local w out=""
    for w in $(pgrep -P "${master[$1]}"); do
        out="$out $(ls "/proc/$w/fd" | wc -l)"
    done
    echo "${out# }"
}

errors=0
unexpected() {
    local f=$work/logs/$1-unexpected.log
    if [ -f "$f" ]; then wc -l < "$f"; else echo 0; fi
}


# --- part 1: requests per second -------------------------------------------

part_rps() {
    local hdr body etag s_etag url s r n line req rps p50 p99 bad sock
    local g0 g1 u0 u1 gw out
    local -A path inm

    # the static twin: the very bytes GET /status answers in English
    curl -fs -D "$work/status.hdr" -o "$work/www/status.json" \
        -H 'Accept-Language: en' "http://127.0.0.1:$rps_port/status" \
        || die "GET /status failed"
    etag=$(tr -d '\r' < "$work/status.hdr" \
           | awk -F': ' 'tolower($1) == "etag" { print $2 }')
    [ -n "$etag" ] || die "GET /status has no ETag"
    s_etag=$(curl -fs -o /dev/null -D - "http://127.0.0.1:$rps_port/static/status.json" \
             | tr -d '\r' | awk -F': ' 'tolower($1) == "etag" { print $2 }')
    [ -n "$s_etag" ] || die "the static file has no ETag"
    cmp -s "$work/www/status.json" \
        <(curl -fs "http://127.0.0.1:$rps_port/static/status.json") \
        || die "the static file differs from the status"
    for u in "/status $etag" "/static/status.json $s_etag"; do
        read -r url hdr <<< "$u"
        code=$(curl -s -o /dev/null -w '%{http_code}' -H "If-None-Match: $hdr" \
                   -H 'Accept-Language: en' "http://127.0.0.1:$rps_port$url")
        [ "$code" = 304 ] || die "$url with If-None-Match answered $code, not 304"
    done
    body=$(wc -c < "$work/www/status.json")

    path[S200]=/static/status.json; inm[S200]=""
    path[G200]=/status;             inm[G200]=""
    path[S304]=/static/status.json; inm[S304]=$s_etag
    path[G304]=/status;             inm[G304]=$etag

    cat > "$work/status.lua" <<'EOT'
-- args: the If-None-Match value ("" for none); the request is built once
local req

function init(args)
    local h = { ["Accept-Language"] = "en" }
    if args[1] and args[1] ~= "" then
        h["If-None-Match"] = args[1]
    end
    req = wrk.format("GET", nil, h)
end

function request()
    return req
end
EOT

    local order=(S200 G200 S304 G304)
    echo "bench: GET /status ($SERVICES services, $body bytes) beside the same" \
         "bytes from a static file;"
    echo "       wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $ROUNDS rounds," \
         "gateway worker_processes 1, port $rps_port"

    : > "$work/results"
    for ((r = 0; r <= ROUNDS; r++)); do
        for s in $(round_order "$r" "${order[@]}"); do
            out=$work/wrk/$s-$r.txt
            n=$DURATION
            [ "$r" = 0 ] && n=$WARMUP
            [ "$n" -gt 0 ] || continue
            u0=$(unexpected rps)
            g0=$(worker_cpu "${master[rps]}")
            wrk -t"$THREADS" -c"$CONNECTIONS" -d"$n"s --latency \
                -s "$work/status.lua" "http://127.0.0.1:$rps_port${path[$s]}" \
                -- "${inm[$s]}" > "$out" 2>&1 \
                || { cat "$out" >&2; die "wrk failed for $s"; }
            g1=$(worker_cpu "${master[rps]}")
            u1=$(unexpected rps)
            line=$(parse_wrk "$out") || die "cannot parse wrk output: $out"
            read -r req rps p50 p99 bad sock <<< "$line"
            bad=$((bad + u1 - u0))
            if [ "$bad" -ne 0 ] || [ "$sock" -ne 0 ]; then
                echo "bench: $s round $r: $bad unexpected statuses, $sock socket" \
                     "errors ($out, $work/logs/rps-unexpected.log)" >&2
                errors=$((errors + 1))
            fi
            [ "$r" = 0 ] && continue
            gw=$(us_per "$g0" "$g1" "$req")
            echo "$r $s $req $rps $p50 $p99 $bad $sock $gw" >> "$work/results"
            printf '  round %-2s %s  %8s req/s  p50 %7s ms  p99 %7s ms  %6s us/req\n' \
                "$r" "$s" "$rps" "$p50" "$p99" "$gw"
        done
    done

    echo
    awk "$awk_stats"'
        {
            r = $1; s = $2
            rps[s] = rps[s] " " $4; p50[s] = p50[s] " " $5; p99[s] = p99[s] " " $6
            bad[s] += $7 + $8; v[r, s] = $4; g[r, s] = $9; gw[s] = gw[s] " " $9
            rounds[r] = 1
        }
        END {
            desc["S200"] = "static file, 200"
            desc["G200"] = "GET /status, 200"
            desc["S304"] = "static file, If-None-Match: 304"
            desc["G304"] = "GET /status, If-None-Match: 304"
            base["S200"] = "S200"; base["G200"] = "S200"
            base["S304"] = "S304"; base["G304"] = "S304"
            printf "%-5s %-33s %9s %8s %8s %6s %11s %6s %7s %6s\n", "", "scenario",
                   "req/s", "p50 ms", "p99 ms", "ratio", "range", "errors",
                   "gw us", "cpu"
            n = split("S200 G200 S304 G304", sc, " ")
            for (k = 1; k <= n; k++) {
                s = sc[k]; b = base[s]; ratios = ""; cratios = ""
                for (r in rounds)
                    if (v[r, b] > 0 && (r, s) in v) {
                        ratios = ratios " " v[r, s] / v[r, b]
                        if (g[r, s] > 0) cratios = cratios " " g[r, b] / g[r, s]
                    }
                printf "%-5s %-33s %9.0f %8.3f %8.3f %6.2f %11s %6d %7.2f %6.2f\n",
                       s, desc[s], median(rps[s]), median(p50[s]), median(p99[s]),
                       median(ratios), minmax(ratios), bad[s], median(gw[s]),
                       median(cratios)
            }
            print ""
            print "req/s, p50, p99: medians over rounds.  ratio: median of the per-round"
            print "req/s ratio to the static twin (G200 to S200, G304 to S304), range:"
            print "its min-max.  gw us: the gateway worker'"'"'s CPU microseconds per"
            print "request; cpu: median per-round ratio of the twin'"'"'s gw us to the"
            print "scenario'"'"'s (what the ratio would be with the worker alone on a CPU)."
        }' "$work/results"
}


# --- part 2: fan-out -------------------------------------------------------

part_fanout() {
    local n ports_free need out line sse rc c0 c1 us from_fanout to_fanout
    local fanout=$work/sse-fanout

    gcc -O2 -Wall -Wextra -o "$fanout" "$top/bench/sse-fanout.c" \
        || die "cannot build bench/sse-fanout.c"

    # ephemeral ports: the client spreads over 8 source addresses
    read -r lo hi < /proc/sys/net/ipv4/ip_local_port_range
    ports_free=$(((hi - lo + 1) * 8))

    echo
    echo "bench: fan-out of one admin PUT to N Server-Sent Events clients," \
         "gateway worker_processes 2, port $fan_port, $FANOUT_ROUNDS rounds each"

    : > "$work/fanout"
    for n in $FANOUT; do
        # the client holds n sockets; each gateway worker may get them all
        need=$((n + 64))
        if [ "$need" -gt "$nofile" ] || [ "$n" -gt $((fan_conns - 64)) ]; then
            echo "  $n clients: skipped: the open-file limit is $nofile" \
                 "(ulimit -Hn), $need needed"
            continue
        fi
        if [ "$n" -gt "$ports_free" ]; then
            echo "  $n clients: skipped: only $ports_free ephemeral ports"
            continue
        fi

        out=$work/fanout-$n.txt
        # -w: after connecting, wait for a line on stdin, so that the metrics
        # can be read while every stream is open
        coproc FANOUT_PROC {
            "$fanout" -p "$fan_port" -n "$n" -r "$FANOUT_ROUNDS" -w \
                -u /status -a "/civicgate/admin/services/${services[2]}" 2>&1
        }
        fanout_pid=$FANOUT_PROC_PID
        # bash unsets FANOUT_PROC when the process ends: keep copies
        exec {from_fanout}<&"${FANOUT_PROC[0]}" {to_fanout}>&"${FANOUT_PROC[1]}"
        : > "$out"
        sse=""
        while IFS= read -r line <&"$from_fanout"; do
            echo "$line" >> "$out"
            case "$line" in
            connected*)
                sse=$(metric "$(curl -fs "http://127.0.0.1:$fan_port/metrics")" \
                          'civicgate_status_clients{kind="sse"}')
                echo "  $n clients: $line; civicgate_status_clients{kind=\"sse\"} $sse;" \
                     "open files per worker: $(worker_files fan)"
                c0=$(workers_cpu fan)
                echo go >&"$to_fanout"
                ;;
            round*)
                echo "    $line"
                # the gateway's CPU for the rounds: the PUTs, the fan-outs
                [ "${line#round "$FANOUT_ROUNDS" }" = "$line" ] \
                    || c1=$(workers_cpu fan)
                ;;
            esac
        done
        exec {from_fanout}<&- {to_fanout}>&-
        rc=0
        wait "$fanout_pid" || rc=$?
        fanout_pid=""
        if [ "$rc" -ne 0 ] || ! grep -qx ok "$out"; then
            grep '^error' "$out" >&2 || true
            echo "bench: fan-out to $n clients failed ($out)" >&2
            errors=$((errors + 1))
            continue
        fi
        if [ "${sse:-0}" -lt "$n" ]; then
            echo "bench: $n clients connected, the gateway counted ${sse:-0}" >&2
            errors=$((errors + 1))
        fi
        us=$(us_per "$c0" "$c1" $((n * FANOUT_ROUNDS)) 2)
        echo "    gateway CPU per event delivered: $us us"
        awk -v n="$n" -v us="$us" '$1 == "round" { print n, $0, "us", us }' \
            "$out" >> "$work/fanout"
        # let the gateway close the last streams before the next count
        sleep 1
    done

    [ -s "$work/fanout" ] || return 0
    echo
    awk "$awk_stats"'
        {
            # N round I put_ms P last_ms L p50_ms M p99_ms Q clients C us U
            n = $1
            if (!(n in seen)) { seen[n] = 1; order[++k] = n }
            put[n] = put[n] " " $5; last[n] = last[n] " " $7
            p50[n] = p50[n] " " $9; p99[n] = p99[n] " " $11; us[n] = $15
        }
        END {
            printf "%8s %14s %14s %14s %14s %12s %9s\n", "clients", "last median ms",
                   "last max ms", "p50 median ms", "p99 median ms", "PUT 200 ms",
                   "gw us/ev"
            for (i = 1; i <= k; i++) {
                n = order[i]
                printf "%8d %14.2f %14.2f %14.2f %14.2f %12.2f %9.2f\n", n,
                       median(last[n]), max(last[n]), median(p50[n]),
                       median(p99[n]), median(put[n]), us[n]
            }
            print ""
            print "Times from just before the admin PUT is written.  last: when the"
            print "last client read the service event (median and max over rounds);"
            print "p50, p99: the median and 99th-percentile client, median over"
            print "rounds; PUT 200: when the admin answer arrived.  gw us/ev: CPU"
            print "microseconds of the gateway'"'"'s workers per event delivered."
        }' "$work/fanout"
}


for part in $PARTS; do
    case "$part" in
    rps) part_rps ;;
    fanout) part_fanout ;;
    *) die "unknown part '$part' (rps, fanout)" ;;
    esac
done

for c in rps fan; do
    if grep -E '\[(alert|crit|emerg)\]' "$work/logs/$c-error.log" >&2; then
        echo "bench: the $c gateway logged alerts" >&2
        errors=$((errors + 1))
    fi
done

fail_on_errors
