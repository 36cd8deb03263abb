#!/bin/sh
# A minimal agency consumer of civicgate journey events, with redis-cli only.
#
# It reads the global stream (cg:events), or with SHARDS=N every shard's
# stream cg:{events:0} .. cg:{events:N-1} in one read, as one consumer of a
# consumer group (the same group on each stream), prints one line per event,
# and acknowledges the events once printed.  Run
# several copies with different CONSUMER names to share the work; run another
# GROUP to get every event again for another purpose.  docs/events.md
# explains the commands used here.
#
# Delivery is at-least-once: an event printed but not yet acknowledged when
# the consumer stops is delivered again when it restarts (this script first
# re-reads its own pending events).  Deduplicate by the eid field where that
# matters.
#
# Environment, all optional:
#   REDIS_HOST      default 127.0.0.1
#   REDIS_PORT      default 6379
#   REDIS_DB        default 0
#   REDIS_USER      ACL user name
#   REDISCLI_AUTH   password, read by redis-cli itself (never put it on the
#                   command line)
#   REDIS_CLI_OPTS  more redis-cli options, e.g. "--tls --cacert ca.pem"
#   STREAM          default cg:events; ignored when SHARDS is set
#   SHARDS          civicgate_event_shards of the gateways: read the N shard
#                   streams.  In a Redis Cluster, whose commands take keys of
#                   one slot only, run one copy per shard instead, with
#                   STREAM='cg:{events:n}' and REDIS_CLI_OPTS=-c
#   GROUP           default agency
#   CONSUMER        default: the host name; keep it stable across restarts
#   START           where a new group starts: "$" only events added from now
#                   on (default), "0" the whole stream
#   COUNT           events per read, default 10
#   BLOCK           milliseconds a read waits for new events, default 5000
#   ONCE            1: exit after the first read that returns no event
#
# Example:
#   REDIS_PORT=6379 GROUP=permits-agency START=0 sh examples/consumer.sh
#
# Output, one line per event (fields as in the stream, time made readable):
#   1764455462418-0 time=2025-11-29T22:31:02.418Z eid=9c1f... journey=... \
#     channel=web service=permits method=GET status=200 latency_ms=3 citizen=...

set -eu

host=${REDIS_HOST:-127.0.0.1}
port=${REDIS_PORT:-6379}
db=${REDIS_DB:-0}
stream=${STREAM:-cg:events}
shards=${SHARDS:-}
group=${GROUP:-agency}
consumer=${CONSUMER:-$(hostname)}
start=${START:-\$}
count=${COUNT:-10}
block=${BLOCK:-5000}
once=${ONCE:-0}

command -v redis-cli >/dev/null || { echo "consumer: redis-cli not found" >&2; exit 1; }

# redis-cli prints replies one value a line when its output is not a
# terminal; -e makes an error reply a non-zero exit status (message on stderr)
cli() {
    # shellcheck disable=SC2086  # REDIS_CLI_OPTS is a list of options
    redis-cli -e -h "$host" -p "$port" -n "$db" \
        ${REDIS_USER:+--user "$REDIS_USER"} ${REDIS_CLI_OPTS:-} "$@"
}

# the streams read: one, or every shard's
if [ -n "$shards" ]; then
    streams=$(awk -v n="$shards" 'BEGIN {
        for (i = 0; i < n; i++) printf "cg:{events:%d} ", i }')
else
    streams=$stream
fi

# The group, created on each stream if either is missing.  BUSYGROUP: it
# exists already, and keeps its position.
ensure_group() {
    for s in $streams; do
        if ! out=$(cli XGROUP CREATE "$s" "$group" "$start" MKSTREAM 2>&1)
        then
            case $out in
                *BUSYGROUP*) ;;
                *) echo "consumer: XGROUP CREATE failed: $out" >&2
                   return 1 ;;
            esac
        fi
    done
}

# the same ID ("0" or ">") for every stream read
ids_for() {
    for s in $streams; do printf '%s ' "$1"; done
}

ensure_group || exit 1

echo "consumer: reading ${streams% } as $consumer in group $group" >&2

# awk writes the events to the terminal (fd 4) and the IDs to acknowledge to
# the command substitution
exec 4>&1

# First "0": the events this consumer received before but did not
# acknowledge (a crash, Ctrl-C between print and XACK).  Then ">": new ones.
id=0

while :; do
    # shellcheck disable=SC2046,SC2086  # one argument per stream and per ID
    if [ "$id" = ">" ]; then
        set -- BLOCK "$block" STREAMS $streams $(ids_for ">")
    else
        set -- STREAMS $streams $(ids_for "$id")
    fi

    if ! out=$(cli XREADGROUP GROUP "$group" "$consumer" COUNT "$count" "$@" 2>&1)
    then
        # NOGROUP: the stream or the group was deleted (a Redis restarted
        # without persistence): create it again.  Anything else (Redis
        # unreachable, ...): say so and retry.
        echo "consumer: XREADGROUP failed: $out" >&2
        case $out in
            *NOGROUP*) ensure_group || sleep 1; id=0 ;;
            *) sleep 1 ;;
        esac
        continue
    fi

    # The reply, flattened one value a line: per stream its name, then for
    # each entry its ID followed by field/value pairs.  An entry ID is the
    # only line in a field-name position that looks like "123-4", a stream
    # name the only one that starts with "cg:"; an empty name there is an
    # entry deleted from the stream before it was acknowledged.  Prints one
    # line per event to stdout and "stream ID" to acknowledge to fd 3.
    ids=$(printf '%s\n' "$out" | awk '
        function flush() {
            if (entry != "") {
                if (line != "") print entry line
                print stream, entry > "/dev/fd/3"
            }
            entry = ""; line = ""
        }
        expect != "value" && /^cg:/ { flush(); stream = $0; next }
        expect == "value" {
            v = $0
            if (name == "time" && v ~ /^[0-9]+$/) {
                v = strftime("%Y-%m-%dT%H:%M:%S", int(v / 1000), 1) \
                    sprintf(".%03dZ", v % 1000)
            }
            line = line " " name "=" v
            expect = "name"
            next
        }
        /^[0-9]+-[0-9]+$/ { flush(); entry = $0; expect = "name"; next }
        $0 == "" { next }                     # a deleted entry has no fields
        entry != "" { name = $0; expect = "value"; next }
        END {
            if (expect == "value") line = line " " name "="   # empty last value
            flush()
        }
    ' 3>&1 >&4)

    if [ -z "$ids" ]; then
        if [ "$id" = 0 ]; then
            id=">"                        # no pending events left: new ones
            continue
        fi

        [ "$once" = 1 ] && exit 0
        continue
    fi

    # processed (here: printed), so acknowledged, each on its stream;
    # unacknowledged events stay pending and come back with "0" on restart
    for s in $streams; do
        acks=$(printf '%s\n' "$ids" | awk -v s="$s" '$1 == s { print $2 }')
        [ -n "$acks" ] || continue
        # shellcheck disable=SC2086  # one argument per ID
        if ! out=$(cli XACK "$s" "$group" $acks 2>&1); then
            echo "consumer: XACK failed: $out" >&2
            sleep 1
        fi
    done
done
