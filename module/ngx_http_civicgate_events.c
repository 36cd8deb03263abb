
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_events.h"
#include "ngx_http_civicgate_redis.h"
#include "ngx_http_civicgate_journey.h"
#include "ngx_http_civicgate_metrics.h"
#include "ngx_http_civicgate_codec.h"


#define NGX_HTTP_CIVICGATE_METHOD_MAX   16

/* slots of the spool in flight to Redis, all workers together */
#define NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT      1024
#define NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT_MAX  16384

/* the spool's high-water mark for the health endpoints, in percent */
#define NGX_HTTP_CIVICGATE_SPOOL_HIGH   90


/* a worker's events go in one script call: this many, or after a while */
#define NGX_HTTP_CIVICGATE_BATCH_MAX        32
#define NGX_HTTP_CIVICGATE_BATCH_DELAY      5       /* ms */
#define NGX_HTTP_CIVICGATE_BATCH_SCRATCH    400     /* bytes per event */
/* a worker's batches in flight; past them, events wait in the spool */
#define NGX_HTTP_CIVICGATE_BATCH_WINDOW     256

/* the journeys and the citizens a worker remembers, powers of two */
#define NGX_HTTP_CIVICGATE_SEEN             32768
#define NGX_HTTP_CIVICGATE_SEEN_CITIZENS    4096
/* a continuing journey's expiry is refreshed once per ttl / 16 */
#define NGX_HTTP_CIVICGATE_SEEN_REFRESH     16

#define NGX_HTTP_CIVICGATE_EID_RAW          8
#define NGX_HTTP_CIVICGATE_SLOT_TEXT        35

/*
 * The consent purposes a request passed, for the data-use log: the
 * retention (4 bytes), then the names, separated by spaces.
 */
#define NGX_HTTP_CIVICGATE_USES_TEXT                                          \
    (4 + NGX_HTTP_CIVICGATE_USES_MAX * (NGX_HTTP_CIVICGATE_SERVICE_MAX + 1))

/* an event's text then takes up to 8 slots */
#define NGX_HTTP_CIVICGATE_SLOTS_MAX        8

/* an event's flags: what the script does besides writing it */
#define NGX_HTTP_CIVICGATE_EVENT_EXPIRE     0x01    /* the timeline's */
#define NGX_HTTP_CIVICGATE_EVENT_INDEX      0x02    /* add to the citizen's */
#define NGX_HTTP_CIVICGATE_EVENT_INDEX_TTL  0x04    /* the citizen's expiry */
#define NGX_HTTP_CIVICGATE_EVENT_TOUCH      0x07
#define NGX_HTTP_CIVICGATE_EVENT_CITIZEN    0x40    /* spool only */
/* cluster mode: its shard's call acknowledged; its citizen's may not be */
#define NGX_HTTP_CIVICGATE_EVENT_STREAMED   0x80
/* spool only: the slots after the first one, 0 to 7 */
#define NGX_HTTP_CIVICGATE_EVENT_MORE_SHIFT 3
#define NGX_HTTP_CIVICGATE_EVENT_MORE       0x38
#define ngx_http_civicgate_slot_width(slot)                                   \
    (1 + (((slot)->flags & NGX_HTTP_CIVICGATE_EVENT_MORE)                     \
          >> NGX_HTTP_CIVICGATE_EVENT_MORE_SHIFT))

#define NGX_HTTP_CIVICGATE_SPOOL_BATCH      NGX_HTTP_CIVICGATE_BATCH_MAX
#define NGX_HTTP_CIVICGATE_SPOOL_CLAIMS     64
#define NGX_HTTP_CIVICGATE_SPOOL_FLUSH      250     /* ms */
#define NGX_HTTP_CIVICGATE_EVENTS_WINDOW    1024    /* commands in flight */
/* the first position, a multiple of the slots: room to put events back */
#define NGX_HTTP_CIVICGATE_SPOOL_BASE       ((uint64_t) 1 << 20)
/* per event: its fields, ttl, flags, steps channel, uses; four keys */
#define NGX_HTTP_CIVICGATE_EVENT_ARGS       18
/* per batch: EVALSHA, sha, number of keys, one key, two arguments */
#define NGX_HTTP_CIVICGATE_BATCH_ARGS       6

/* in cluster mode, an event's parts sent in a batch's calls */
#define NGX_HTTP_CIVICGATE_PART_SHARD       0x01
#define NGX_HTTP_CIVICGATE_PART_CITIZEN     0x02
/* the event writes its citizen's keys: the index, or the data-use list */
#define ngx_http_civicgate_event_citizen_part(ev)                             \
    (((ev)->flags & NGX_HTTP_CIVICGATE_EVENT_INDEX) || (ev)->uses_len)
/* every part acknowledged: in cluster mode, after a failed batch */
#define ngx_http_civicgate_event_written(ev)                                  \
    (((ev)->flags & NGX_HTTP_CIVICGATE_EVENT_STREAMED)                        \
     && !ngx_http_civicgate_event_citizen_part(ev))
#define ngx_http_civicgate_slot_written(slot)                                 \
    (((slot)->flags & NGX_HTTP_CIVICGATE_EVENT_STREAMED)                      \
     && !((slot)->flags & NGX_HTTP_CIVICGATE_EVENT_INDEX)                     \
     && (slot)->uses_len == 0)
/* outside a cluster, a batch's one call has every event */
#define ngx_http_civicgate_batch_member(b, s, i)                              \
    (!(b)->ecf->shards.cluster                                                \
     || ((b)->shard[i] == (s)                                                 \
         && !((b)->ecf->sent[i] & NGX_HTTP_CIVICGATE_PART_SHARD)))


/* one journey event, as a worker holds it */
typedef struct {
    uint64_t                        time;          /* ms since the epoch */
    int64_t                         latency;       /* ms; -1: no upstream */
    uint32_t                        ttl;
    uint16_t                        status;
    u_char                          flags;
    u_char                          channel_len;
    u_char                          service_len;
    u_char                          method_len;
    u_char                          citizen_len;
    u_char                          eid[NGX_HTTP_CIVICGATE_EID_RAW];
    u_char                          journey[NGX_HTTP_CIVICGATE_JID_LEN];
    u_char                          citizen[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN];
    u_char                          channel[NGX_HTTP_CIVICGATE_CHANNEL_MAX];
    u_char                          service[NGX_HTTP_CIVICGATE_SERVICE_MAX];
    u_char                          method[NGX_HTTP_CIVICGATE_METHOD_MAX];
    uint16_t                        uses_len;      /* 0: none */
    u_char                          uses[NGX_HTTP_CIVICGATE_USES_TEXT];
} ngx_http_civicgate_event_t;


/*
 * A spooled event: one slot, or more when its channel, service, method
 * and uses do not fit in the first (NGX_HTTP_CIVICGATE_EVENT_MORE), the
 * others then all text.  IDs are kept as bytes, not as their text.
 */
typedef struct {
    uint64_t                        time;
    int32_t                         latency;
    uint32_t                        ttl;
    uint16_t                        status;
    uint16_t                        uses_len;
    u_char                          flags;
    u_char                          channel_len;
    u_char                          service_len;
    u_char                          method_len;
    u_char                          eid[NGX_HTTP_CIVICGATE_EID_RAW];
    u_char                          journey[NGX_HTTP_CIVICGATE_JID_RAW];
    u_char                          citizen[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN
                                            / 2];
    u_char                          text[NGX_HTTP_CIVICGATE_SLOT_TEXT];
} ngx_http_civicgate_spool_slot_t;


/*
 * The worker's record of the journeys it wrote lately, direct-mapped by
 * the journey ID's hash: when it last refreshed the journey's expiry, and
 * with which citizen it last indexed it.
 */
typedef struct {
    uint32_t                        journey;       /* crc32; 0: empty */
    uint32_t                        check;         /* murmur2 */
    uint32_t                        citizen;       /* crc32; 0: none */
    uint32_t                        ttl;
    ngx_msec_t                      refreshed;
} ngx_http_civicgate_seen_t;


typedef struct ngx_http_civicgate_spool_sh_s  ngx_http_civicgate_spool_sh_t;
typedef struct ngx_http_civicgate_event_batch_s
    ngx_http_civicgate_event_batch_t;


typedef struct {
    ngx_http_civicgate_main_conf_t *core;
    size_t                          buffer;        /* the spool's size */
    ngx_shm_zone_t                 *zone;
    ngx_http_civicgate_spool_sh_t  *sh;
    ngx_slab_pool_t                *shpool;
    ngx_uint_t                      maxlen;        /* per stream */
    ngx_http_civicgate_shards_t     shards;
    ngx_uint_t                      drain_limit;   /* all workers */
    ngx_msec_t                      claim_ttl;
    ngx_cycle_t                    *old_cycle;     /* at reload */

    ngx_http_civicgate_redis_script_t  *batch_script;
    ngx_http_civicgate_redis_script_t  *citizen_script;   /* cluster */

    /* per worker */
    ngx_event_t                     flush_timer;
    ngx_event_t                     batch_timer;
    ngx_http_civicgate_event_batch_t  *collect;    /* not sent yet */
    ngx_http_civicgate_seen_t      *seen;
    ngx_http_civicgate_seen_t      *seen_citizens;
    u_char                         *scratch;       /* a batch's arguments */
    u_char                          random[512];   /* for event IDs */
    ngx_uint_t                      nrandom;       /* left in it */
    uint16_t                        sequence;      /* if it failed */
    const char                    **argv;
    size_t                         *lens;
    u_char                         *sent;          /* a batch's parts sent */
    ngx_uint_t                      drain_share;
    ngx_uint_t                      inflight;      /* claimed slots */
    ngx_uint_t                      direct;        /* batches sent */
    ngx_queue_t                     back;          /* those that failed */
    ngx_uint_t                      nback;         /* their events */
    ngx_http_civicgate_log_limit_t  refused;
    ngx_uint_t                      running;       /* timer set */
} ngx_http_civicgate_events_conf_t;


typedef struct {
    ngx_flag_t                      enable;
} ngx_http_civicgate_events_loc_conf_t;


/*
 * Spooled events sent to Redis but not yet acknowledged, a contiguous
 * range of the spool: they leave it only once acknowledged, so that the
 * events of a worker that dies are sent again by another.
 */
typedef struct {
    uint64_t                        start;         /* its first slot */
    ngx_uint_t                      n;             /* slots */
    ngx_pid_t                       pid;           /* 0: to send again */
    ngx_msec_t                      deadline;      /* then taken over */
    ngx_uint_t                      done;
} ngx_http_civicgate_spool_claim_t;


/* guarded by the zone's slab pool mutex, which nginx frees if we die */
struct ngx_http_civicgate_spool_sh_s {
    uint64_t                        head;          /* next slot to write */
    uint64_t                        tail;          /* oldest unwritten */
    uint64_t                        next;          /* oldest unclaimed */
    ngx_uint_t                      nslots;
    ngx_uint_t                      first;         /* oldest claim */
    ngx_uint_t                      nclaims;
    ngx_uint_t                      inflight;      /* slots, all workers */
    ngx_http_civicgate_log_limit_t  warned;
    uint64_t                        dropped;       /* since the last warning */
    uint64_t                        moved;         /* resized: head then + 1 */
    ngx_http_civicgate_spool_claim_t  claims[NGX_HTTP_CIVICGATE_SPOOL_CLAIMS];
    ngx_http_civicgate_spool_slot_t slots[1];
};


/*
 * A call of a batch: its parts (NGX_HTTP_CIVICGATE_PART_*) of the events
 * from "from" on with the shard, or the citizen, of the event at "from".
 */
typedef struct {
    ngx_http_civicgate_event_batch_t *batch;
    ngx_uint_t                        from;
    ngx_uint_t                        part;
} ngx_http_civicgate_batch_call_t;


/*
 * Events sent in one script call, or in cluster mode one per shard and
 * one per citizen: a worker's batch (slots == 0), or a claim of the
 * spool.  Kept until every reply.  If a call failed, the batch is
 * written again (at least once); in cluster mode, only the parts of its
 * events whose calls failed (the flags of an event say which are left):
 * a failed batch sent directly goes back in front of the spool without
 * its events written in full, a claim stays in it and its slots record
 * what was written, so that the claim taken again skips it.
 */
struct ngx_http_civicgate_event_batch_s {
    ngx_http_civicgate_events_conf_t *ecf;
    ngx_http_civicgate_batch_call_t  *call;        /* per call sent */
    uint16_t                         *shard;       /* per event */
    ngx_queue_t                       queue;       /* failed, sent directly */
    ngx_uint_t                        claim;       /* index in claims */
    uint64_t                          start;
    ngx_uint_t                        slots;       /* claimed; 0: direct */
    ngx_uint_t                        n;
    ngx_uint_t                        unsent;      /* waits behind */
    ngx_uint_t                        pending;     /* calls unanswered */
    ngx_uint_t                        calls;       /* sent */
    ngx_uint_t                        failed;
    ngx_http_civicgate_event_t        events[1];
};


static char *ngx_http_civicgate_event_buffer(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_civicgate_events_postconfiguration(
    ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_events_zone(ngx_conf_t *cf,
    ngx_http_civicgate_events_conf_t *ecf);
static void *ngx_http_civicgate_events_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_civicgate_events_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_events_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_int_t ngx_http_civicgate_events_init_process(ngx_cycle_t *cycle);
static void ngx_http_civicgate_events_exit_process(ngx_cycle_t *cycle);
static void ngx_http_civicgate_events_exit_master(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_civicgate_events_log(ngx_http_request_t *r);
static void ngx_http_civicgate_events_ready(ngx_http_civicgate_redis_t *rc);
static ngx_int_t ngx_http_civicgate_spool_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static void ngx_http_civicgate_spool_carry_over(
    ngx_http_civicgate_events_conf_t *ecf, ngx_shm_zone_t *shm_zone);
static ngx_slab_pool_t *ngx_http_civicgate_spool_old_zone(
    ngx_http_civicgate_events_conf_t *ecf, ngx_shm_zone_t *shm_zone);
static void ngx_http_civicgate_event_fill(ngx_http_request_t *r,
    ngx_http_civicgate_journey_t *j, ngx_http_civicgate_event_t *ev);
static void ngx_http_civicgate_event_uses(ngx_http_request_t *r,
    ngx_http_civicgate_event_t *ev);
static void ngx_http_civicgate_event_id(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_t *ev);
static void ngx_http_civicgate_event_seen(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_t *ev);
static ngx_http_civicgate_event_batch_t *ngx_http_civicgate_batch_alloc(
    ngx_http_civicgate_events_conf_t *ecf, ngx_uint_t n);
static ngx_int_t ngx_http_civicgate_batch_add(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_t *ev);
static void ngx_http_civicgate_batch_flush(
    ngx_http_civicgate_events_conf_t *ecf);
static void ngx_http_civicgate_batch_timer(ngx_event_t *ev);
static ngx_int_t ngx_http_civicgate_batch_send(
    ngx_http_civicgate_event_batch_t *b);
static ngx_int_t ngx_http_civicgate_batch_split(
    ngx_http_civicgate_event_batch_t *b);
static ngx_int_t ngx_http_civicgate_batch_call(
    ngx_http_civicgate_event_batch_t *b, ngx_uint_t from);
static u_char *ngx_http_civicgate_batch_head(
    ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_redis_script_t *script, ngx_uint_t keys, u_char *p);
static ngx_int_t ngx_http_civicgate_batch_evalsha(
    ngx_http_civicgate_event_batch_t *b, ngx_uint_t argc, ngx_uint_t from,
    ngx_uint_t part);
static u_char *ngx_http_civicgate_batch_event_keys(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_t *ev,
    u_char *p, ngx_uint_t *k);
static u_char *ngx_http_civicgate_batch_event_args(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_t *ev,
    u_char *p, ngx_uint_t *k, ngx_uint_t *a);
static ngx_int_t ngx_http_civicgate_citizen_call(
    ngx_http_civicgate_event_batch_t *b, ngx_uint_t from);
static ngx_uint_t ngx_http_civicgate_citizen_member(
    ngx_http_civicgate_event_t *first, ngx_http_civicgate_event_t *ev);
static u_char *ngx_http_civicgate_citizen_event_args(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_t *ev,
    u_char *p, ngx_uint_t *a);
static u_char *ngx_http_civicgate_batch_uses_args(
    ngx_http_civicgate_event_t *ev, u_char *p, const char **argv,
    size_t *lens, ngx_uint_t *a);
static void ngx_http_civicgate_batch_reply(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static void ngx_http_civicgate_batch_acked(
    ngx_http_civicgate_event_batch_t *b,
    ngx_http_civicgate_batch_call_t *call);
static void ngx_http_civicgate_batch_done(
    ngx_http_civicgate_event_batch_t *b);
static void ngx_http_civicgate_batch_keep(
    ngx_http_civicgate_event_batch_t *b);
static void ngx_http_civicgate_batch_settled(
    ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_batch_t *b, ngx_uint_t failed);
static void ngx_http_civicgate_event_refused(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply);
static ngx_uint_t ngx_http_civicgate_spool_pack(
    ngx_http_civicgate_event_t *ev, ngx_http_civicgate_spool_slot_t *slot);
static ngx_uint_t ngx_http_civicgate_spool_unpack(
    ngx_http_civicgate_spool_sh_t *sh, uint64_t pos,
    ngx_http_civicgate_event_t *ev);
static ngx_uint_t ngx_http_civicgate_event_width(
    ngx_http_civicgate_event_t *ev);
static ngx_uint_t ngx_http_civicgate_spool_width(
    ngx_http_civicgate_spool_sh_t *sh, uint64_t pos);
static uint64_t ngx_http_civicgate_spool_whole(
    ngx_http_civicgate_spool_sh_t *sh, uint64_t pos, uint64_t n);
static uint64_t ngx_http_civicgate_spool_count(
    ngx_http_civicgate_spool_sh_t *sh, uint64_t pos, uint64_t n);
static void ngx_http_civicgate_spool_append(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_t *ev);
static void ngx_http_civicgate_spool_return(
    ngx_http_civicgate_events_conf_t *ecf);
static ngx_uint_t ngx_http_civicgate_spool_pack_back(
    ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_spool_slot_t *slots);
static ngx_int_t ngx_http_civicgate_spool_front(
    ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_spool_slot_t *slots, ngx_uint_t n);
static void ngx_http_civicgate_spool_drops(
    ngx_http_civicgate_events_conf_t *ecf, ngx_uint_t force);
static void ngx_http_civicgate_spool_drain(
    ngx_http_civicgate_events_conf_t *ecf);
static ngx_http_civicgate_event_batch_t *ngx_http_civicgate_spool_take(
    ngx_http_civicgate_events_conf_t *ecf);
static ngx_http_civicgate_spool_claim_t *ngx_http_civicgate_spool_claim(
    ngx_http_civicgate_events_conf_t *ecf);
static ngx_int_t ngx_http_civicgate_spool_send(
    ngx_http_civicgate_event_batch_t *b);
static void ngx_http_civicgate_spool_complete(
    ngx_http_civicgate_event_batch_t *b, ngx_uint_t failed);
static ngx_uint_t ngx_http_civicgate_spool_mark(
    ngx_http_civicgate_spool_sh_t *sh, ngx_http_civicgate_spool_claim_t *c,
    ngx_http_civicgate_event_batch_t *b);
static void ngx_http_civicgate_spool_release(
    ngx_http_civicgate_spool_sh_t *sh, ngx_http_civicgate_spool_claim_t *c,
    ngx_uint_t done);
static void ngx_http_civicgate_spool_timer(ngx_event_t *ev);


/*
 * One call per batch of events.  KEYS: the watch registry, then per event
 * its shard's stream, its timeline, if flagged its citizen's index, and
 * with uses its citizen's data-use list of the month.  ARGV: a stream's
 * MAXLEN, now (ms), then per event time, eid, journey, channel, service,
 * method, status, latency_ms, citizen, ttl, flags, the journey's steps
 * channel, the purposes used (space-separated, or empty), and when a new
 * data-use list expires (a Unix time).
 * The stream's entry ID is the event's step ID (SID).  Timelines are
 * lists, trimmed when they pass 1100 entries; they expire when new and
 * when the gateway's flags say so (1).  A citizen's index gets the
 * journey when the flags say so (2; the first time seen wins), trimmed to
 * the newest 64 on one addition in four, small enough for Redis's compact
 * encoding, and its expiry when they say so (4).
 * Steps are published only for journeys a gateway follows; an ACL that
 * forbids the registry or the channel loses only that, not the event.
 * Uses go in one LPUSH, newest first, "time purpose service channel
 * journey" each; the list gets its expiry when the push created it.
 * In cluster mode a call holds one shard's events, without their
 * citizens' keys, flags 2 and 4 and uses: those go in calls of their own.
 */
static const char  ngx_http_civicgate_batch_lua[] =
    "local n, k, now = (#ARGV - 2) / 14, 2, tonumber(ARGV[2])\n"
    "local js = {}\n"
    "for i = 1, n do js[i] = ARGV[(i - 1) * 14 + 5] end\n"
    "local w = redis.pcall('ZMSCORE', KEYS[1], unpack(js))\n"
    "if type(w) ~= 'table' or w.err then w = {} end\n"
    "for i = 1, n do\n"
    "  local a = (i - 1) * 14 + 2\n"
    "  local id = redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[1], '*',"
    " 'time', ARGV[a + 1], 'eid', ARGV[a + 2], 'journey', ARGV[a + 3],"
    " 'channel', ARGV[a + 4], 'service', ARGV[a + 5], 'method', ARGV[a + 6],"
    " 'status', ARGV[a + 7], 'latency_ms', ARGV[a + 8],"
    " 'citizen', ARGV[a + 9])\n"
    "  k = k + 1\n"
    "  local step = id .. ' ' .. ARGV[a + 1] .. ' ' .. ARGV[a + 4] .. ' '"
    " .. ARGV[a + 5] .. ' ' .. ARGV[a + 7]\n"
    "  local f = tonumber(ARGV[a + 11])\n"
    "  local len = redis.call('RPUSH', KEYS[k], step .. ' ' .. ARGV[a + 6]"
    " .. ' ' .. ARGV[a + 8] .. ' ' .. ARGV[a + 2] .. ' ' .. ARGV[a + 9])\n"
    "  if len == 1 or f % 2 == 1 then"
    " redis.call('EXPIRE', KEYS[k], ARGV[a + 10]) end\n"
    "  if len > 1100 then redis.call('LTRIM', KEYS[k], -1000, -1) end\n"
    "  k = k + 1\n"
    "  if f >= 2 then\n"
    "    if f % 4 >= 2 and redis.call('ZADD', KEYS[k], 'NX', ARGV[a + 1],"
    " ARGV[a + 3]) == 1 and string.byte(ARGV[a + 2]) % 4 == 0 then"
    " redis.call('ZREMRANGEBYRANK', KEYS[k], 0, -65) end\n"
    "    if f >= 4 then redis.call('EXPIRE', KEYS[k], ARGV[a + 10]) end\n"
    "    k = k + 1\n"
    "  end\n"
    "  if ARGV[a + 13] ~= '' then\n"
    "    local u = {}\n"
    "    for p in string.gmatch(ARGV[a + 13], '%S+') do\n"
    "      u[#u + 1] = ARGV[a + 1] .. ' ' .. p .. ' ' .. ARGV[a + 5] .. ' '"
    " .. ARGV[a + 4] .. ' ' .. ARGV[a + 3] end\n"
    "    if redis.call('LPUSH', KEYS[k], unpack(u)) == #u then"
    " redis.call('EXPIREAT', KEYS[k], ARGV[a + 14]) end\n"
    "    k = k + 1\n"
    "  end\n"
    "  if w[i] and tonumber(w[i]) >= now then"
    " redis.pcall('PUBLISH', ARGV[a + 12], step) end\n"
    "end\n"
    "return n\n";


/*
 * Cluster mode: a citizen's part of a batch, in the citizen's slot.
 * KEYS: the citizen's index, then per event with uses its data-use list
 * of the month.  ARGV per event: time, eid, journey, channel, service,
 * ttl, flags, the purposes used, when a new data-use list expires.  What
 * is done with them is what the batch script does outside a cluster.
 */
static const char  ngx_http_civicgate_citizen_lua[] =
    "local k = 2\n"
    "for a = 0, #ARGV - 1, 9 do\n"
    "  local f = tonumber(ARGV[a + 7])\n"
    "  if f % 4 >= 2 and redis.call('ZADD', KEYS[1], 'NX', ARGV[a + 1],"
    " ARGV[a + 3]) == 1 and string.byte(ARGV[a + 2]) % 4 == 0 then"
    " redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -65) end\n"
    "  if f >= 4 then redis.call('EXPIRE', KEYS[1], ARGV[a + 6]) end\n"
    "  if ARGV[a + 8] ~= '' then\n"
    "    local u = {}\n"
    "    for p in string.gmatch(ARGV[a + 8], '%S+') do\n"
    "      u[#u + 1] = ARGV[a + 1] .. ' ' .. p .. ' ' .. ARGV[a + 5] .. ' '"
    " .. ARGV[a + 4] .. ' ' .. ARGV[a + 3] end\n"
    "    if redis.call('LPUSH', KEYS[k], unpack(u)) == #u then"
    " redis.call('EXPIREAT', KEYS[k], ARGV[a + 9]) end\n"
    "    k = k + 1\n"
    "  end\n"
    "end\n"
    "return #ARGV / 9\n";


static ngx_str_t  ngx_http_civicgate_spool_name =
    ngx_string("civicgate_events");


static ngx_conf_num_bounds_t  ngx_http_civicgate_drain_inflight_bounds = {
    ngx_conf_check_num_bounds, 1, NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT_MAX
};


static ngx_conf_num_bounds_t  ngx_http_civicgate_event_shards_bounds = {
    ngx_conf_check_num_bounds, 1, NGX_HTTP_CIVICGATE_EVENT_SHARDS_MAX
};


static ngx_command_t  ngx_http_civicgate_events_commands[] = {

    { ngx_string("civicgate_event_buffer"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_civicgate_event_buffer,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_event_stream_maxlen"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_civicgate_events_conf_t, maxlen),
      NULL },

    { ngx_string("civicgate_event_shards"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_civicgate_events_conf_t, shards.n),
      &ngx_http_civicgate_event_shards_bounds },

    { ngx_string("civicgate_event_drain_inflight"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_civicgate_events_conf_t, drain_limit),
      &ngx_http_civicgate_drain_inflight_bounds },

    { ngx_string("civicgate_events"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_events_loc_conf_t, enable),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_civicgate_events_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_civicgate_events_postconfiguration, /* postconfiguration */

    ngx_http_civicgate_events_create_main_conf, /* create main conf */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_civicgate_events_create_loc_conf, /* create location conf */
    ngx_http_civicgate_events_merge_loc_conf   /* merge location conf */
};


ngx_module_t  ngx_http_civicgate_events_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_events_module_ctx, /* module context */
    ngx_http_civicgate_events_commands,    /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_civicgate_events_init_process, /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_civicgate_events_exit_process, /* exit process */
    ngx_http_civicgate_events_exit_master, /* exit master */
    NGX_MODULE_V1_PADDING
};


static char *
ngx_http_civicgate_event_buffer(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_civicgate_events_conf_t *ecf = conf;

    ssize_t     size;
    ngx_str_t  *value;

    if (ecf->buffer != NGX_CONF_UNSET_SIZE) {
        return "is duplicate";
    }

    value = cf->args->elts;

    size = ngx_parse_size(&value[1]);

    if (size == NGX_ERROR || size < (ssize_t) (8 * ngx_pagesize)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid event buffer size \"%V\", "
                           "it must be at least %uzK", &value[1],
                           8 * ngx_pagesize / 1024);
        return NGX_CONF_ERROR;
    }

    ecf->buffer = size;

    return NGX_CONF_OK;
}


/* after the http block: scripts and the spool zone, if Redis is set */

static ngx_int_t
ngx_http_civicgate_events_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_handler_pt               *h;
    ngx_http_core_main_conf_t         *cmcf;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = ngx_http_conf_get_module_main_conf(cf,
                                            ngx_http_civicgate_events_module);
    ecf->core = ngx_http_conf_get_module_main_conf(cf,
                                                   ngx_http_civicgate_module);

    /* over 10 s of what one Redis takes, 128 bytes each (docs) */
    ngx_conf_init_size_value(ecf->buffer, 64 * 1024 * 1024);
    ngx_conf_init_uint_value(ecf->maxlen, 1000000);
    ngx_conf_init_uint_value(ecf->drain_limit,
                             NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT);

    if (ecf->core->redis == NULL) {
        ngx_conf_init_uint_value(ecf->shards.n, 1);
        return NGX_OK;
    }

    /* a cluster spreads the streams over its masters */
    ecf->shards.cluster =
               (ecf->core->redis->mode == NGX_HTTP_CIVICGATE_REDIS_CLUSTER);
    ngx_conf_init_uint_value(ecf->shards.n, ecf->shards.cluster ? 16 : 1);

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_civicgate_events_log;

    if (ngx_http_civicgate_on_ready(cf, ngx_http_civicgate_events_ready)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_civicgate_events_zone(cf, ecf);
}


static ngx_int_t
ngx_http_civicgate_events_zone(ngx_conf_t *cf,
    ngx_http_civicgate_events_conf_t *ecf)
{
    ngx_http_civicgate_redis_conf_t  *rcf;

    rcf = ecf->core->redis;

    ecf->old_cycle = cf->cycle->old_cycle;

    /* a live worker has its answer by then, or its commands have failed */
    ecf->claim_ttl = 2 * (rcf->connect_timeout + rcf->timeout);

    ecf->batch_script = ngx_http_civicgate_redis_add_script(cf, rcf,
                                                ngx_http_civicgate_batch_lua);
    if (ecf->batch_script == NULL) {
        return NGX_ERROR;
    }

    if (ecf->shards.cluster) {
        ecf->citizen_script = ngx_http_civicgate_redis_add_script(cf, rcf,
                                              ngx_http_civicgate_citizen_lua);
        if (ecf->citizen_script == NULL) {
            return NGX_ERROR;
        }
    }

    /* the core's tag, as before: a reload keeps the spool */
    ecf->zone = ngx_shared_memory_add(cf, &ngx_http_civicgate_spool_name,
                                      ecf->buffer,
                                      &ngx_http_civicgate_module);
    if (ecf->zone == NULL) {
        return NGX_ERROR;
    }

    ecf->zone->init = ngx_http_civicgate_spool_init_zone;
    ecf->zone->data = ecf;

    return NGX_OK;
}


static void *
ngx_http_civicgate_events_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_events_conf_t));
    if (ecf == NULL) {
        return NULL;
    }

    ecf->buffer = NGX_CONF_UNSET_SIZE;
    ecf->maxlen = NGX_CONF_UNSET_UINT;
    ecf->shards.n = NGX_CONF_UNSET_UINT;
    ecf->drain_limit = NGX_CONF_UNSET_UINT;

    return ecf;
}


static void *
ngx_http_civicgate_events_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_events_loc_conf_t  *elcf;

    elcf = ngx_palloc(cf->pool, sizeof(ngx_http_civicgate_events_loc_conf_t));
    if (elcf == NULL) {
        return NULL;
    }

    elcf->enable = NGX_CONF_UNSET;

    return elcf;
}


static char *
ngx_http_civicgate_events_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_civicgate_events_loc_conf_t *prev = parent;
    ngx_http_civicgate_events_loc_conf_t *conf = child;

    ngx_conf_merge_value(conf->enable, prev->enable, 1);

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_civicgate_spool_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_civicgate_events_conf_t  *oecf = data;

    size_t                              size;
    ngx_slab_pool_t                    *shpool;
    ngx_http_civicgate_events_conf_t   *ecf;

    ecf = shm_zone->data;
    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;
    ecf->shpool = shpool;

    /* reload, same size: the spooled events carry over to the new workers */
    if (oecf != NULL) {
        ecf->sh = oecf->sh;
        return NGX_OK;
    }

    if (shm_zone->shm.exists) {
        ecf->sh = shpool->data;
        return NGX_OK;
    }

    /* what the slab allocator's own bookkeeping leaves, with a margin */
    size = shm_zone->shm.size / 4 * 3
           - offsetof(ngx_http_civicgate_spool_sh_t, slots);

    /* slots are written before they are read: their pages stay untouched */
    ecf->sh = ngx_slab_alloc(shpool,
                             offsetof(ngx_http_civicgate_spool_sh_t, slots)
                             + size);
    if (ecf->sh == NULL) {
        return NGX_ERROR;
    }

    ngx_memzero(ecf->sh, offsetof(ngx_http_civicgate_spool_sh_t, slots));

    ecf->sh->nslots = size / sizeof(ngx_http_civicgate_spool_slot_t);
    ecf->sh->tail = NGX_HTTP_CIVICGATE_SPOOL_BASE * ecf->sh->nslots;
    ecf->sh->next = ecf->sh->tail;
    ecf->sh->head = ecf->sh->tail;

    shpool->data = ecf->sh;

    ngx_http_civicgate_spool_carry_over(ecf, shm_zone);

    return NGX_OK;
}


/*
 * Reload with a new size: nginx creates a new zone and frees the old one
 * once the old workers are gone.  The master, which still maps the old
 * zone, copies its events; the old workers count what they spool later.
 */

static void
ngx_http_civicgate_spool_carry_over(ngx_http_civicgate_events_conf_t *ecf,
    ngx_shm_zone_t *shm_zone)
{
    uint64_t                        n, kept, dropped, i;
    ngx_slab_pool_t                *oshpool;
    ngx_http_civicgate_spool_sh_t  *osh, *sh;

    oshpool = ngx_http_civicgate_spool_old_zone(ecf, shm_zone);
    if (oshpool == NULL || oshpool->data == NULL) {
        return;
    }

    osh = oshpool->data;
    sh = ecf->sh;

    ngx_shmtx_lock(&oshpool->mutex);

    n = osh->head - osh->tail;
    kept = ngx_http_civicgate_spool_whole(osh, osh->tail,
                                          ngx_min(n, sh->nslots));

    for (i = 0; i < kept; i++) {
        sh->slots[(sh->tail + i) % sh->nslots] =
                                osh->slots[(osh->tail + i) % osh->nslots];
    }

    sh->head = sh->tail + kept;
    osh->moved = osh->head + 1;

    /* in events, not slots */
    dropped = ngx_http_civicgate_spool_count(osh, osh->tail + kept, n - kept);
    kept = ngx_http_civicgate_spool_count(osh, osh->tail, kept);

    ngx_shmtx_unlock(&oshpool->mutex);

    ngx_log_error((dropped ? NGX_LOG_WARN : NGX_LOG_NOTICE),
                  ngx_cycle->log, 0,
                  "civicgate: event buffer resized, %uL journey events "
                  "carried over, %uL dropped", kept, dropped);
}


/* the previous cycle's spool zone, still mapped in the master */

static ngx_slab_pool_t *
ngx_http_civicgate_spool_old_zone(ngx_http_civicgate_events_conf_t *ecf,
    ngx_shm_zone_t *shm_zone)
{
    ngx_uint_t        k;
    ngx_shm_zone_t   *zone;
    ngx_list_part_t  *part;

    if (ecf->old_cycle == NULL
        || ecf->old_cycle->shared_memory.part.elts == NULL)
    {
        return NULL;
    }

    part = &ecf->old_cycle->shared_memory.part;
    zone = part->elts;

    for (k = 0; /* void */ ; k++) {

        if (k >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }

            part = part->next;
            zone = part->elts;
            k = 0;
        }

        if (zone[k].tag == shm_zone->tag
            && zone[k].shm.addr != NULL
            && zone[k].shm.name.len == shm_zone->shm.name.len
            && ngx_strncmp(zone[k].shm.name.data, shm_zone->shm.name.data,
                           shm_zone->shm.name.len) == 0)
        {
            return (ngx_slab_pool_t *) zone[k].shm.addr;
        }
    }
}


static ngx_int_t
ngx_http_civicgate_events_init_process(ngx_cycle_t *cycle)
{
    ngx_core_conf_t                   *ccf;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = ngx_http_cycle_get_module_main_conf(cycle,
                                            ngx_http_civicgate_events_module);

    if (ecf == NULL || ecf->zone == NULL
        || (ngx_process != NGX_PROCESS_WORKER
            && ngx_process != NGX_PROCESS_SINGLE))
    {
        return NGX_OK;
    }

    /* every worker drains, each up to its share of the in-flight limit */
    ccf = (ngx_core_conf_t *) ngx_get_conf(cycle->conf_ctx, ngx_core_module);
    /* room for the widest event at least */
    ecf->drain_share = ngx_max(ecf->drain_limit
                               / ngx_max(ccf->worker_processes, 1),
                               NGX_HTTP_CIVICGATE_SLOTS_MAX);

    ecf->seen = ngx_calloc((NGX_HTTP_CIVICGATE_SEEN
                            + NGX_HTTP_CIVICGATE_SEEN_CITIZENS)
                           * sizeof(ngx_http_civicgate_seen_t), cycle->log);
    ecf->scratch = ngx_alloc(NGX_HTTP_CIVICGATE_BATCH_MAX
                             * NGX_HTTP_CIVICGATE_BATCH_SCRATCH
                             + 3 * NGX_INT64_LEN
                             + NGX_HTTP_CIVICGATE_REDIS_KEY_MAX, cycle->log);
    ecf->argv = ngx_alloc((NGX_HTTP_CIVICGATE_BATCH_ARGS
                           + NGX_HTTP_CIVICGATE_BATCH_MAX
                             * NGX_HTTP_CIVICGATE_EVENT_ARGS)
                          * sizeof(char *), cycle->log);
    ecf->lens = ngx_alloc((NGX_HTTP_CIVICGATE_BATCH_ARGS
                           + NGX_HTTP_CIVICGATE_BATCH_MAX
                             * NGX_HTTP_CIVICGATE_EVENT_ARGS)
                          * sizeof(size_t), cycle->log);

    ecf->sent = ngx_alloc(NGX_HTTP_CIVICGATE_BATCH_MAX, cycle->log);

    if (ecf->seen == NULL || ecf->scratch == NULL || ecf->argv == NULL
        || ecf->lens == NULL || ecf->sent == NULL)
    {
        return NGX_ERROR;
    }

    ecf->seen_citizens = ecf->seen + NGX_HTTP_CIVICGATE_SEEN;

    ecf->flush_timer.handler = ngx_http_civicgate_spool_timer;
    ecf->flush_timer.data = ecf;
    ecf->flush_timer.log = cycle->log;
    ecf->flush_timer.cancelable = 1;

    ngx_add_timer(&ecf->flush_timer, NGX_HTTP_CIVICGATE_SPOOL_FLUSH);

    /* armed only while a batch waits, at most a few ms: exit waits for it */
    ecf->batch_timer.handler = ngx_http_civicgate_batch_timer;
    ecf->batch_timer.data = ecf;
    ecf->batch_timer.log = cycle->log;

    ngx_queue_init(&ecf->back);

    ecf->running = 1;

    return NGX_OK;
}


/*
 * The core destroyed the client first: its commands in flight have failed
 * and their claims are back in the spool for the next worker.  A batch
 * still collecting is spooled for it too.
 */

static void
ngx_http_civicgate_events_exit_process(ngx_cycle_t *cycle)
{
    uint64_t                           lost;
    ngx_uint_t                         i;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_events_conf_t  *ecf;
    ngx_http_civicgate_spool_claim_t  *c;
    ngx_http_civicgate_event_batch_t  *b;

    ecf = ngx_http_cycle_get_module_main_conf(cycle,
                                            ngx_http_civicgate_events_module);
    if (ecf == NULL || !ecf->running) {
        return;
    }

    b = ecf->collect;

    if (b != NULL) {
        ecf->collect = NULL;

        for (i = 0; i < b->n; i++) {
            ngx_http_civicgate_spool_append(ecf, &b->events[i]);
        }

        ngx_free(b);
    }

    if (ecf->batch_timer.timer_set) {
        ngx_del_timer(&ecf->batch_timer);
    }

    sh = ecf->sh;
    lost = 0;

    ngx_shmtx_lock(&ecf->shpool->mutex);

    for (i = 0; i < sh->nclaims; i++) {
        c = &sh->claims[(sh->first + i) % NGX_HTTP_CIVICGATE_SPOOL_CLAIMS];

        if (c->pid == ngx_pid && !c->done) {
            ngx_http_civicgate_spool_release(sh, c, 0);
        }
    }

    if (sh->moved && sh->head + 1 > sh->moved) {
        lost = ngx_http_civicgate_spool_count(sh, sh->moved - 1,
                                              sh->head + 1 - sh->moved);
        sh->moved = sh->head + 1;
    }

    ngx_shmtx_unlock(&ecf->shpool->mutex);

    ngx_http_civicgate_spool_drops(ecf, 1);

    if (lost) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "civicgate: event buffer resized, %uL journey events "
                      "spooled since then discarded", lost);
    }
}


/* the master, after its workers: what is still spooled is lost now */

static void
ngx_http_civicgate_events_exit_master(ngx_cycle_t *cycle)
{
    uint64_t                           n;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = ngx_http_cycle_get_module_main_conf(cycle,
                                            ngx_http_civicgate_events_module);
    if (ecf == NULL || ecf->sh == NULL) {
        return;
    }

    sh = ecf->sh;

    ngx_http_civicgate_spool_drops(ecf, 1);

    ngx_shmtx_lock(&ecf->shpool->mutex);
    n = ngx_http_civicgate_spool_count(sh, sh->tail, sh->head - sh->tail);
    ngx_shmtx_unlock(&ecf->shpool->mutex);

    if (n) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "civicgate: nginx exiting, %uL journey events in the "
                      "spool discarded", n);
    }
}


/* log phase: never delays the response, which is already sent */

static ngx_int_t
ngx_http_civicgate_events_log(ngx_http_request_t *r)
{
    ngx_http_civicgate_event_t             ev;
    ngx_http_civicgate_journey_t          *j;
    ngx_http_civicgate_events_conf_t      *ecf;
    ngx_http_civicgate_events_loc_conf_t  *elcf;

    ecf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_events_module);
    elcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_events_module);

    if (r != r->main || !elcf->enable || !ecf->running) {
        return NGX_OK;
    }

    /* a journey the response did not carry is not recorded */
    j = ngx_http_civicgate_journey_get(r);

    if (j == NULL || !j->journey_on) {
        return NGX_OK;
    }

    ngx_http_civicgate_event_fill(r, j, &ev);
    ngx_http_civicgate_event_id(ecf, &ev);
    ngx_http_civicgate_event_seen(ecf, &ev);

    /*
     * While events wait in the spool, new ones queue behind them; and when
     * Redis falls behind, they wait there too rather than pile up on the
     * connection until the oldest times out.  Failed batches wait to go
     * back in front of the spool: new events go behind them, and so does
     * the batch being collected, sent first.
     */
    if (ecf->sh->head != ecf->sh->tail
        || ecf->nback
        || !ngx_http_civicgate_redis_ready(ecf->core->client)
        || ecf->core->client->nsent >= NGX_HTTP_CIVICGATE_EVENTS_WINDOW
        || ecf->direct >= NGX_HTTP_CIVICGATE_BATCH_WINDOW
        || ngx_http_civicgate_batch_add(ecf, &ev) != NGX_OK)
    {
        if (ecf->collect) {
            ngx_http_civicgate_batch_flush(ecf);
        }

        ngx_http_civicgate_spool_append(ecf, &ev);
    }

    return NGX_OK;
}


static void
ngx_http_civicgate_event_fill(ngx_http_request_t *r,
    ngx_http_civicgate_journey_t *j, ngx_http_civicgate_event_t *ev)
{
    ngx_str_t                       channel;
    ngx_time_t                     *tp;
    ngx_http_upstream_state_t      *state;
    ngx_http_civicgate_loc_conf_t  *cglcf;

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_module);

    tp = ngx_timeofday();
    ev->time = (uint64_t) tp->sec * 1000 + tp->msec;
    ev->ttl = (uint32_t) ngx_http_civicgate_journey_ttl(r);
    ev->status = (uint16_t) r->headers_out.status;
    ev->latency = -1;
    ev->flags = 0;
    ev->citizen_len = 0;

    if (r->upstream_states && r->upstream_states->nelts) {
        state = r->upstream_states->elts;
        ev->latency = state[r->upstream_states->nelts - 1].response_time;
    }

    ngx_memcpy(ev->journey, j->journey_id, NGX_HTTP_CIVICGATE_JID_LEN);

    j = ngx_http_civicgate_journey_citizen(r);

    if (j != NULL && j->citizen_set) {
        ngx_memcpy(ev->citizen, j->citizen, NGX_HTTP_CIVICGATE_PSEUDONYM_LEN);
        ev->citizen_len = NGX_HTTP_CIVICGATE_PSEUDONYM_LEN;
    }

    /* on an error, the channel is unknown */
    j = ngx_http_civicgate_journey_channel(r);
    ngx_http_civicgate_journey_channel_name(r, j, &channel);
    ev->channel_len = (u_char) channel.len;
    ngx_memcpy(ev->channel, channel.data, channel.len);

    ev->service_len = (u_char) cglcf->service.len;
    ngx_memcpy(ev->service, cglcf->service.data, cglcf->service.len);

    ev->method_len = (u_char) ngx_min(r->method_name.len,
                                      NGX_HTTP_CIVICGATE_METHOD_MAX);
    ngx_memcpy(ev->method, r->method_name.data, ev->method_len);

    ngx_http_civicgate_event_uses(r, ev);
}


/* the purposes its consent checks passed, for the citizen's data-use log */

static void
ngx_http_civicgate_event_uses(ngx_http_request_t *r,
    ngx_http_civicgate_event_t *ev)
{
    u_char                        *p;
    uint32_t                       retention;
    ngx_uint_t                     i;
    ngx_http_civicgate_journey_t  *j;

    ev->uses_len = 0;

    j = ngx_http_civicgate_journey_get(r);

    if (j == NULL || j->nuses == 0 || ev->citizen_len == 0) {
        return;
    }

    retention = (uint32_t) j->uses_retention;
    p = ngx_cpymem(ev->uses, &retention, sizeof(uint32_t));

    for (i = 0; i < j->nuses; i++) {
        if (i) {
            *p++ = ' ';
        }

        p = ngx_cpymem(p, j->uses[i]->data,
                       ngx_min(j->uses[i]->len,
                               NGX_HTTP_CIVICGATE_SERVICE_MAX));
    }

    ev->uses_len = (uint16_t) (p - ev->uses);
}


/* random event IDs, drawn 64 at a time */

static void
ngx_http_civicgate_event_id(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_t *ev)
{
    if (ecf->nrandom < sizeof(ev->eid)) {
        if (ngx_http_civicgate_random(ecf->random, sizeof(ecf->random)) != 0)
        {
            /* unique still, if not random: the time and a counter */
            ngx_memcpy(ev->eid, &ev->time, sizeof(ev->eid) - 2);
            ngx_memcpy(ev->eid + sizeof(ev->eid) - 2, &ecf->sequence, 2);
            ecf->sequence++;
            return;
        }

        ecf->nrandom = sizeof(ecf->random);
    }

    ecf->nrandom -= sizeof(ev->eid);
    ngx_memcpy(ev->eid, &ecf->random[ecf->nrandom], sizeof(ev->eid));
}


/*
 * What Redis does besides writing the event, from what this worker
 * remembers: a journey it has not seen, or not refreshed for ttl / 16,
 * gets its expiry refreshed and is added to its citizen's index (if not
 * there yet); so is a journey seen with a citizen it was not seen with.
 * The index's own expiry is refreshed when this worker has not done so
 * for ttl / 16.  Forgetting costs a refresh, never a missed one.
 */

static void
ngx_http_civicgate_event_seen(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_t *ev)
{
    uint32_t                    journey, check, citizen;
    ngx_msec_t                  every;
    ngx_http_civicgate_seen_t  *s;

    journey = ngx_crc32_short(ev->journey, NGX_HTTP_CIVICGATE_JID_LEN) | 1;
    check = ngx_murmur_hash2(ev->journey, NGX_HTTP_CIVICGATE_JID_LEN);
    citizen = ev->citizen_len
              ? ngx_crc32_short(ev->citizen, ev->citizen_len) | 1 : 0;

    s = &ecf->seen[check & (NGX_HTTP_CIVICGATE_SEEN - 1)];
    every = (ngx_msec_t) ev->ttl * 1000 / NGX_HTTP_CIVICGATE_SEEN_REFRESH;

    if (s->journey != journey || s->check != check || s->ttl != ev->ttl
        || ngx_current_msec - s->refreshed >= every)
    {
        s->journey = journey;
        s->check = check;
        s->ttl = ev->ttl;
        s->refreshed = ngx_current_msec;
        s->citizen = 0;
        ev->flags = NGX_HTTP_CIVICGATE_EVENT_EXPIRE;
    }

    if (citizen == 0
        || (s->citizen == citizen
            && !(ev->flags & NGX_HTTP_CIVICGATE_EVENT_EXPIRE)))
    {
        return;
    }

    s->citizen = citizen;
    ev->flags |= NGX_HTTP_CIVICGATE_EVENT_INDEX;

    check = ngx_murmur_hash2(ev->citizen, ev->citizen_len);
    s = &ecf->seen_citizens[check & (NGX_HTTP_CIVICGATE_SEEN_CITIZENS - 1)];

    if (s->journey != citizen || s->check != check || s->ttl != ev->ttl
        || ngx_current_msec - s->refreshed >= every)
    {
        s->journey = citizen;
        s->check = check;
        s->ttl = ev->ttl;
        s->refreshed = ngx_current_msec;
        ev->flags |= NGX_HTTP_CIVICGATE_EVENT_INDEX_TTL;
    }
}


/* room for n events and their calls: in a cluster, per shard and citizen */

static ngx_http_civicgate_event_batch_t *
ngx_http_civicgate_batch_alloc(ngx_http_civicgate_events_conf_t *ecf,
    ngx_uint_t n)
{
    size_t                             size;
    ngx_uint_t                         calls;
    ngx_http_civicgate_event_batch_t  *b;

    calls = ecf->shards.cluster ? 2 * n : 1;
    size = offsetof(ngx_http_civicgate_event_batch_t, events)
           + n * sizeof(ngx_http_civicgate_event_t);

    b = ngx_alloc(size + calls * sizeof(ngx_http_civicgate_batch_call_t)
                  + n * sizeof(uint16_t), ngx_cycle->log);
    if (b == NULL) {
        return NULL;
    }

    b->ecf = ecf;
    b->call = (ngx_http_civicgate_batch_call_t *) ((u_char *) b + size);
    b->shard = (uint16_t *) &b->call[calls];

    return b;
}


/* the event joins the worker's batch, sent when full or after a while */

static ngx_int_t
ngx_http_civicgate_batch_add(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_t *ev)
{
    ngx_http_civicgate_event_batch_t  *b;

    b = ecf->collect;

    if (b == NULL) {
        b = ngx_http_civicgate_batch_alloc(ecf, NGX_HTTP_CIVICGATE_BATCH_MAX);
        if (b == NULL) {
            return NGX_ERROR;
        }

        b->slots = 0;
        b->n = 0;
        b->unsent = 0;
        ecf->collect = b;

        ngx_add_timer(&ecf->batch_timer, NGX_HTTP_CIVICGATE_BATCH_DELAY);
    }

    b->events[b->n++] = *ev;

    if (b->n == NGX_HTTP_CIVICGATE_BATCH_MAX) {
        ngx_http_civicgate_batch_flush(ecf);
    }

    return NGX_OK;
}


/*
 * A batch goes to Redis directly only while nothing of this worker waits
 * to be written before it.  Otherwise its events are newer than what the
 * spool holds of this worker: they go behind it, or, while batches are in
 * flight, behind those of them that fail.
 */

static void
ngx_http_civicgate_batch_flush(ngx_http_civicgate_events_conf_t *ecf)
{
    ngx_uint_t                         i;
    ngx_http_civicgate_event_batch_t  *b;

    b = ecf->collect;
    ecf->collect = NULL;

    if (ecf->batch_timer.timer_set) {
        ngx_del_timer(&ecf->batch_timer);
    }

    if (b == NULL) {
        return;
    }

    if (ecf->nback == 0 && ecf->sh->head == ecf->sh->tail) {
        ecf->direct++;

        if (ngx_http_civicgate_batch_send(b) == NGX_OK) {
            return;
        }

        ecf->direct--;
    }

    if (ecf->direct) {
        b->unsent = 1;
        ngx_queue_insert_tail(&ecf->back, &b->queue);
        ecf->nback += b->n;
        return;
    }

    for (i = 0; i < b->n; i++) {
        ngx_http_civicgate_spool_append(ecf, &b->events[i]);
    }

    ngx_free(b);
}


static void
ngx_http_civicgate_batch_timer(ngx_event_t *ev)
{
    ngx_http_civicgate_batch_flush(ev->data);
}


/*
 * One EVALSHA for the whole batch; in cluster mode one per shard, then
 * one per citizen.  The arguments are copied when sent.  The batch holds
 * a call of its own while they go out, in case one is answered at once;
 * NGX_ERROR if none went out.
 */

static ngx_int_t
ngx_http_civicgate_batch_send(ngx_http_civicgate_event_batch_t *b)
{
    ngx_int_t                          rc;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = b->ecf;

    if (!ngx_http_civicgate_redis_ready(ecf->core->client)) {
        return NGX_DECLINED;
    }

    b->pending = 1;
    b->calls = 0;
    b->failed = 0;

    if (ecf->shards.cluster) {
        rc = ngx_http_civicgate_batch_split(b);

    } else {
        rc = ngx_http_civicgate_batch_call(b, 0);
    }

    if (b->calls == 0) {
        return NGX_ERROR;
    }

    if (rc != NGX_OK) {
        /* sent in part: the replies settle it as failed */
        b->failed = 1;
    }

    if (--b->pending == 0) {
        ngx_http_civicgate_batch_done(b);
    }

    return NGX_OK;
}


/* cluster mode: each call's keys in one slot, so a shard's or a citizen's */

static ngx_int_t
ngx_http_civicgate_batch_split(ngx_http_civicgate_event_batch_t *b)
{
    ngx_uint_t                         i;
    ngx_http_civicgate_event_t        *ev;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = b->ecf;

    /* the stream part of an event already in its stream is not sent */
    for (i = 0; i < b->n; i++) {
        b->shard[i] = (uint16_t) ngx_http_civicgate_shard_of(&ecf->shards,
                                                  b->events[i].journey,
                                                  NGX_HTTP_CIVICGATE_JID_LEN);
        ecf->sent[i] = (b->events[i].flags & NGX_HTTP_CIVICGATE_EVENT_STREAMED)
                       ? NGX_HTTP_CIVICGATE_PART_SHARD : 0;
    }

    for (i = 0; i < b->n; i++) {
        if (!(ecf->sent[i] & NGX_HTTP_CIVICGATE_PART_SHARD)
            && ngx_http_civicgate_batch_call(b, i) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    for (i = 0; i < b->n; i++) {
        ev = &b->events[i];

        if (ngx_http_civicgate_event_citizen_part(ev)
            && !(ecf->sent[i] & NGX_HTTP_CIVICGATE_PART_CITIZEN)
            && ngx_http_civicgate_citizen_call(b, i) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/*
 * The batch script for the events from "from" on: all of them, or in
 * cluster mode those of its shard.
 */

static ngx_int_t
ngx_http_civicgate_batch_call(ngx_http_civicgate_event_batch_t *b,
    ngx_uint_t from)
{
    u_char                            *p;
    ngx_uint_t                         i, keys, k, a, shard;
    ngx_time_t                        *tp;
    ngx_http_civicgate_event_t        *ev;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = b->ecf;
    shard = ecf->shards.cluster ? b->shard[from] : 0;

    /* the watch registry; a stream and a timeline per event... */
    keys = 1;

    for (i = from; i < b->n; i++) {
        ev = &b->events[i];

        if (ngx_http_civicgate_batch_member(b, shard, i)) {
            keys += 2;

            /* ...and outside a cluster, its citizen's keys */
            if (!ecf->shards.cluster) {
                keys += (ev->flags & NGX_HTTP_CIVICGATE_EVENT_INDEX) != 0;
                keys += (ev->uses_len != 0);
            }
        }
    }

    p = ngx_http_civicgate_batch_head(ecf, ecf->batch_script, keys,
                                      ecf->scratch);

    ecf->argv[3] = (const char *) p;
    p = ngx_http_civicgate_key_watched(p, &ecf->shards, shard);
    ecf->lens[3] = p - (u_char *) ecf->argv[3];

    k = 4;
    a = 3 + keys;

    ecf->argv[a] = (const char *) p;
    p = ngx_sprintf(p, "%ui", ecf->maxlen);
    ecf->lens[a] = p - (u_char *) ecf->argv[a];
    a++;

    tp = ngx_timeofday();
    ecf->argv[a] = (const char *) p;
    p = ngx_sprintf(p, "%uL", (uint64_t) tp->sec * 1000 + tp->msec);
    ecf->lens[a] = p - (u_char *) ecf->argv[a];
    a++;

    for (i = from; i < b->n; i++) {
        if (ngx_http_civicgate_batch_member(b, shard, i)) {
            p = ngx_http_civicgate_batch_event_args(ecf, &b->events[i], p,
                                                    &k, &a);
            ecf->sent[i] |= NGX_HTTP_CIVICGATE_PART_SHARD;
        }
    }

    return ngx_http_civicgate_batch_evalsha(b, a, from,
                                            NGX_HTTP_CIVICGATE_PART_SHARD);
}


/* EVALSHA, the script, the number of keys; the keys follow */

static u_char *
ngx_http_civicgate_batch_head(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_redis_script_t *script, ngx_uint_t keys, u_char *p)
{
    ecf->argv[0] = "EVALSHA";
    ecf->lens[0] = 7;
    ecf->argv[1] = (const char *) script->sha;
    ecf->lens[1] = 40;
    ecf->argv[2] = (const char *) p;
    ecf->lens[2] = ngx_sprintf(p, "%ui", keys) - p;

    return p + ecf->lens[2];
}


static ngx_int_t
ngx_http_civicgate_batch_evalsha(ngx_http_civicgate_event_batch_t *b,
    ngx_uint_t argc, ngx_uint_t from, ngx_uint_t part)
{
    ngx_http_civicgate_batch_call_t   *call;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = b->ecf;

    /* the reply says which events' part it acknowledges */
    call = &b->call[b->calls];
    call->batch = b;
    call->from = from;
    call->part = part;

    if (ngx_http_civicgate_redis_send(ecf->core->client, (int) argc,
                                      ecf->argv, ecf->lens,
                                      ngx_http_civicgate_batch_reply, call)
        == NULL)
    {
        return NGX_ERROR;
    }

    b->pending++;
    b->calls++;

    return NGX_OK;
}


/*
 * An event's keys, written at p: its shard's stream, its timeline and,
 * outside a cluster, its citizen's index and data-use list if it writes
 * them.
 */

static u_char *
ngx_http_civicgate_batch_event_keys(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_t *ev, u_char *p, ngx_uint_t *k)
{
    ngx_uint_t  shard;

#define key(f)                                                                \
    ecf->argv[*k] = (const char *) p;                                         \
    p = f;                                                                    \
    ecf->lens[*k] = p - (u_char *) ecf->argv[*k];                             \
    (*k)++

    shard = ngx_http_civicgate_shard_of(&ecf->shards, ev->journey,
                                        NGX_HTTP_CIVICGATE_JID_LEN);

    key(ngx_http_civicgate_key_stream(p, &ecf->shards, shard));
    key(ngx_http_civicgate_key_timeline(p, &ecf->shards, shard, ev->journey,
                                        NGX_HTTP_CIVICGATE_JID_LEN));

    if (ecf->shards.cluster) {
        return p;
    }

    if (ev->flags & NGX_HTTP_CIVICGATE_EVENT_INDEX) {
        key(ngx_http_civicgate_key_citizen(p, ev->citizen, ev->citizen_len,
                                           NGX_HTTP_CIVICGATE_KEY_JOURNEYS));
    }

    if (ev->uses_len) {
        key(ngx_http_civicgate_key_uses(p, ev->citizen, ev->citizen_len,
                                     ngx_http_civicgate_month_of(ev->time)));
    }

#undef key

    return p;
}


/* the argument builders below: argv, lens, *a and p are theirs */
#define arg(d, l)  argv[*a] = (const char *) (d); lens[(*a)++] = (l)
#define fmt(...)                                                              \
    argv[*a] = (const char *) p;                                              \
    p = ngx_sprintf(p, __VA_ARGS__);                                          \
    lens[*a] = p - (u_char *) argv[*a];                                       \
    (*a)++


/*
 * An event's keys and arguments, in the script's order; numbers, hex and
 * keys are written at p, the rest points into the event.  In cluster
 * mode its citizen's part is left to a call of its own.
 */

static u_char *
ngx_http_civicgate_batch_event_args(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_t *ev, u_char *p, ngx_uint_t *k, ngx_uint_t *a)
{
    u_char        flags;
    const char  **argv;
    size_t       *lens;

    argv = ecf->argv;
    lens = ecf->lens;

    p = ngx_http_civicgate_batch_event_keys(ecf, ev, p, k);

    flags = ev->flags & (ecf->shards.cluster ? NGX_HTTP_CIVICGATE_EVENT_EXPIRE
                                             : NGX_HTTP_CIVICGATE_EVENT_TOUCH);

    fmt("%uL", ev->time);
    ngx_http_civicgate_hex(ev->eid, sizeof(ev->eid), p);
    arg(p, 2 * sizeof(ev->eid));
    p += 2 * sizeof(ev->eid);
    arg(ev->journey, NGX_HTTP_CIVICGATE_JID_LEN);
    arg(ev->channel, ev->channel_len);
    arg(ev->service, ev->service_len);
    arg(ev->method, ev->method_len);
    fmt("%ui", (ngx_uint_t) ev->status);

    if (ev->latency >= 0) {
        fmt("%L", ev->latency);

    } else {
        arg("", 0);
    }

    arg(ev->citizen, ev->citizen_len);
    fmt("%uD", ev->ttl);
    fmt("%ui", (ngx_uint_t) flags);

    argv[*a] = (const char *) p;
    p = ngx_http_civicgate_key_journey(p, ev->journey,
                                       NGX_HTTP_CIVICGATE_JID_LEN,
                                       NGX_HTTP_CIVICGATE_KEY_STEPS);
    lens[*a] = p - (u_char *) argv[*a];
    (*a)++;

    if (ecf->shards.cluster) {
        arg("", 0);
        arg("0", 1);

    } else {
        p = ngx_http_civicgate_batch_uses_args(ev, p, argv, lens, a);
    }

    return p;
}


/*
 * Cluster mode: the citizen script for the citizen of the event at
 * "from", with every event of the batch that writes that citizen's keys.
 */

static ngx_int_t
ngx_http_civicgate_citizen_call(ngx_http_civicgate_event_batch_t *b,
    ngx_uint_t from)
{
    u_char                            *p;
    ngx_uint_t                         i, keys, k, a;
    ngx_http_civicgate_event_t        *first, *ev;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = b->ecf;
    first = &b->events[from];

    /* the index; the month's data-use list of each event with uses */
    keys = 1;

    for (i = from; i < b->n; i++) {
        ev = &b->events[i];
        keys += (ngx_http_civicgate_citizen_member(first, ev)
                 && ev->uses_len != 0);
    }

    p = ngx_http_civicgate_batch_head(ecf, ecf->citizen_script, keys,
                                      ecf->scratch);

    ecf->argv[3] = (const char *) p;
    p = ngx_http_civicgate_key_citizen(p, first->citizen, first->citizen_len,
                                       NGX_HTTP_CIVICGATE_KEY_JOURNEYS);
    ecf->lens[3] = p - (u_char *) ecf->argv[3];

    k = 4;
    a = 3 + keys;

    for (i = from; i < b->n; i++) {
        ev = &b->events[i];

        if (!ngx_http_civicgate_citizen_member(first, ev)) {
            continue;
        }

        if (ev->uses_len) {
            ecf->argv[k] = (const char *) p;
            p = ngx_http_civicgate_key_uses(p, ev->citizen, ev->citizen_len,
                                       ngx_http_civicgate_month_of(ev->time));
            ecf->lens[k] = p - (u_char *) ecf->argv[k];
            k++;
        }

        p = ngx_http_civicgate_citizen_event_args(ecf, ev, p, &a);
        ecf->sent[i] |= NGX_HTTP_CIVICGATE_PART_CITIZEN;
    }

    return ngx_http_civicgate_batch_evalsha(b, a, from,
                                            NGX_HTTP_CIVICGATE_PART_CITIZEN);
}


static ngx_uint_t
ngx_http_civicgate_citizen_member(ngx_http_civicgate_event_t *first,
    ngx_http_civicgate_event_t *ev)
{
    return ngx_http_civicgate_event_citizen_part(ev)
           && ev->citizen_len == first->citizen_len
           && ngx_memcmp(ev->citizen, first->citizen, ev->citizen_len) == 0;
}


/* the citizen script's arguments of an event, in its order */

static u_char *
ngx_http_civicgate_citizen_event_args(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_t *ev, u_char *p, ngx_uint_t *a)
{
    const char  **argv;
    size_t       *lens;

    argv = ecf->argv;
    lens = ecf->lens;

    fmt("%uL", ev->time);
    ngx_http_civicgate_hex(ev->eid, sizeof(ev->eid), p);
    arg(p, 2 * sizeof(ev->eid));
    p += 2 * sizeof(ev->eid);
    arg(ev->journey, NGX_HTTP_CIVICGATE_JID_LEN);
    arg(ev->channel, ev->channel_len);
    arg(ev->service, ev->service_len);
    fmt("%uD", ev->ttl);
    fmt("%ui", (ngx_uint_t) (ev->flags
                             & (NGX_HTTP_CIVICGATE_EVENT_INDEX
                                | NGX_HTTP_CIVICGATE_EVENT_INDEX_TTL)));

#undef arg
#undef fmt

    return ngx_http_civicgate_batch_uses_args(ev, p, argv, lens, a);
}


/*
 * The purposes, and when the month's data-use list expires: the
 * retention after the end of the event's month.
 */

static u_char *
ngx_http_civicgate_batch_uses_args(ngx_http_civicgate_event_t *ev, u_char *p,
    const char **argv, size_t *lens, ngx_uint_t *a)
{
    uint32_t  retention;

    if (ev->uses_len == 0) {
        argv[*a] = "";
        lens[(*a)++] = 0;
        argv[*a] = "0";
        lens[(*a)++] = 1;
        return p;
    }

    ngx_memcpy(&retention, ev->uses, sizeof(uint32_t));

    argv[*a] = (const char *) ev->uses + sizeof(uint32_t);
    lens[(*a)++] = ev->uses_len - sizeof(uint32_t);

    argv[*a] = (const char *) p;
    p = ngx_sprintf(p, "%T", ngx_http_civicgate_month_end(
                                 ngx_http_civicgate_month_of(ev->time))
                             + (time_t) retention);
    lens[*a] = p - (u_char *) argv[*a];
    (*a)++;

    return p;
}


/* a call's reply; the last one decides: written, or back to the spool */

static void
ngx_http_civicgate_batch_reply(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_http_civicgate_batch_call_t   *call = cmd->data;

    ngx_http_civicgate_event_batch_t  *b;

    b = call->batch;

    if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
        b->failed = 1;

        if (reply != NULL) {
            ngx_http_civicgate_event_refused(b->ecf, cmd, reply);
        }

    } else if (b->ecf->shards.cluster) {
        ngx_http_civicgate_batch_acked(b, call);
    }

    if (--b->pending == 0) {
        ngx_http_civicgate_batch_done(b);
    }
}


/*
 * Cluster mode: the call's part of its events is written, and is not
 * sent again if the batch fails.  Its events are those it was the first
 * call for: the shard's, or the citizen's, from its first event on.
 */

static void
ngx_http_civicgate_batch_acked(ngx_http_civicgate_event_batch_t *b,
    ngx_http_civicgate_batch_call_t *call)
{
    ngx_uint_t                   i;
    ngx_http_civicgate_event_t  *first, *ev;

    first = &b->events[call->from];

    for (i = call->from; i < b->n; i++) {
        ev = &b->events[i];

        if (call->part == NGX_HTTP_CIVICGATE_PART_SHARD) {
            if (b->shard[i] == b->shard[call->from]) {
                ev->flags |= NGX_HTTP_CIVICGATE_EVENT_STREAMED;
            }

        } else if (ngx_http_civicgate_citizen_member(first, ev)) {
            ev->flags &= ~(NGX_HTTP_CIVICGATE_EVENT_INDEX
                           |NGX_HTTP_CIVICGATE_EVENT_INDEX_TTL);
            ev->uses_len = 0;
        }
    }
}


/* a failed batch's events written in full count as written */

static void
ngx_http_civicgate_batch_done(ngx_http_civicgate_event_batch_t *b)
{
    ngx_uint_t                         i, written;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = b->ecf;
    written = b->n;

    if (b->failed) {
        written = 0;

        for (i = 0; i < b->n; i++) {
            written += ngx_http_civicgate_event_written(&b->events[i]);
        }

        ngx_http_civicgate_metrics_add(ecf->core->metrics,
                                       ecf->core->metrics->events,
                                       NGX_HTTP_CIVICGATE_EVENTS_FAILED,
                                       b->n - written);
    }

    ngx_http_civicgate_metrics_add(ecf->core->metrics,
                                   ecf->core->metrics->events,
                                   NGX_HTTP_CIVICGATE_EVENTS_WRITTEN,
                                   written);

    if (b->slots) {
        ngx_http_civicgate_spool_complete(b, b->failed);
        return;
    }

    ngx_http_civicgate_batch_settled(ecf, b, b->failed);
}


/*
 * A batch sent directly is answered.  Those that failed are kept, in the
 * order their replies came, which is the order they were logged; once no
 * other is in flight they go back in front of the spool, ahead of what
 * this worker spooled meanwhile.
 */

static void
ngx_http_civicgate_batch_settled(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_batch_t *b, ngx_uint_t failed)
{
    ngx_queue_t                       *q;
    ngx_http_civicgate_event_batch_t  *last;

    ecf->direct--;

    if (failed) {
        ngx_http_civicgate_batch_keep(b);
    }

    if (failed && b->n) {
        /* in the order sent, ahead of the batches never sent */
        q = ngx_queue_last(&ecf->back);

        while (q != ngx_queue_sentinel(&ecf->back)) {
            last = ngx_queue_data(q, ngx_http_civicgate_event_batch_t, queue);
            if (!last->unsent) {
                break;
            }

            q = ngx_queue_prev(q);
        }

        b->unsent = 0;
        ngx_queue_insert_after(q, &b->queue);
        ecf->nback += b->n;

    } else {
        ngx_free(b);
    }

    if (ecf->direct == 0 && ecf->nback) {
        ngx_http_civicgate_spool_return(ecf);
    }
}


/* a failed batch keeps, in order, the events with a part left to write */

static void
ngx_http_civicgate_batch_keep(ngx_http_civicgate_event_batch_t *b)
{
    ngx_uint_t  i, n;

    n = 0;

    for (i = 0; i < b->n; i++) {
        if (!ngx_http_civicgate_event_written(&b->events[i])) {
            if (n != i) {
                b->events[n] = b->events[i];
            }

            n++;
        }
    }

    b->n = n;
}


/* a refusal repeats for every batch: logged once per interval */

static void
ngx_http_civicgate_event_refused(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply)
{
    if (ngx_http_civicgate_log_due(&ecf->refused)) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "civicgate: redis refused a journey event: %*s",
                      (size_t) reply->len, reply->str);
    }

    /* the connection that answered: a cluster node's own */
    if (ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0) {
        ngx_http_civicgate_redis_load_scripts(cmd->redis ? cmd->redis
                                              : ecf->core->client);
    }
}


/* the event in one or two slots; 0 if it cannot be (not a journey ID) */

static ngx_uint_t
ngx_http_civicgate_spool_pack(ngx_http_civicgate_event_t *ev,
    ngx_http_civicgate_spool_slot_t *slot)
{
    u_char      text[NGX_HTTP_CIVICGATE_CHANNEL_MAX
                     + NGX_HTTP_CIVICGATE_SERVICE_MAX
                     + NGX_HTTP_CIVICGATE_METHOD_MAX
                     + NGX_HTTP_CIVICGATE_USES_TEXT], *p;
    size_t      len;
    ngx_int_t   hi, lo;
    ngx_uint_t  i, more;

    ngx_memzero(slot, sizeof(ngx_http_civicgate_spool_slot_t));

    if (ngx_http_civicgate_jid_parse(ev->journey, NGX_HTTP_CIVICGATE_JID_LEN,
                                     slot->journey) != 0)
    {
        return 0;
    }

    slot->time = ev->time;
    slot->latency = (int32_t) ngx_min(ev->latency, NGX_MAX_INT32_VALUE);
    slot->ttl = ev->ttl;
    slot->status = ev->status;
    slot->flags = ev->flags;
    slot->channel_len = ev->channel_len;
    slot->service_len = ev->service_len;
    slot->method_len = ev->method_len;
    slot->uses_len = ev->uses_len;
    ngx_memcpy(slot->eid, ev->eid, sizeof(slot->eid));

    if (ev->citizen_len) {
        slot->flags |= NGX_HTTP_CIVICGATE_EVENT_CITIZEN;

        for (i = 0; i < sizeof(slot->citizen); i++) {
            hi = ngx_hextoi(&ev->citizen[2 * i], 1);
            lo = ngx_hextoi(&ev->citizen[2 * i + 1], 1);
            slot->citizen[i] = (u_char) (hi << 4 | lo);
        }
    }

    p = ngx_cpymem(text, ev->channel, ev->channel_len);
    p = ngx_cpymem(p, ev->service, ev->service_len);
    p = ngx_cpymem(p, ev->method, ev->method_len);
    p = ngx_cpymem(p, ev->uses, ev->uses_len);
    len = p - text;

    ngx_memcpy(slot->text, text, ngx_min(len, sizeof(slot->text)));

    if (len <= sizeof(slot->text)) {
        return 1;
    }

    len -= sizeof(slot->text);
    more = (len + sizeof(ngx_http_civicgate_spool_slot_t) - 1)
           / sizeof(ngx_http_civicgate_spool_slot_t);

    slot->flags |= (u_char) (more << NGX_HTTP_CIVICGATE_EVENT_MORE_SHIFT);
    ngx_memcpy(&slot[1], text + sizeof(slot->text), len);

    return 1 + more;
}


/* the slots an event will take */

static ngx_uint_t
ngx_http_civicgate_event_width(ngx_http_civicgate_event_t *ev)
{
    size_t  len;

    len = ev->channel_len + ev->service_len + ev->method_len + ev->uses_len;

    if (len <= NGX_HTTP_CIVICGATE_SLOT_TEXT) {
        return 1;
    }

    return 1 + (len - NGX_HTTP_CIVICGATE_SLOT_TEXT
                + sizeof(ngx_http_civicgate_spool_slot_t) - 1)
               / sizeof(ngx_http_civicgate_spool_slot_t);
}


/* under the lock: the event at pos; its width in slots */

static ngx_uint_t
ngx_http_civicgate_spool_unpack(ngx_http_civicgate_spool_sh_t *sh,
    uint64_t pos, ngx_http_civicgate_event_t *ev)
{
    u_char                            *p;
    u_char                             text[NGX_HTTP_CIVICGATE_SLOT_TEXT
                                   + (NGX_HTTP_CIVICGATE_SLOTS_MAX - 1)
                                   * sizeof(ngx_http_civicgate_spool_slot_t)];
    ngx_uint_t                         i, w;
    ngx_http_civicgate_spool_slot_t   *slot;

    slot = &sh->slots[pos % sh->nslots];

    ev->time = slot->time;
    ev->latency = slot->latency;
    ev->ttl = slot->ttl;
    ev->status = slot->status;
    ev->flags = slot->flags & (NGX_HTTP_CIVICGATE_EVENT_TOUCH
                               |NGX_HTTP_CIVICGATE_EVENT_STREAMED);
    ev->channel_len = slot->channel_len;
    ev->service_len = slot->service_len;
    ev->method_len = slot->method_len;
    ev->uses_len = slot->uses_len;
    ngx_memcpy(ev->eid, slot->eid, sizeof(ev->eid));
    ngx_http_civicgate_jid_format(slot->journey, ev->journey);

    ev->citizen_len = 0;

    if (slot->flags & NGX_HTTP_CIVICGATE_EVENT_CITIZEN) {
        ngx_http_civicgate_hex(slot->citizen, sizeof(slot->citizen),
                               ev->citizen);
        ev->citizen_len = NGX_HTTP_CIVICGATE_PSEUDONYM_LEN;
    }

    p = ngx_cpymem(text, slot->text, sizeof(slot->text));
    w = ngx_http_civicgate_slot_width(slot);

    /* the slots after the first may wrap around the ring */
    for (i = 1; i < w; i++) {
        p = ngx_cpymem(p, &sh->slots[(pos + i) % sh->nslots],
                       sizeof(ngx_http_civicgate_spool_slot_t));
    }

    p = text;
    ngx_memcpy(ev->channel, p, ev->channel_len);
    p += ev->channel_len;
    ngx_memcpy(ev->service, p, ev->service_len);
    p += ev->service_len;
    ngx_memcpy(ev->method, p, ev->method_len);
    p += ev->method_len;
    ngx_memcpy(ev->uses, p, ev->uses_len);

    return w;
}


static ngx_uint_t
ngx_http_civicgate_spool_width(ngx_http_civicgate_spool_sh_t *sh,
    uint64_t pos)
{
    return ngx_http_civicgate_slot_width(&sh->slots[pos % sh->nslots]);
}


/* under the lock: of n slots from an event at pos, those of whole events */

static uint64_t
ngx_http_civicgate_spool_whole(ngx_http_civicgate_spool_sh_t *sh,
    uint64_t pos, uint64_t n)
{
    uint64_t    i;
    ngx_uint_t  w;

    for (i = 0; i < n; i += w) {
        w = ngx_http_civicgate_spool_width(sh, pos + i);

        if (i + w > n) {
            break;
        }
    }

    return ngx_min(i, n);
}


/* under the lock: the events in n slots from an event at pos */

static uint64_t
ngx_http_civicgate_spool_count(ngx_http_civicgate_spool_sh_t *sh,
    uint64_t pos, uint64_t n)
{
    uint64_t  i, events;

    events = 0;

    for (i = 0; i < n; i += ngx_http_civicgate_spool_width(sh, pos + i)) {
        events++;
    }

    return events;
}


/* overflow drops the newest event: those spooled earlier keep their order */

static void
ngx_http_civicgate_spool_append(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_t *ev)
{
    ngx_uint_t                         i, w, full;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_spool_slot_t    slots[NGX_HTTP_CIVICGATE_SLOTS_MAX];

    sh = ecf->sh;
    w = ngx_http_civicgate_spool_pack(ev, slots);

    ngx_shmtx_lock(&ecf->shpool->mutex);

    full = (w == 0 || sh->head - sh->tail + w > sh->nslots);

    if (!full) {
        for (i = 0; i < w; i++) {
            sh->slots[(sh->head + i) % sh->nslots] = slots[i];
        }

        sh->head += w;

    } else {
        sh->dropped++;
    }

    ngx_shmtx_unlock(&ecf->shpool->mutex);

    ngx_http_civicgate_metrics_inc(ecf->core->metrics,
                                   ecf->core->metrics->events,
                                   full ? NGX_HTTP_CIVICGATE_EVENTS_DROPPED
                                        : NGX_HTTP_CIVICGATE_EVENTS_SPOOLED);

    if (full) {
        ngx_http_civicgate_spool_drops(ecf, 0);
    }
}


/*
 * Under the lock, as many as fit go in front; the rest, if the spool is
 * full or claims are short, take the usual way (behind, or dropped).
 */

static void
ngx_http_civicgate_spool_return(ngx_http_civicgate_events_conf_t *ecf)
{
    ngx_uint_t                         i, e, n, m, w, room;
    ngx_queue_t                       *q;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_spool_slot_t   *slots;
    ngx_http_civicgate_event_batch_t  *b;

    sh = ecf->sh;
    n = 0;
    e = 0;

    for (q = ngx_queue_head(&ecf->back);
         q != ngx_queue_sentinel(&ecf->back);
         q = ngx_queue_next(q))
    {
        b = ngx_queue_data(q, ngx_http_civicgate_event_batch_t, queue);

        for (i = 0; i < b->n; i++) {
            n += ngx_http_civicgate_event_width(&b->events[i]);
        }
    }

    slots = ngx_alloc(n * sizeof(ngx_http_civicgate_spool_slot_t),
                      ngx_cycle->log);
    n = 0;

    if (slots != NULL) {
        /* packed before locking */
        n = ngx_http_civicgate_spool_pack_back(ecf, slots);

        ngx_shmtx_lock(&ecf->shpool->mutex);

        room = sh->nslots - (sh->head - sh->tail);

        /* whole events, as many as fit */
        for (m = 0; m < n; m += w) {
            w = ngx_http_civicgate_slot_width(&slots[m]);

            if (m + w > room) {
                break;
            }

            e++;
        }

        if (m && ngx_http_civicgate_spool_front(ecf, slots, m) == NGX_OK) {
            for (i = 0; i < m; i++) {
                sh->slots[(sh->tail + i) % sh->nslots] = slots[i];
            }

        } else {
            e = 0;
        }

        ngx_shmtx_unlock(&ecf->shpool->mutex);

        ngx_free(slots);
    }

    ngx_http_civicgate_metrics_add(ecf->core->metrics,
                                   ecf->core->metrics->events,
                                   NGX_HTTP_CIVICGATE_EVENTS_SPOOLED, e);

    /* the rest behind, in order */
    while (!ngx_queue_empty(&ecf->back)) {
        q = ngx_queue_head(&ecf->back);
        ngx_queue_remove(q);
        b = ngx_queue_data(q, ngx_http_civicgate_event_batch_t, queue);

        for (i = ngx_min(e, b->n); i < b->n; i++) {
            ngx_http_civicgate_spool_append(ecf, &b->events[i]);
        }

        e -= ngx_min(e, b->n);
        ngx_free(b);
    }

    ecf->nback = 0;
}


/* the failed batches' events, the oldest first, up to one that fails */

static ngx_uint_t
ngx_http_civicgate_spool_pack_back(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_spool_slot_t *slots)
{
    ngx_uint_t                         i, n, w;
    ngx_queue_t                       *q;
    ngx_http_civicgate_event_batch_t  *b;

    n = 0;

    for (q = ngx_queue_head(&ecf->back);
         q != ngx_queue_sentinel(&ecf->back);
         q = ngx_queue_next(q))
    {
        b = ngx_queue_data(q, ngx_http_civicgate_event_batch_t, queue);

        for (i = 0; i < b->n; i++) {
            w = ngx_http_civicgate_spool_pack(&b->events[i], &slots[n]);
            if (w == 0) {
                return n;
            }

            n += w;
        }
    }

    return n;
}


/*
 * Under the lock: n slots before the tail, for the packed slots given.
 * Claimed events are there: the new slots get claims of their own, "to
 * send again", which come first.  A spool moved away by a reload counts
 * only what is appended to it.
 */

static ngx_int_t
ngx_http_civicgate_spool_front(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_spool_slot_t *slots, ngx_uint_t n)
{
    ngx_uint_t                         size, k, i, w;
    ngx_uint_t                         groups[NGX_HTTP_CIVICGATE_SPOOL_CLAIMS];
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_spool_claim_t  *c;

    sh = ecf->sh;

    if (sh->tail < n || sh->moved) {
        return NGX_DECLINED;
    }

    if (sh->nclaims == 0) {
        sh->tail -= n;
        sh->next = sh->tail;
        return NGX_OK;
    }

    /* a claim is taken again only whole, within a worker's share */
    size = ngx_min(NGX_HTTP_CIVICGATE_SPOOL_BATCH, ecf->drain_share);
    k = 0;

    for (i = 0; i < n; i += w) {
        w = ngx_http_civicgate_slot_width(&slots[i]);

        if (k == 0 || groups[k - 1] + w > size) {
            if (sh->nclaims + k == NGX_HTTP_CIVICGATE_SPOOL_CLAIMS) {
                return NGX_DECLINED;
            }

            groups[k++] = 0;
        }

        groups[k - 1] += w;
    }

    /* the last events first, each claim in front of the one before */
    while (k--) {
        sh->first = (sh->first + NGX_HTTP_CIVICGATE_SPOOL_CLAIMS - 1)
                    % NGX_HTTP_CIVICGATE_SPOOL_CLAIMS;
        sh->nclaims++;

        c = &sh->claims[sh->first];
        c->n = groups[k];
        sh->tail -= c->n;
        c->start = sh->tail;
        c->pid = 0;
        c->done = 0;
        c->deadline = 0;
    }

    return NGX_OK;
}
/*
 * Drops are logged at most once per interval, each line with the number
 * since the previous one; the timer and the exit report the rest, so that
 * the lines add up to the dropped counter.
 */

static void
ngx_http_civicgate_spool_drops(ngx_http_civicgate_events_conf_t *ecf,
    ngx_uint_t force)
{
    uint64_t                           dropped;
    ngx_http_civicgate_spool_sh_t     *sh;

    sh = ecf->sh;

    if (sh->dropped == 0) {
        return;
    }

    dropped = 0;

    ngx_shmtx_lock(&ecf->shpool->mutex);

    if (force) {
        sh->warned.last = 0;
    }

    if (ngx_http_civicgate_log_due(&sh->warned)) {
        dropped = sh->dropped;
        sh->dropped = 0;
    }

    ngx_shmtx_unlock(&ecf->shpool->mutex);

    if (dropped) {
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "civicgate: event buffer full, %uL journey events "
                      "dropped", dropped);
    }
}


/*
 * Every worker writes the spool, oldest first, in claims of up to
 * NGX_HTTP_CIVICGATE_SPOOL_BATCH slots, one script call each, while the
 * slots in flight stay within its share of the drain limit.
 */

static void
ngx_http_civicgate_spool_drain(ngx_http_civicgate_events_conf_t *ecf)
{
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_event_batch_t  *b;

    sh = ecf->sh;

    while (sh->head != sh->tail
           && ecf->inflight < ecf->drain_share
           && ngx_http_civicgate_redis_ready(ecf->core->client))
    {
        b = ngx_http_civicgate_spool_take(ecf);
        if (b == NULL) {
            return;
        }

        /* the connection takes no more: the timer tries again */
        if (ngx_http_civicgate_spool_send(b) != NGX_OK) {
            return;
        }
    }
}


static ngx_http_civicgate_event_batch_t *
ngx_http_civicgate_spool_take(ngx_http_civicgate_events_conf_t *ecf)
{
    uint64_t                           pos;
    ngx_uint_t                         w;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_spool_claim_t  *c;
    ngx_http_civicgate_event_batch_t  *b;

    sh = ecf->sh;
    b = NULL;

    ngx_shmtx_lock(&ecf->shpool->mutex);

    c = ngx_http_civicgate_spool_claim(ecf);

    if (c != NULL) {
        b = ngx_http_civicgate_batch_alloc(ecf, c->n);

        if (b == NULL) {
            ngx_http_civicgate_spool_release(sh, c, 0);

        } else {
            b->n = 0;

            /* events written in full by an earlier try are skipped */
            for (pos = c->start; pos < c->start + c->n; pos += w) {
                w = ngx_http_civicgate_spool_width(sh, pos);

                if (!ngx_http_civicgate_slot_written(
                                            &sh->slots[pos % sh->nslots]))
                {
                    (void) ngx_http_civicgate_spool_unpack(sh, pos,
                                                        &b->events[b->n++]);
                }
            }

            b->claim = c - sh->claims;
            b->start = c->start;
            b->slots = c->n;
            b->unsent = 0;
        }
    }

    if (b != NULL && b->n == 0) {
        ngx_http_civicgate_spool_release(sh, c, 1);
        ngx_free(b);
        b = NULL;
    }

    ngx_shmtx_unlock(&ecf->shpool->mutex);

    if (b == NULL) {
        return NULL;
    }

    ecf->inflight += b->slots;

    return b;
}


/*
 * Under the lock: first a claim whose sending failed or whose worker died
 * (past its deadline), else the next events, whole, within the limits.
 */

static ngx_http_civicgate_spool_claim_t *
ngx_http_civicgate_spool_claim(ngx_http_civicgate_events_conf_t *ecf)
{
    ngx_uint_t                         i, room, n;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_spool_claim_t  *c;

    sh = ecf->sh;
    room = ngx_min(ecf->drain_share - ecf->inflight,
                   ecf->drain_limit - ngx_min(sh->inflight, ecf->drain_limit));

    for (i = 0; i < sh->nclaims; i++) {
        c = &sh->claims[(sh->first + i) % NGX_HTTP_CIVICGATE_SPOOL_CLAIMS];

        if (c->done) {
            continue;
        }

        if (c->pid == 0 && c->n <= room) {
            sh->inflight += c->n;
            goto claimed;
        }

        if (c->pid != 0 && c->pid != ngx_pid
            && (ngx_msec_int_t) (ngx_current_msec - c->deadline) >= 0)
        {
            goto claimed;
        }
    }

    if (room == 0 || sh->next == sh->head
        || sh->nclaims == NGX_HTTP_CIVICGATE_SPOOL_CLAIMS)
    {
        return NULL;
    }

    n = ngx_http_civicgate_spool_whole(sh, sh->next,
                                       ngx_min(ngx_min(sh->head - sh->next,
                                                       room),
                                               NGX_HTTP_CIVICGATE_SPOOL_BATCH));
    if (n == 0) {
        /* room for one slot, the next event takes two */
        return NULL;
    }

    c = &sh->claims[(sh->first + sh->nclaims)
                    % NGX_HTTP_CIVICGATE_SPOOL_CLAIMS];
    sh->nclaims++;

    c->start = sh->next;
    c->n = n;
    c->done = 0;
    sh->next += c->n;
    sh->inflight += c->n;

claimed:

    c->pid = ngx_pid;
    c->deadline = ngx_current_msec + ecf->claim_ttl;

    return c;
}


static ngx_int_t
ngx_http_civicgate_spool_send(ngx_http_civicgate_event_batch_t *b)
{
    if (ngx_http_civicgate_batch_send(b) != NGX_OK) {
        ngx_http_civicgate_spool_complete(b, 1);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* the reply is in: the claim leaves the spool, or waits to be sent again */

static void
ngx_http_civicgate_spool_complete(ngx_http_civicgate_event_batch_t *b,
    ngx_uint_t failed)
{
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_spool_claim_t  *c;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = b->ecf;
    sh = ecf->sh;
    c = &sh->claims[b->claim];

    ngx_shmtx_lock(&ecf->shpool->mutex);

    /* unless another worker took it over meanwhile */
    if (c->pid == ngx_pid && c->start == b->start && !c->done) {
        if (failed && ecf->shards.cluster
            && ngx_http_civicgate_spool_mark(sh, c, b) == 0)
        {
            failed = 0;
        }

        ngx_http_civicgate_spool_release(sh, c, !failed);
    }

    ngx_shmtx_unlock(&ecf->shpool->mutex);

    ecf->inflight -= b->slots;

    ngx_free(b);

    /* after a failure, the timer tries again */
    if (!failed && !ngx_exiting) {
        ngx_http_civicgate_spool_drain(ecf);
    }
}


/*
 * Under the lock, cluster mode: the claim's slots record the parts of its
 * events that were written; those written in full before are skipped,
 * as when it was taken.  Returns the number of events left to write.
 */

static ngx_uint_t
ngx_http_civicgate_spool_mark(ngx_http_civicgate_spool_sh_t *sh,
    ngx_http_civicgate_spool_claim_t *c, ngx_http_civicgate_event_batch_t *b)
{
    u_char                            parts;
    uint64_t                          pos;
    ngx_uint_t                        k, w, left;
    ngx_http_civicgate_event_t       *ev;
    ngx_http_civicgate_spool_slot_t  *slot;

    /* the flags that say which parts are written */
    parts = NGX_HTTP_CIVICGATE_EVENT_STREAMED
            |NGX_HTTP_CIVICGATE_EVENT_INDEX|NGX_HTTP_CIVICGATE_EVENT_INDEX_TTL;
    k = 0;
    left = 0;

    for (pos = c->start; pos < c->start + c->n; pos += w) {
        slot = &sh->slots[pos % sh->nslots];
        w = ngx_http_civicgate_slot_width(slot);

        if (ngx_http_civicgate_slot_written(slot)) {
            continue;
        }

        if (k == b->n
            || ngx_memcmp(slot->eid, b->events[k].eid, sizeof(slot->eid)) != 0)
        {
            /* cannot be: the whole claim is written again */
            return 1;
        }

        ev = &b->events[k++];

        slot->flags = (u_char) ((slot->flags & ~parts) | (ev->flags & parts));
        slot->uses_len = ev->uses_len;

        left += !ngx_http_civicgate_event_written(ev);
    }

    return left;
}


/* under the lock; the acknowledged claims at the front leave the spool */

static void
ngx_http_civicgate_spool_release(ngx_http_civicgate_spool_sh_t *sh,
    ngx_http_civicgate_spool_claim_t *c, ngx_uint_t done)
{
    sh->inflight -= ngx_min(c->n, sh->inflight);
    c->pid = 0;
    c->done = done;

    while (sh->nclaims) {
        c = &sh->claims[sh->first];

        if (!c->done) {
            break;
        }

        sh->tail = c->start + c->n;
        sh->first = (sh->first + 1) % NGX_HTTP_CIVICGATE_SPOOL_CLAIMS;
        sh->nclaims--;
    }
}


static void
ngx_http_civicgate_spool_timer(ngx_event_t *ev)
{
    ngx_http_civicgate_events_conf_t  *ecf = ev->data;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    ngx_http_civicgate_spool_drops(ecf, 0);
    ngx_http_civicgate_spool_drain(ecf);

    ngx_add_timer(ev, NGX_HTTP_CIVICGATE_SPOOL_FLUSH);
}


static void
ngx_http_civicgate_events_ready(ngx_http_civicgate_redis_t *rc)
{
    ngx_http_civicgate_spool_drain(
        ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                            ngx_http_civicgate_events_module));
}


/* the spool at its high-water mark: the health check answers 503 */

ngx_uint_t
ngx_http_civicgate_events_spool_high(void)
{
    ngx_uint_t  n, capacity;

    n = ngx_http_civicgate_events_spool_usage(&capacity);

    return capacity && n * 100 >= capacity * NGX_HTTP_CIVICGATE_SPOOL_HIGH;
}


/* events waiting in the spool and its slots, for the metrics endpoint */

ngx_uint_t
ngx_http_civicgate_events_spool_usage(ngx_uint_t *capacity)
{
    uint64_t                           n;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_events_conf_t  *ecf;

    *capacity = 0;

    ecf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                            ngx_http_civicgate_events_module);

    if (ecf == NULL || ecf->sh == NULL) {
        return 0;
    }

    sh = ecf->sh;

    /* head and tail move together under the lock: read them as a pair */
    ngx_shmtx_lock(&ecf->shpool->mutex);
    n = sh->head - sh->tail;
    *capacity = sh->nslots;
    ngx_shmtx_unlock(&ecf->shpool->mutex);

    return (ngx_uint_t) ngx_min(n, (uint64_t) *capacity);
}


/* the worker's stream layout; one stream before the configuration is read */

ngx_http_civicgate_shards_t *
ngx_http_civicgate_events_shards(void)
{
    ngx_http_civicgate_events_conf_t   *ecf;

    static ngx_http_civicgate_shards_t  one = { 1, 0 };

    ecf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                            ngx_http_civicgate_events_module);

    if (ecf == NULL || ecf->shards.n == NGX_CONF_UNSET_UINT) {
        return &one;
    }

    return &ecf->shards;
}
