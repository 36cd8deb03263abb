# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154  # variables shared with bench/run.sh
# The keyspace mode of bench/run.sh (`bench/run.sh keyspace`), sourced by
# it: does Redis's cost per journey event grow with the journeys Redis
# already holds?
#
# The gateway itself fills Redis: scenario D's server driven with new
# journeys only (no X-Journey-ID), in chunks, each drained before the next,
# until the journeys it has minted reach each size of KS_SIZES.  At each
# size, KS_ROUNDS measurements of KS_EVENTS events in the usual mix
# (CONTINUED per cent continuing a journey, the others new: a measurement
# adds journeys too, and the report says how many), each after a
# measurement of the unit, a plain XADD (see bench/run.sh).  Reported per
# size: Redis commands, Redis CPU and gateway CPU per event, the event in
# units, Redis's memory per stored journey; and the ratio of the largest
# size's Redis CPU per event to the smallest's.
#
# Environment (defaults in brackets):
#   KS_SIZES ["10000 1000000"]  journeys stored before each measurement
#   KS_EVENTS [20000]   events per measurement     KS_ROUNDS [3]
#   KS_CHUNK [200000]   new journeys per filling run, about (the spool
#                       holds about 460 000 events: a run must fit in it)
# A size whose filling would take more memory than the machine has
# available (estimated from the journeys stored so far) is skipped, with a
# message.

KS_SIZES=${KS_SIZES:-10000 1000000}
KS_EVENTS=${KS_EVENTS:-20000}
KS_ROUNDS=${KS_ROUNDS:-3}
KS_CHUNK=${KS_CHUNK:-200000}
whole_numbers KS_EVENTS KS_ROUNDS KS_CHUNK
for ks_size in $KS_SIZES; do
    case "$ks_size" in ''|*[!0-9]*) die "KS_SIZES must hold whole numbers" ;; esac
done
if [ "$KS_EVENTS" -lt 1 ] || [ "$KS_ROUNDS" -lt 1 ] || [ "$KS_CHUNK" -lt 1 ]; then
    die "KS_EVENTS, KS_ROUNDS and KS_CHUNK must be at least 1"
fi

# seconds of a measurement: wrk's thread stops after KS_EVENTS responses
# (wrk itself waits for the end of its duration), at the last rate seen or
# 5 000 events/s, with a margin (Redis's idle work in the time left adds
# some 0.2 us per event per second)
ks_seconds() {
    local rate=$ks_rate
    [ "$rate" -gt 0 ] || rate=5000
    echo $((KS_EVENTS * 2 / rate + 1))
}

# journeys the gateway has minted: every one of them started with an event
# (the keys of a new journey), the IDs minted by B for reuse aside
journeys_stored() {
    local m
    m=$(curl -fs "http://127.0.0.1:${port[D]}/metrics") || die "no metrics"
    metric "$m" 'civicgate_journeys_total{result="minted"}'
}

# ks_fits TARGET: whether TARGET journeys fit in the memory available,
# at the memory per journey seen so far (5 000 bytes before any is seen)
ks_fits() {
    local have per avail need
    have=$(journeys_stored)
    per=5000
    [ "$have" -lt 1000 ] || per=$(( $(used_memory "$redis_port") / have ))
    avail=$(( $(awk '$1 == "MemAvailable:" { print $2 }' /proc/meminfo) * 1024 ))
    need=$(( ($1 - have) * per ))
    if [ $((need * 5 / 4)) -gt "$avail" ]; then
        echo "bench: skipping $1 journeys: about $((need >> 20)) MB more for" \
             "Redis ($per bytes per journey), $((avail >> 20)) MB available"
        return 1
    fi
}

# requests per second of the last filling run: sizes the runs
ks_rate=0

# ks_fill TARGET: new journeys until TARGET are stored, in runs of at most
# KS_CHUNK, each drained before the next; the first run (1 s) gives the
# rate, the next ones last what their share should take at that rate; all
# stop at their share
ks_fill() {
    local have n d p0 p1 out line req rps p50 p99 bad sock drain
    have=$(journeys_stored)
    while [ "$have" -lt "$1" ]; do
        n=$(($1 - have))
        [ "$n" -le "$KS_CHUNK" ] || n=$KS_CHUNK
        d=1
        [ "$ks_rate" -eq 0 ] || d=$(((n + ks_rate - 1) / ks_rate))
        out=$work/wrk/fill-$have.txt
        p0=$(probe_D) || die "probe_D failed"
        wrk_script=$work/bench-count.lua share=0
        stop_after=$(((n + THREADS - 1) / THREADS))
        run_wrk D "$d" "$out"
        line=$(parse_wrk "$out") || die "cannot parse wrk output: $out"
        read -r req rps p50 p99 bad sock <<< "$line"
        if [ "$bad" -ne 0 ] || [ "$sock" -ne 0 ]; then
            die "filling: $bad non-2xx responses, $sock socket errors ($out)"
        fi
        # a run that stopped at its count only says the rate is higher
        if [ "$req" -ge "$n" ] && [ "$ks_rate" -gt 0 ]; then
            ks_rate=$((ks_rate * 2))
        else
            ks_rate=$((req / d > 0 ? req / d : 1))
        fi
        drain=$(drain_wait "${p0%% *}" "$req" 600000 probe_D)
        p1=$(probe_D) || die "probe_D failed"
        if [ $((${p1%% *} - ${p0%% *})) -lt "$req" ] || [ "${p1#* }" != "${p0#* }" ]; then
            die "filling: $req responses, events written/dropped $p0 -> $p1"
        fi
        have=$(journeys_stored)
        echo "  filled: $have journeys ($req events in ${d}s," \
             "+${drain} ms until written)"
    done
}

# per size, after its filling: "size journeys used_memory keys"; per
# measurement: "size journeys_before journeys_after"
keyspace_runs() {
    local size r j0 j1 d req
    : > "$work/keyspace-fill"
    : > "$work/keyspace-runs"
    drain_limit=600000
    echo "bench: keyspace: sizes $KS_SIZES journeys; $KS_ROUNDS runs of" \
         "$KS_EVENTS events at each"
    measure_unit warmup
    for size in $KS_SIZES; do
        ks_fits "$size" || continue
        ks_fill "$size"
        echo "$size $(journeys_stored) $(used_memory "$redis_port")" \
             "$(redis-cli -p "$redis_port" dbsize)" >> "$work/keyspace-fill"
        for ((r = 1; r <= KS_ROUNDS; r++)); do
            measure_unit "$size-$r"
            j0=$(journeys_stored)
            wrk_script=$work/bench-count.lua share=$CONTINUED
            stop_after=$(((KS_EVENTS + THREADS - 1) / THREADS))
            d=$(ks_seconds)
            measure "$size-$r" D "$d"
            # a run that did not reach its count: the rate was lower
            req=$(awk -v r="$size-$r" '$1 == r && $2 == "D" { print $3 }' "$results")
            if [ "$req" -lt "$KS_EVENTS" ]; then
                echo "  (the run ended before $KS_EVENTS events; the next one lasts longer)"
                ks_rate=$((req / d > 0 ? req / d : 1))
            fi
            j1=$(journeys_stored)
            echo "$size $j0 $j1" >> "$work/keyspace-runs"
        done
    done
}

keyspace_report() {
    echo
    awk "$awk_stats"'
        FILENAME ~ /keyspace-fill$/ {
            sizes[++n] = $1; journeys[$1] = $2; mem[$1] = $3; keys[$1] = $4
            next
        }
        FILENAME ~ /keyspace-runs$/ {
            if (!($1 in jlo) || $2 < jlo[$1]) jlo[$1] = $2
            if ($3 > jhi[$1]) jhi[$1] = $3
            next
        }
        FILENAME ~ /unit$/ {
            split($1, a, "-"); unit[a[1]] = unit[a[1]] " " $2; next
        }
        $2 == "D" {
            split($1, a, "-"); s = a[1]
            cmd[s] = cmd[s] " " $9; cpu[s] = cpu[s] " " $10; gw[s] = gw[s] " " $11
        }
        END {
            if (n == 0) { print "no size measured"; exit }
            printf "%10s %17s %9s %10s %9s %6s %8s %9s %11s\n", "journeys",
                   "during runs", "cmd/ev", "redis us", "unit us", "units",
                   "gw us", "Redis MB", "B/journey"
            for (i = 1; i <= n; i++) {
                s = sizes[i]; u = median(unit[s]); r = median(cpu[s])
                printf "%10d %8d-%-8d %9.3f %10.3f %9.3f %6.2f %8.3f %9.1f %11.0f\n",
                       journeys[s], jlo[s], jhi[s], median(cmd[s]), r, u,
                       (u > 0 ? r / u : 0), median(gw[s]), mem[s] / 1048576,
                       (journeys[s] > 0 ? mem[s] / journeys[s] : 0)
            }
            print ""
            print "journeys: stored before the runs at that size (minted by the gateway);"
            print "during runs: from the first run'"'"'s start to the last one'"'"'s end (half"
            print "the events start a journey); cmd/ev, redis us, gw us: Redis commands,"
            print "Redis CPU and gateway CPU microseconds per event, medians over the runs;"
            print "unit us: a plain XADD of the same fields (32 connections, unpipelined),"
            print "measured before each run; units: redis us / unit us; Redis MB:"
            print "used_memory after filling; B/journey: used_memory / journeys."
            if (n > 1) {
                lo = sizes[1]; hi = sizes[n]
                printf "\nRedis CPU per event at %d journeys over that at %d: %.2f",
                       journeys[hi], journeys[lo], median(cpu[hi]) / median(cpu[lo])
                printf " (in units: %.2f)\n",
                       (median(cpu[hi]) / median(unit[hi])) / (median(cpu[lo]) / median(unit[lo]))
                printf "Redis memory per journey added between them: %.0f bytes\n",
                       (mem[hi] - mem[lo]) / (journeys[hi] - journeys[lo])
            }
        }' "$work/keyspace-fill" "$work/keyspace-runs" "$work/unit" "$results"
}
