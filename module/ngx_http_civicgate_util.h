
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_UTIL_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_UTIL_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


/*
 * What every concern shares and nothing above it: rate-limited logging,
 * the Redis key schema, where a location's sub-paths start.
 */


/* a line that would repeat for every request: at most once per interval */
#define NGX_HTTP_CIVICGATE_LOG_EVERY  10000   /* ms */

typedef struct {
    ngx_msec_t                     last;     /* 0: never logged */
} ngx_http_civicgate_log_limit_t;


/* every Redis key is built here; docs/redis-keys.md is the schema */
#define NGX_HTTP_CIVICGATE_REDIS_KEY_MAX   96

#define NGX_HTTP_CIVICGATE_KEY_CONSENTS    "consents"
#define NGX_HTTP_CIVICGATE_KEY_JOURNEYS    "journeys"
#define NGX_HTTP_CIVICGATE_KEY_TIMELINE    "timeline"
#define NGX_HTTP_CIVICGATE_KEY_STEPS       "steps"

/* where the journey ID starts in a journey's key, and the key's length */
#define NGX_HTTP_CIVICGATE_KEY_JOURNEY_AT  (sizeof("cg:{j:") - 1)
#define ngx_http_civicgate_key_journey_len(field, len)                        \
    (sizeof("cg:{j:}:" field) - 1 + (len))

#define NGX_HTTP_CIVICGATE_KEY_STATUS_SERVICES  "cg:{status}:services"
#define NGX_HTTP_CIVICGATE_KEY_STATUS_HISTORY   "cg:{status}:history"
#define NGX_HTTP_CIVICGATE_KEY_STATUS_CHANGES   "cg:{status}:changes"
#define NGX_HTTP_CIVICGATE_KEY_STATUS_NOTICES   "cg:{status}:notices"
#define NGX_HTTP_CIVICGATE_KEY_STATUS_NOTICE_LIST  "cg:{status}:notice-codes"
#define NGX_HTTP_CIVICGATE_KEY_CONSENT_CHANNEL  "cg:consent:invalidate"
#define NGX_HTTP_CIVICGATE_KEY_EVENTS_STREAM    "cg:events"
#define NGX_HTTP_CIVICGATE_KEY_WATCHED          "cg:watched"


/*
 * Where journey events go: one stream per shard, a journey's shard from
 * its canonical ID.  In cluster mode a journey's timeline and the watch
 * registry live with its shard's stream, in one slot.
 */
#define NGX_HTTP_CIVICGATE_EVENT_SHARDS_MAX     1024

typedef struct {
    ngx_uint_t                     n;        /* streams */
    ngx_uint_t                     cluster;  /* keys tagged by shard */
} ngx_http_civicgate_shards_t;


ngx_uint_t ngx_http_civicgate_log_due(ngx_http_civicgate_log_limit_t *ll);

u_char *ngx_http_civicgate_key_citizen(u_char *buf, u_char *citizen,
    size_t len, const char *field);
u_char *ngx_http_civicgate_key_journey(u_char *buf, u_char *jid, size_t len,
    const char *field);
ngx_uint_t ngx_http_civicgate_shard_of(ngx_http_civicgate_shards_t *sh,
    u_char *jid, size_t len);
u_char *ngx_http_civicgate_key_stream(u_char *buf,
    ngx_http_civicgate_shards_t *sh, ngx_uint_t shard);
u_char *ngx_http_civicgate_key_watched(u_char *buf,
    ngx_http_civicgate_shards_t *sh, ngx_uint_t shard);
u_char *ngx_http_civicgate_key_timeline(u_char *buf,
    ngx_http_civicgate_shards_t *sh, ngx_uint_t shard, u_char *jid,
    size_t len);
u_char *ngx_http_civicgate_key_limit(u_char *buf, u_char *digest, size_t len,
    ngx_str_t *zone);

/* the data-use log: one list per citizen and calendar month (UTC) */
u_char *ngx_http_civicgate_key_uses(u_char *buf, u_char *citizen,
    size_t len, ngx_uint_t month);
ngx_uint_t ngx_http_civicgate_month_of(int64_t ms);
time_t ngx_http_civicgate_month_end(ngx_uint_t month);

/* a Redis Cluster hash slot: CRC16 (XMODEM) of the key's hash tag */
#define NGX_HTTP_CIVICGATE_REDIS_SLOTS  16384

ngx_uint_t ngx_http_civicgate_key_slot(const u_char *key, size_t len);

ngx_int_t ngx_http_civicgate_location_rest(ngx_http_request_t *r,
    ngx_str_t *rest);
ngx_table_elt_t *ngx_http_civicgate_find_header(ngx_http_request_t *r,
    ngx_str_t *name);


#endif /* _NGX_HTTP_CIVICGATE_UTIL_H_INCLUDED_ */
