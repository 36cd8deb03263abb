# shellcheck shell=bash
# Helpers shared by scripts/demo.sh, bench/run.sh and bench/status.sh;
# sourced, never run.  Bash only.  The script defines die() (which prefixes
# its own name), $nginx (the binary), and an array pids that holds every
# process it starts, so that stop_all can end them.

# true if something accepts connections on 127.0.0.1:$1
port_busy() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# free_port FROM [TAKEN]: the first port from FROM on that nothing listens
# on and that is not in the list TAKEN (ports picked but not listening yet)
free_port() {
    local p=$1
    while port_busy "$p" || [[ " ${2:-} " == *" $p "* ]]; do
        p=$((p + 1))
        [ "$p" -le 65535 ] || die "no free port found above $1"
    done
    echo "$p"
}

# whole_numbers VAR...: dies unless every variable named holds a whole number
whole_numbers() {
    local v
    for v in "$@"; do
        case "${!v}" in ''|*[!0-9]*) die "$v must be a whole number" ;; esac
    done
}

# on_exit FUNCTION: FUNCTION runs once, with the exit status, when the
# script exits, also on Ctrl-C (130) or TERM (143)
on_exit() {
    # shellcheck disable=SC2064  # FUNCTION is known now
    trap "_on_exit $1" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# shellcheck disable=SC2317  # called from the EXIT trap
_on_exit() {
    local rc=$?
    trap - EXIT
    trap "" INT TERM    # a second Ctrl-C must not cut the clean-up short
    "$1" "$rc"
}

# TERM every process in pids, the last started first; KILL any still
# there after 5 s
stop_all() {
    local pid i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for i in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

# copy_module MODULE DIR: a private copy in DIR, for load_module: a rebuild
# overwriting the module in place while nginx has it mapped would crash
# nginx mid-run
copy_module() {
    cp "$1" "$2/ngx_http_civicgate_module.so"
}

# start_redis PORT DIR: a redis-server on 127.0.0.1:PORT without
# persistence (files in DIR/redis, log DIR/logs/redis.log), added to pids;
# returns once it answers
start_redis() {
    local i log=$2/logs/redis.log
    mkdir -p "$2/redis"
    redis-server --bind 127.0.0.1 --port "$1" --daemonize no \
        --save '' --appendonly no --dir "$2/redis" --logfile "$log" &
    pids+=($!)
    for i in $(seq 50); do
        [ "$(redis-cli -p "$1" ping 2>/dev/null)" = PONG ] && return 0
        kill -0 "${pids[-1]}" 2>/dev/null \
            || die "redis-server did not start (see $log)"
        [ "$i" -lt 50 ] || die "redis-server did not answer within 5 s"
        sleep 0.1
    done
}

# nginx_test DIR NAME: nginx -t -q of DIR/NAME.conf, prefix DIR
nginx_test() {
    # shellcheck disable=SC2154  # set by the script
    "$nginx" -t -q -p "$1/" -c "$1/$2.conf" -e "$1/logs/$2-error.log"
}

# start_nginx DIR NAME: nginx in the foreground with DIR/NAME.conf, prefix
# DIR, added to pids ($! is its pid)
start_nginx() {
    "$nginx" -p "$1/" -c "$1/$2.conf" -e "$1/logs/$2-error.log" \
        -g 'daemon off;' &
    pids+=($!)
}

# temp_paths DIR NAME: http-level *_temp_path lines under DIR/tmp, so that
# nginx needs no directory of its own
temp_paths() {
    local t
    for t in client_body proxy fastcgi uwsgi scgi; do
        echo "    ${t}_temp_path $1/tmp/$2_$t;"
    done
}

# value of a Prometheus sample in text $1, 0 if absent
metric() {
    printf '%s\n' "$1" | awk -v k="$2" '$1 == k { v = $2 } END { print v + 0 }'
}

# CPU nanoseconds the workers of an nginx master (pid $1) have used, from
# their scheduler statistics
worker_cpu() {
    local w n=0
    for w in $(pgrep -P "$1"); do
        n=$((n + $(awk '{ print $1 }' "/proc/$w/schedstat")))
    done
    echo "$n"
}

# us_per NANOS0 NANOS1 N [DECIMALS]: CPU microseconds per item (3 decimals)
us_per() {
    awk -v a="$1" -v b="$2" -v n="$3" -v f="%.${4:-3}f" \
        'BEGIN { printf f, (b - a) / 1000 / n }'
}

# round_order ROUND ITEM...: the items forwards in odd rounds, backwards in
# even ones (runs interleaved in rounds: A B C, then C B A, ...)
round_order() {
    local r=$1 i back=()
    shift
    if ((r % 2)); then
        echo "$*"
        return
    fi
    for ((i = $#; i >= 1; i--)); do
        back+=("${!i}")
    done
    echo "${back[*]}"
}

# "requests rps p50_ms p99_ms non2xx3xx socket_errors" from wrk --latency
# output in file $1
parse_wrk() {
    awk '
        function ms(v) {
            if (v ~ /us$/) return v * 0.001
            if (v ~ /ms$/) return v + 0
            if (v ~ /m$/)  return v * 60000
            if (v ~ /s$/)  return v * 1000
            return v + 0
        }
        /requests in/             { req = $1 }
        /^Requests\/sec:/         { rps = $2 }
        /Latency Distribution/    { dist = 1; next }
        dist && $1 == "50%"       { p50 = ms($2) }
        dist && $1 == "99%"       { p99 = ms($2); dist = 0 }
        /Non-2xx or 3xx/          { bad = $NF }
        /Socket errors:/          { gsub(/,/, ""); sock = $4 + $6 + $8 + $10 }
        END {
            if (req == "" || rps == "") exit 1
            printf "%d %.0f %.3f %.3f %d %d\n", req, rps, p50, p99, bad, sock
        }' "$1"
}

# awk functions for the reports, over space-separated lists of numbers:
# median(list), max(list), minmax(list) ("lo-hi", 2 decimals)
# shellcheck disable=SC2034  # used by the scripts that source this file
awk_stats='
    function median(list,    a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++)
            for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) {
                t = a[j]; a[j] = a[j - 1]; a[j - 1] = t
            }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function max(list,    a, n, i, m) {
        n = split(list, a, " "); m = a[1]
        for (i = 2; i <= n; i++) if (a[i] + 0 > m + 0) m = a[i]
        return m
    }
    function minmax(list,    a, n, i, lo, hi) {
        n = split(list, a, " ")
        lo = hi = a[1]
        for (i = 2; i <= n; i++) {
            if (a[i] + 0 < lo + 0) lo = a[i]
            if (a[i] + 0 > hi + 0) hi = a[i]
        }
        return sprintf("%.2f-%.2f", lo, hi)
    }
'
