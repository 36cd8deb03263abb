#!/usr/bin/env bash
# civicgate benchmark, Redis Cluster against one Redis: wrk on loopback
# against two gateway nginx instances that serve the same scenarios, one
# with `civicgate_redis ... mode=cluster` in front of a Redis Cluster of
# MASTERS masters (REPLICAS replicas each), one with a single redis-server,
# both in front of one backend nginx returning a small JSON body.
#
#   D   journey events (channel, journey ID, citizen, events on); the
#       cluster gateway spreads them over SHARDS streams cg:{events:n}
#   F   civicgate_limit store=redis (one Redis round trip per request)
#   G   civicgate_consent, no cache (CONSENT_TTL=0): one Redis read per
#       request
#   I   the full gateway: F's limit, G's consent and D's events together
#
# The scenarios' configuration is bench/run.sh's (its D, F, G and I: the
# fragments of bench/lib.sh, which both serve).  The method too: wrk -t1
# -c32, a warm-up of every run, rounds in alternating order (D single,
# D cluster, F single, ..., then backwards), medians, the
# gateway worker's CPU per request from /proc/PID/schedstat, Redis's from
# INFO (cpu, commandstats), here summed over the cluster's masters.
# Reported per scenario: req/s single and cluster, the median of the
# per-round ratios cluster/single (and their range), gateway CPU per
# request, Redis CPU per request (for the cluster: summed over the masters,
# and each master's share of it and of the commands, which says how evenly
# the keys spread), Redis commands per request; then what reached Redis:
# every event in a stream (entries-added over cg:events, or over every
# cg:{events:n}), and the keys each master holds.  Every response must be
# 2xx, no socket errors, every counter as expected and every event in
# Redis: the script exits non-zero on errors, never because of a ratio.
#
# Environment (defaults in brackets):
#   DURATION [5]      seconds per run        ROUNDS [5]     rounds
#   WARMUP [1]        seconds of warm-up per run, before round 1
#   THREADS [1]       wrk threads            CONNECTIONS [32]  wrk connections
#   CITIZENS [1000]   distinct citizen IDs
#   CONTINUED [50]    per cent of requests that continue a journey
#   JOURNEYS [CITIZENS x CONTINUED / 100]  journey IDs reused
#   SCENARIOS ["D F G I"]  which, in round-1 order
#   MASTERS [3]       cluster masters (at least 3)
#   REPLICAS [0]      replicas per master (their CPU is reported apart)
#   SHARDS [16]       civicgate_event_shards of the cluster gateway (the
#                     single gateway keeps the one stream cg:events)
#   CONSENT_TTL [0]   the consent cache's ttl= (0: every check asks Redis)
#   REDIS_TIMEOUT [500]  ms, civicgate's Redis timeout
#   KEEP [0]          1: keep the working directory (configs, logs, wrk output)
#   CIVICGATE_MODULE  module to load [build/ngx_http_civicgate_module.so]
#   NGINX             nginx binary [/usr/sbin/nginx]

# bash is needed; `sh bench/cluster.sh` re-runs it under bash
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

me=bench/cluster
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

journey_knobs
SCENARIOS=${SCENARIOS:-D F G I}
MASTERS=${MASTERS:-3}
REPLICAS=${REPLICAS:-0}
SHARDS=${SHARDS:-16}
CONSENT_TTL=${CONSENT_TTL:-0}
REDIS_TIMEOUT=${REDIS_TIMEOUT:-500}

whole_numbers DURATION ROUNDS WARMUP THREADS CONNECTIONS CITIZENS JOURNEYS CONTINUED \
    MASTERS REPLICAS SHARDS REDIS_TIMEOUT
if [ "$ROUNDS" -lt 1 ] || [ "$DURATION" -lt 1 ]; then
    die "DURATION and ROUNDS must be at least 1"
fi
# redis-cli --cluster create wants three masters at least
[ "$MASTERS" -ge 3 ] || die "MASTERS must be at least 3"
[ "$SHARDS" -ge 1 ] || die "SHARDS must be at least 1"
[ -f "$module" ] || die "module not found: $module (run: make build)"
need_commands wrk curl openssl redis-server redis-cli

targets="single cluster"


# --- scenarios (bench/run.sh's D, F, G and I) ------------------------------

declare -A desc redelivers

desc[D]="journey events"
http_D() {
    events_http
}
conf_D() {
    conf_journeys on
}
probe_D() {
    probe_events "$1"
}
stored_D() {
    events_stored "$1"
}

desc[F]="store=redis limit"
http_F() {
    limit_zone bench_redis redis
}
conf_F() {
    conf_limit bench_redis
}
probe_F() {
    probe_limit "$1" bench_redis
}

desc[G]="consent (cache ttl=$CONSENT_TTL)"
http_G() {
    consent_http
}
conf_G() {
    conf_consent
}
probe_G() {
    probe_consent "$1"
}

desc[I]="full: limit, consent, events"
http_I() {
    http_full
}
conf_I() {
    conf_full
}
probe_I() {
    probe_full "$1"
}
stored_I() {
    events_stored "$1"
}

# a count above what wrk saw (plus the requests in flight) is a note in
# every run here, never an error
for s in "${!desc[@]}"; do
    redelivers[$s]=1
done

for s in $SCENARIOS; do
    [ -n "${desc[$s]:-}" ] || die "unknown scenario '$s' (known: ${!desc[*]})"
done
read -r -a order <<< "$SCENARIOS"


# --- working directory -----------------------------------------------------

work_dir civicgate-bench-cluster

echo "bench/cluster: load average before: $(cat /proc/loadavg)"


# --- Redis: one server, and a cluster --------------------------------------

single_port=$(free_port 16379)
start_redis "$single_port" "$work"

# cluster_port FROM TAKEN: a free port whose cluster bus port (+10000) is
# free too
cluster_port() {
    local p=$1
    while port_busy "$p" || port_busy $((p + 10000)) || [[ " $2 " == *" $p "* ]]; do
        p=$((p + 1))
        [ "$p" -le 55535 ] || die "no free cluster port above $1"
    done
    echo "$p"
}

# start_node PORT: a cluster node without persistence, in pids
start_node() {
    local dir=$work/cluster/$1 i
    mkdir -p "$dir"
    redis-server --bind 127.0.0.1 --port "$1" --daemonize no \
        --save '' --appendonly no --dir "$dir" \
        --logfile "$work/logs/cluster-$1.log" \
        --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-node-timeout 5000 &
    pids+=($!)
    for i in $(seq 50); do
        [ "$(redis-cli -p "$1" ping 2>/dev/null)" = PONG ] && return 0
        kill -0 "${pids[-1]}" 2>/dev/null \
            || die "cluster node $1 did not start (see $work/logs/cluster-$1.log)"
        sleep 0.1
    done
    die "cluster node $1 did not answer within 5 s"
}

nodes=()
p=17001
for ((i = 0; i < MASTERS * (1 + REPLICAS); i++)); do
    p=$(cluster_port "$p" "$single_port ${nodes[*]}")
    nodes+=("$p")
    start_node "$p"
    p=$((p + 1))
done

seeds=()
for p in "${nodes[@]}"; do
    seeds+=("127.0.0.1:$p")
done
redis-cli --cluster create "${seeds[@]}" --cluster-replicas "$REPLICAS" \
    --cluster-yes > "$work/logs/cluster-create.log" 2>&1 \
    || die "redis-cli --cluster create failed (see $work/logs/cluster-create.log)"

# every node sees the cluster up and every replica in sync, within 30 s
cluster_ready() {
    local p info
    for p in "${nodes[@]}"; do
        info=$(redis-cli -p "$p" cluster info 2>/dev/null) || return 1
        [[ "$info" == *cluster_state:ok* ]] || return 1
        info=$(redis-cli -p "$p" info replication 2>/dev/null) || return 1
        [[ "$info" != *role:slave* || "$info" == *master_link_status:up* ]] \
            || return 1
    done
}
for i in $(seq 300); do
    cluster_ready && break
    [ "$i" -lt 300 ] || die "the cluster did not come up within 30 s"
    sleep 0.1
done

masters=()
replicas=()
for p in "${nodes[@]}"; do
    if [ "$(redis-cli -p "$p" role | head -n 1)" = master ]; then
        masters+=("$p")
    else
        replicas+=("$p")
    fi
done
[ "${#masters[@]}" -eq "$MASTERS" ] \
    || die "${#masters[@]} masters in the cluster, not $MASTERS"

# what the servers hold before the gateways write: the memory figures
# at the end are over the keys written since
declare -A mem0
for p in "$single_port" "${masters[@]}"; do
    mem0[$p]=$(used_memory "$p")
done

# entries ever added to the event streams (XINFO STREAM's entries-added,
# which trimming does not lower), over all of them: cg:events in the
# single Redis, cg:{events:0} to cg:{events:SHARDS-1} in the cluster
events_stored() {
    local keys=(cg:events) args=(-p "$single_port") k sum=0 i
    if [ "$1" = cluster ]; then
        keys=()
        for ((i = 0; i < SHARDS; i++)); do
            keys+=("cg:{events:$i}")
        done
        args=(-c -p "${masters[0]}")
    fi
    for k in "${keys[@]}"; do
        sum=$((sum + $(stream_added "${args[@]}" "$k")))
    done
    echo "$sum"
}


# --- configurations --------------------------------------------------------

taken="$single_port ${nodes[*]}"
backend_port=$(free_port 18100 "$taken")
taken="$taken $backend_port"
declare -A port
p=18300
for t in $targets; do
    for s in ctl "${order[@]}"; do
        port[$s.$t]=$(free_port $p "$taken")
        taken="$taken ${port[$s.$t]}"
        p=$((port[$s.$t] + 1))
    done
done

write_keys

copy_module "$module" "$work"

backend_conf "$backend_port" 1 > "$work/backend.conf"

# redis_line TARGET: the gateway's civicgate_redis (and event shards)
redis_line() {
    local p line=""
    if [ "$1" = single ]; then
        echo "    civicgate_redis  redis://127.0.0.1:$single_port timeout=${REDIS_TIMEOUT}ms;"
        return
    fi
    for p in "${masters[@]}"; do
        line="$line redis://127.0.0.1:$p"
    done
    echo "    civicgate_redis $line mode=cluster timeout=${REDIS_TIMEOUT}ms;"
    echo "    civicgate_event_shards  $SHARDS;"
}

# gateway_conf TARGET: the gateway's configuration: every scenario, and a
# control server (metrics, the admin endpoint for the consents, journey
# IDs minted)
gateway_conf() {
    local t=$1 s
    gateway_head "gateway-$t" 4096 "$backend_port" "$(redis_line "$t")"
    consent_http
    scenarios_http "${order[@]}"
    cat <<EOT

    server {
        listen  127.0.0.1:${port[ctl.$t]};
        civicgate_journey  off;
        civicgate_events   off;

        location = /metrics {
            civicgate_metrics;
        }

        location /civicgate/admin/ {
            civicgate_admin;
        }

        location /mint/ {
            civicgate_journey  on;
            civicgate_service  bench;
            proxy_pass         http://backend;
        }
    }
EOT
    for s in "${order[@]}"; do
        scenario_server "$s" "${port[$s.$t]}"
    done
    echo "}"
}

declare -A master_pid
for t in $targets; do
    # each configuration prints its http-level lines once
    events_http_done=0
    consent_http_done=0
    gateway_conf "$t" > "$work/gateway-$t.conf"
done

for c in backend gateway-single gateway-cluster; do
    nginx_test "$work" "$c" \
        || die "nginx -t failed for the $c configuration ($work/$c.conf)"
done

start_nginx "$work" backend
for t in $targets; do
    start_nginx "$work" "gateway-$t"
    master_pid[$t]=$!
done

metrics() {
    curl -fs "http://127.0.0.1:${port[ctl.$1]}/metrics"
}

# both gateways up, with a command connection to their Redis (the cluster
# one to every master: it has read the slot map, or its first requests
# would fall back)
for i in $(seq 200); do
    ok=1
    curl -fs -o /dev/null "http://127.0.0.1:$backend_port/" || ok=0
    for t in $targets; do
        m=$(metrics "$t") || { ok=0; continue; }
        want=1
        [ "$t" = single ] || want=$MASTERS
        [ "$(metric "$m" 'civicgate_redis_connections{role="command"}')" -ge "$want" ] \
            || ok=0
    done
    [ "$ok" = 1 ] && break
    [ "$i" -lt 200 ] || die "nginx or its Redis did not start (see $work/logs)"
    sleep 0.1
done


# --- consents and journey IDs ----------------------------------------------

# every citizen the bench sends holds the consent, in both Redis
for t in $targets; do
    grant_all "${port[ctl.$t]}" "$work/grants-$t.curl" "$t"
done

# journey IDs to reuse, minted by a gateway (both hold the key)
mint_journeys "http://127.0.0.1:${port[ctl.single]}/mint/"

bench_lua


# --- runs ------------------------------------------------------------------

errors=0
results=$work/results
: > "$results"

# redis_ports TARGET: the servers whose counters a run of TARGET reads
redis_ports() {
    if [ "$1" = single ]; then
        echo "$single_port"
    else
        echo "${masters[*]}"
    fi
}

# the work of the start-up requests (grants, mints) done before the first
# run: every counter unchanged for half a second, within 30 s
settle() {
    local a="" b i s t
    for i in $(seq 60); do
        b=""
        for t in $targets; do
            for s in "${order[@]}"; do
                b="$b $("probe_$s" "$t")"
            done
            b="$b $(events_stored "$t")"
        done
        [ "$a" = "$b" ] && return 0
        a=$b
        sleep 0.5
    done
}

# measure ROUND SCENARIO TARGET SECONDS
measure() {
    local round=$1 s=$2 t=$3 run=$2/$3 out=$work/wrk/$2-$3-$1.txt
    local p0 p1 st0="-" st1="-" line req rps p50 p99 bad sock
    local cmds cpu shc shn rcpu="-" g0 g1 drain
    local stored=""
    declare -F "stored_$s" >/dev/null && stored=stored_$s
    p0=$("probe_$s" "$t") || die "probe_$s failed ($t)"
    [ -z "$stored" ] || st0=$("$stored" "$t")
    # shellcheck disable=SC2046  # a list of ports
    redis_sample "$work/redis0" $(redis_ports "$t")
    [ "${#replicas[@]}" -eq 0 ] || [ "$t" = single ] \
        || redis_sample "$work/replicas0" "${replicas[@]}"
    g0=$(worker_cpu "${master_pid[$t]}")
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$4"s --latency -s "$work/bench.lua" \
        "http://127.0.0.1:${port[$s.$t]}/api/bench" -- "$CITIZENS" "$work/journeys" \
        "$CONTINUED" > "$out" 2>&1 \
        || { cat "$out" >&2; die "wrk failed for $run"; }
    line=$(parse_wrk "$out") || die "cannot parse wrk output: $out"
    read -r req rps p50 p99 bad sock <<< "$line"
    # events still in the spool belong to this run: wait for them, and
    # count the wait in the run's duration
    drain=$(drain_wait "${p0%% *}" "$req" 30000 "probe_$s" "$t")
    rps=$(drained_rps "$req" "$rps" "$drain")
    g1=$(worker_cpu "${master_pid[$t]}")
    # shellcheck disable=SC2046
    redis_sample "$work/redis1" $(redis_ports "$t")
    if [ "${#replicas[@]}" -gt 0 ] && [ "$t" = cluster ]; then
        redis_sample "$work/replicas1" "${replicas[@]}"
        read -r _ rcpu _ < <(redis_delta "$work/replicas0" "$work/replicas1" "$req")
    fi
    [ -z "$stored" ] || st1=$("$stored" "$t")
    p1=$("probe_$s" "$t") || die "probe_$s failed ($t)"
    check_probe "$round" "$run" "probe_$s" "$req" "$p0" "$p1"
    # nothing lost: every event of the run is in Redis
    [ -z "$stored" ] \
        || check_count "$round" "$run" "events that reached Redis" "$req" "$st0" "$st1"
    read -r cmds cpu shc shn _ < <(redis_delta "$work/redis0" "$work/redis1" "$req")
    check_wrk "$round" "$run" "$bad" "$sock" "$out"
    [ "$round" = warmup ] && return 0
    echo "$round $s $t $req $rps $p50 $p99 $((bad + sock)) $cmds $cpu" \
         "$(us_per "$g0" "$g1" "$req") $shc $shn $rcpu" \
         "$([ -z "$stored" ] || echo $((st1 - st0)))" >> "$results"
    printf '  round %-2s %-2s %-7s %9s req/s  p50 %7s ms  p99 %7s ms%s\n' \
        "$round" "$s" "$t" "$rps" "$p50" "$p99" \
        "$([ "$drain" -gt 0 ] && echo "  (+${drain} ms until its events were in Redis)")"
}

settle

echo "bench/cluster: wrk -t$THREADS -c$CONNECTIONS, $CITIZENS citizens," \
     "$CONTINUED% continuing a journey, gateways worker_processes 1"
echo "  single   redis-server 127.0.0.1:$single_port, one event stream"
echo "  cluster  $MASTERS masters (${masters[*]}), $REPLICAS replica(s) each," \
     "$SHARDS event streams"
for s in "${order[@]}"; do
    echo "  $s  ports ${port[$s.single]} and ${port[$s.cluster]}  ${desc[$s]}"
done

runs=()
for s in "${order[@]}"; do
    runs+=("$s.single" "$s.cluster")
done

echo "bench/cluster: ${DURATION}s runs, $ROUNDS rounds"
if [ "$WARMUP" -gt 0 ]; then
    for x in "${runs[@]}"; do
        measure warmup "${x%.*}" "${x#*.}" "$WARMUP"
    done
fi
for ((r = 1; r <= ROUNDS; r++)); do
    for x in $(round_order "$r" "${runs[@]}"); do
        measure "$r" "${x%.*}" "${x#*.}" "$DURATION"
    done
done


# --- report ----------------------------------------------------------------

echo
{
    for s in "${order[@]}"; do
        echo "desc $s ${desc[$s]}"
    done
    cat "$results"
} | awk -v order="${order[*]}" -v replicas="${#replicas[@]}" "$awk_stats"'
    $1 == "desc" { d = $3; for (i = 4; i <= NF; i++) d = d " " $i; desc[$2] = d; next }
    {
        r = $1; s = $2; t = $3
        rps[s, t] = rps[s, t] " " $5; p99[s, t] = p99[s, t] " " $7
        bad[s] += $8; cmd[s, t] = cmd[s, t] " " $9; cpu[s, t] = cpu[s, t] " " $10
        gw[s, t] = gw[s, t] " " $11; v[r, s, t] = $5; rounds[r] = 1
        if (t == "cluster") {
            n = split($12, a, "/"); nm = n
            for (i = 1; i <= n; i++) shc[s, i] = shc[s, i] " " a[i]
            split($13, a, "/")
            for (i = 1; i <= n; i++) shn[s, i] = shn[s, i] " " a[i]
            if ($14 != "-") rep[s] = rep[s] " " $14
        }
        if (NF >= 15) { req[s, t] += $4; ev[s, t] += $15 }
    }
    function shares(tab, s,    i, l) {
        l = ""
        for (i = 1; i <= nm; i++) l = l (i > 1 ? "/" : "") sprintf("%.0f", median(tab[s, i]))
        return l
    }
    END {
        n = split(order, sc, " ")
        printf "%-2s %-28s %9s %9s %6s %11s %7s %7s %8s %8s %7s %7s  %-11s %-11s\n",
               "", "scenario", "single", "cluster", "ratio", "range", "gw us",
               "gw us", "redis us", "redis us", "cmd/req", "cmd/req",
               "master cpu %", "master cmd %"
        printf "%-2s %-28s %9s %9s %6s %11s %7s %7s %8s %8s %7s %7s\n",
               "", "", "req/s", "req/s", "c/s", "", "single", "cluster",
               "single", "cluster", "single", "cluster"
        for (k = 1; k <= n; k++) {
            s = sc[k]; l = ""
            for (r in rounds)
                if (v[r, s, "single"] > 0) l = l " " v[r, s, "cluster"] / v[r, s, "single"]
            printf "%-2s %-28s %9.0f %9.0f %6.2f %11s %7.2f %7.2f %8.2f %8.2f %7.2f %7.2f  %-12s %-12s\n",
                   s, substr(desc[s], 1, 28), median(rps[s, "single"]),
                   median(rps[s, "cluster"]), median(l), minmax(l),
                   median(gw[s, "single"]), median(gw[s, "cluster"]),
                   median(cpu[s, "single"]), median(cpu[s, "cluster"]),
                   median(cmd[s, "single"]), median(cmd[s, "cluster"]),
                   shares(shc, s), shares(shn, s)
        }
        print ""
        print "req/s: medians over rounds (event scenarios: until every event of"
        print "the run was in Redis); ratio c/s: median of the per-round ratios"
        print "cluster/single, range: their min-max.  gw us: the gateway worker'"'"'s"
        print "CPU microseconds per request; redis us: Redis CPU microseconds per"
        print "request (the cluster: summed over its masters); cmd/req: Redis"
        print "commands per request (commands run by scripts included); master"
        print "cpu %, cmd %: each master'"'"'s share of the cluster'"'"'s Redis CPU and"
        print "commands in the runs (medians)."
        if (replicas > 0) {
            printf "Replicas, Redis CPU us per request summed over them:"
            for (k = 1; k <= n; k++) printf " %s %.2f", sc[k], median(rep[sc[k]])
            printf "\n"
        }
        print ""
        print "Events that reached Redis over all rounds (stream entries added):"
        for (k = 1; k <= n; k++) {
            s = sc[k]
            if (!((s, "single") in ev)) continue
            printf "  %-2s single %d for %d responses, cluster %d for %d responses\n",
                   s, ev[s, "single"], req[s, "single"], ev[s, "cluster"], req[s, "cluster"]
        }
        tb = 0
        for (k = 1; k <= n; k++) tb += bad[sc[k]]
        printf "Non-2xx responses and socket errors, all runs: %d\n", tb
    }'

# how the cluster's keys spread over its masters
spread=""
for p in "${masters[@]}"; do
    spread="$spread${spread:+/}$(redis-cli -p "$p" dbsize)"
done
echo "Keys per master at the end: $spread"
# and the event streams, each a slot: where the journeys' keys go too
spread=""
for p in "${masters[@]}"; do
    n=0
    for ((i = 0; i < SHARDS; i++)); do
        n=$((n + $(redis-cli -p "$p" exists "cg:{events:$i}" 2>/dev/null \
                   | grep -x '[0-9][0-9]*' || echo 0)))
    done
    spread="$spread${spread:+/}$n"
done
echo "Event streams per master: $spread (of $SHARDS)"

# memory_keys TARGET: "BYTES KEYS", what the keys written by the runs take
# in Redis (used_memory since the start), the event streams left out:
# they are trimmed, and the cluster has SHARDS of them
memory_keys() {
    local ports=("$single_port") args=(-p "$single_port") streams=(cg:events)
    local p k b=0 n=0 u
    if [ "$1" = cluster ]; then
        ports=("${masters[@]}")
        args=(-c -p "${masters[0]}")
        streams=()
        for ((i = 0; i < SHARDS; i++)); do
            streams+=("cg:{events:$i}")
        done
    fi
    for p in "${ports[@]}"; do
        b=$((b + $(used_memory "$p") - mem0[$p]))
        n=$((n + $(redis-cli -p "$p" dbsize)))
    done
    for k in "${streams[@]}"; do
        u=$(redis-cli "${args[@]}" memory usage "$k" samples 0 2>/dev/null \
            | grep -x '[0-9][0-9]*' || true)
        [ -z "$u" ] || { b=$((b - u)); n=$((n - 1)); }
    done
    echo "$b $n"
}
for t in $targets; do
    read -r b n < <(memory_keys "$t")
    echo "Redis memory, $t: $n keys, $((b / 1048576)) MiB," \
         "$([ "$n" -gt 0 ] && echo $((b / n)) || echo -) bytes per key" \
         "(used_memory since the start, event streams left out)"
done
echo "bench/cluster: load average after: $(cat /proc/loadavg)"

fail_on_errors
