
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


#define NGX_HTTP_CIVICGATE_METHOD_MAX   16

/* events of the spool in flight to Redis, all workers together */
#define NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT      1024
#define NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT_MAX  16384

/* the spool's high-water mark for the health endpoints, in percent */
#define NGX_HTTP_CIVICGATE_SPOOL_HIGH   90


/* one journey event, fixed size so that the spool is a ring of slots */
typedef struct {
    uint64_t                        time;          /* ms since the epoch */
    int64_t                         latency;       /* ms; -1: no upstream */
    uint32_t                        ttl;
    uint16_t                        status;
    u_char                          channel_len;
    u_char                          service_len;
    u_char                          method_len;
    u_char                          citizen_len;
    u_char                          eid[16];
    u_char                          journey[NGX_HTTP_CIVICGATE_JID_LEN];
    u_char                          citizen[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN];
    u_char                          channel[NGX_HTTP_CIVICGATE_CHANNEL_MAX];
    u_char                          service[NGX_HTTP_CIVICGATE_SERVICE_MAX];
    u_char                          method[NGX_HTTP_CIVICGATE_METHOD_MAX];
} ngx_http_civicgate_event_t;


typedef struct ngx_http_civicgate_spool_sh_s  ngx_http_civicgate_spool_sh_t;


typedef struct {
    ngx_http_civicgate_main_conf_t *core;
    size_t                          buffer;        /* the spool's size */
    ngx_shm_zone_t                 *zone;
    ngx_http_civicgate_spool_sh_t  *sh;
    ngx_slab_pool_t                *shpool;
    ngx_uint_t                      maxlen;
    ngx_uint_t                      journey_maxlen;
    ngx_uint_t                      drain_limit;   /* all workers */
    ngx_msec_t                      claim_ttl;
    ngx_cycle_t                    *old_cycle;     /* at reload */

    ngx_http_civicgate_redis_script_t  *journey_script;
    ngx_http_civicgate_redis_script_t  *citizen_script;

    /* per worker */
    ngx_event_t                     flush_timer;
    ngx_uint_t                      drain_share;
    ngx_uint_t                      inflight;      /* claimed events */
    ngx_uint_t                      direct;        /* sent, not spooled */
    ngx_queue_t                     back;          /* those that failed */
    ngx_uint_t                      nback;
    ngx_http_civicgate_log_limit_t  refused;
    ngx_uint_t                      running;       /* timer set */
} ngx_http_civicgate_events_conf_t;


typedef struct {
    ngx_flag_t                      enable;
} ngx_http_civicgate_events_loc_conf_t;


#define NGX_HTTP_CIVICGATE_SPOOL_BATCH      256     /* events per claim */
#define NGX_HTTP_CIVICGATE_SPOOL_CLAIMS     64
#define NGX_HTTP_CIVICGATE_SPOOL_FLUSH      250     /* ms */
#define NGX_HTTP_CIVICGATE_EVENTS_WINDOW    1024    /* commands in flight */
/* the first position, a multiple of the slots: room to put events back */
#define NGX_HTTP_CIVICGATE_SPOOL_BASE       ((uint64_t) 1 << 20)
#define NGX_HTTP_CIVICGATE_EVENT_FIELDS     9
#define NGX_HTTP_CIVICGATE_EVENT_ARGS                                         \
    (6 + 2 * NGX_HTTP_CIVICGATE_EVENT_FIELDS)


/*
 * Spooled events sent to Redis but not yet acknowledged, a contiguous
 * range of the spool: they leave it only once acknowledged, so that the
 * events of a worker that dies are sent again by another.
 */
typedef struct {
    uint64_t                        start;         /* its first event */
    ngx_uint_t                      n;
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
    ngx_uint_t                      inflight;      /* events, all workers */
    ngx_http_civicgate_log_limit_t  warned;
    uint64_t                        dropped;       /* since the last warning */
    uint64_t                        moved;         /* resized: head then + 1 */
    ngx_http_civicgate_spool_claim_t  claims[NGX_HTTP_CIVICGATE_SPOOL_CLAIMS];
    ngx_http_civicgate_event_t      slots[1];
};


typedef struct ngx_http_civicgate_spool_batch_s
    ngx_http_civicgate_spool_batch_t;


/* a sent event: kept until its last reply, spooled again on failure */
typedef struct {
    ngx_http_civicgate_event_t      event;
    ngx_http_civicgate_events_conf_t *ecf;
    ngx_queue_t                     queue;         /* failed, sent directly */
    ngx_http_civicgate_spool_batch_t  *batch;      /* NULL: not spooled */
    ngx_uint_t                      commands;      /* replies due */
    unsigned                        failed:1;
} ngx_http_civicgate_event_send_t;


/* a worker's copy of a claim's events */
struct ngx_http_civicgate_spool_batch_s {
    ngx_http_civicgate_events_conf_t *ecf;
    ngx_uint_t                        claim;       /* index in claims */
    uint64_t                          start;
    ngx_uint_t                        n;
    ngx_uint_t                        pending;     /* events not answered */
    ngx_uint_t                        failed;
    ngx_http_civicgate_event_send_t   sends[1];
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
static ngx_int_t ngx_http_civicgate_event_send(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_t *ev);
static ngx_int_t ngx_http_civicgate_event_commands(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_send_t *s);
static void ngx_http_civicgate_event_fields(ngx_http_civicgate_event_t *ev,
    u_char bufs[][NGX_INT64_LEN], ngx_str_t *values);
static ngx_int_t ngx_http_civicgate_event_xadd(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_send_t *s,
    ngx_str_t *values);
static ngx_int_t ngx_http_civicgate_event_cmd(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_send_t *s,
    int argc, const char **argv, size_t *lens);
static void ngx_http_civicgate_event_reply(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply);
static void ngx_http_civicgate_event_settled(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_send_t *s);
static void ngx_http_civicgate_event_refused(
    ngx_http_civicgate_events_conf_t *ecf, redisReply *reply);
static void ngx_http_civicgate_spool_append(
    ngx_http_civicgate_events_conf_t *ecf, ngx_http_civicgate_event_t *ev);
static void ngx_http_civicgate_spool_return(
    ngx_http_civicgate_events_conf_t *ecf);
static ngx_int_t ngx_http_civicgate_spool_front(
    ngx_http_civicgate_events_conf_t *ecf, ngx_uint_t n);
static void ngx_http_civicgate_spool_drops(
    ngx_http_civicgate_events_conf_t *ecf, ngx_uint_t force);
static void ngx_http_civicgate_spool_drain(
    ngx_http_civicgate_events_conf_t *ecf);
static ngx_http_civicgate_spool_batch_t *ngx_http_civicgate_spool_take(
    ngx_http_civicgate_events_conf_t *ecf);
static ngx_http_civicgate_spool_claim_t *ngx_http_civicgate_spool_claim(
    ngx_http_civicgate_events_conf_t *ecf);
static ngx_int_t ngx_http_civicgate_spool_send(
    ngx_http_civicgate_spool_batch_t *b);
static void ngx_http_civicgate_spool_complete(
    ngx_http_civicgate_spool_batch_t *b);
static void ngx_http_civicgate_spool_release(
    ngx_http_civicgate_spool_sh_t *sh, ngx_http_civicgate_spool_claim_t *c,
    ngx_uint_t done);
static void ngx_http_civicgate_spool_timer(ngx_event_t *ev);


/*
 * KEYS: journey stream, journey summary.  ARGV: time, eid, journey,
 * channel, service, method, status, latency_ms, citizen, ttl, maxlen,
 * the journey's steps channel.
 * Workers drain the spool side by side, so an older event can come after
 * a newer one: the summary's first and last fields go by time.  The step
 * is also published for those following the journey's status; an ACL
 * that forbids the channel loses only that, not the event.
 */
static const char  ngx_http_civicgate_journey_lua[] =
    "local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[11], '*',"
    " 'time', ARGV[1], 'eid', ARGV[2], 'journey', ARGV[3],"
    " 'channel', ARGV[4], 'service', ARGV[5], 'method', ARGV[6],"
    " 'status', ARGV[7], 'latency_ms', ARGV[8], 'citizen', ARGV[9])\n"
    "local s = redis.call('HMGET', KEYS[2], 'first_seen', 'channels',"
    " 'events', 'last_seen')\n"
    "local t = tonumber(ARGV[1])\n"
    "local ch = s[2]\n"
    "if not ch then ch = ARGV[4]\n"
    "elseif not string.find(',' .. ch .. ',', ',' .. ARGV[4] .. ',', 1,"
    " true) then ch = ch .. ',' .. ARGV[4] end\n"
    "local first = s[1]\n"
    "if not first or t < tonumber(first) then first = ARGV[1] end\n"
    "local h = {'first_seen', first, 'channels', ch,"
    " 'events', (tonumber(s[3]) or 0) + 1}\n"
    "if not s[4] or t >= tonumber(s[4]) then\n"
    "  h[7] = 'last_seen'; h[8] = ARGV[1]; h[9] = 'last_status';"
    " h[10] = ARGV[7]; h[11] = 'last_service'; h[12] = ARGV[5];"
    " h[13] = 'last_channel'; h[14] = ARGV[4] end\n"
    "if ARGV[9] ~= '' then h[#h + 1] = 'citizen'; h[#h + 1] = ARGV[9] end\n"
    "redis.call('HSET', KEYS[2], unpack(h))\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[10])\n"
    "redis.call('EXPIRE', KEYS[2], ARGV[10])\n"
    "redis.pcall('PUBLISH', ARGV[12], id .. ' ' .."
    " ARGV[1] .. ' ' .. ARGV[4] .. ' ' .. ARGV[5] .. ' ' .. ARGV[7])\n"
    "return id\n";

/* KEYS: citizen index.  ARGV: time, journey, ttl.  Trimmed as it grows. */
static const char  ngx_http_civicgate_citizen_lua[] =
    "if redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) == 1 then\n"
    "  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -1001) end\n"
    "redis.call('EXPIRE', KEYS[1], ARGV[3])\n"
    "return 1\n";


static ngx_str_t  ngx_http_civicgate_spool_name =
    ngx_string("civicgate_events");


static ngx_conf_num_bounds_t  ngx_http_civicgate_drain_inflight_bounds = {
    ngx_conf_check_num_bounds, 1, NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT_MAX
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

    ngx_conf_init_size_value(ecf->buffer, 1024 * 1024);
    ngx_conf_init_uint_value(ecf->maxlen, 1000000);
    ngx_conf_init_uint_value(ecf->drain_limit,
                             NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT);

    if (ecf->core->redis == NULL) {
        return NGX_OK;
    }

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

    ecf->journey_maxlen = 1000;
    ecf->old_cycle = cf->cycle->old_cycle;

    /* a live worker has its answer by then, or its commands have failed */
    ecf->claim_ttl = 2 * (rcf->connect_timeout + rcf->timeout);

    ecf->journey_script = ngx_http_civicgate_redis_add_script(cf, rcf,
                                              ngx_http_civicgate_journey_lua);
    ecf->citizen_script = ngx_http_civicgate_redis_add_script(cf, rcf,
                                              ngx_http_civicgate_citizen_lua);

    if (ecf->journey_script == NULL || ecf->citizen_script == NULL) {
        return NGX_ERROR;
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

    ecf->sh = ngx_slab_calloc(shpool,
                              offsetof(ngx_http_civicgate_spool_sh_t, slots)
                              + size);
    if (ecf->sh == NULL) {
        return NGX_ERROR;
    }

    ecf->sh->nslots = size / sizeof(ngx_http_civicgate_event_t);
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
    uint64_t                        n, kept, i;
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
    kept = ngx_min(n, sh->nslots);

    for (i = 0; i < kept; i++) {
        sh->slots[(sh->tail + i) % sh->nslots] =
                                osh->slots[(osh->tail + i) % osh->nslots];
    }

    sh->head = sh->tail + kept;
    osh->moved = osh->head + 1;

    ngx_shmtx_unlock(&oshpool->mutex);

    ngx_log_error((n > kept ? NGX_LOG_WARN : NGX_LOG_NOTICE),
                  ngx_cycle->log, 0,
                  "civicgate: event buffer resized, %uL journey events "
                  "carried over, %uL dropped", kept, n - kept);
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
    ecf->drain_share = ngx_max(ecf->drain_limit
                               / ngx_max(ccf->worker_processes, 1), 1);

    ecf->flush_timer.handler = ngx_http_civicgate_spool_timer;
    ecf->flush_timer.data = ecf;
    ecf->flush_timer.log = cycle->log;
    ecf->flush_timer.cancelable = 1;

    ngx_add_timer(&ecf->flush_timer, NGX_HTTP_CIVICGATE_SPOOL_FLUSH);

    ngx_queue_init(&ecf->back);

    ecf->running = 1;

    return NGX_OK;
}


/*
 * The core destroyed the client first: its commands in flight have failed
 * and their claims are back in the spool for the next worker.
 */

static void
ngx_http_civicgate_events_exit_process(ngx_cycle_t *cycle)
{
    uint64_t                           lost;
    ngx_uint_t                         i;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_events_conf_t  *ecf;
    ngx_http_civicgate_spool_claim_t  *c;

    ecf = ngx_http_cycle_get_module_main_conf(cycle,
                                            ngx_http_civicgate_events_module);
    if (ecf == NULL || !ecf->running) {
        return;
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
        lost = sh->head + 1 - sh->moved;
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
    n = sh->head - sh->tail;
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

    if (r != r->main || !elcf->enable) {
        return NGX_OK;
    }

    /* a journey the response did not carry is not recorded */
    j = ngx_http_civicgate_journey_get(r);

    if (j == NULL || !j->journey_on) {
        return NGX_OK;
    }

    ngx_http_civicgate_event_fill(r, j, &ev);

    /*
     * While events wait in the spool, new ones queue behind them; and when
     * Redis falls behind, they wait there too rather than pile up on the
     * connection until the oldest times out.  Failed events sent directly
     * wait to go back in front of the spool: new ones go behind them.
     */
    if (ecf->sh->head != ecf->sh->tail
        || ecf->nback
        || ecf->core->client->nsent >= NGX_HTTP_CIVICGATE_EVENTS_WINDOW
        || ngx_http_civicgate_event_send(ecf, &ev) != NGX_OK)
    {
        ngx_http_civicgate_spool_append(ecf, &ev);
    }

    return NGX_OK;
}


static void
ngx_http_civicgate_event_fill(ngx_http_request_t *r,
    ngx_http_civicgate_journey_t *j, ngx_http_civicgate_event_t *ev)
{
    u_char                          rnd[8];
    ngx_str_t                       channel;
    ngx_time_t                     *tp;
    ngx_http_upstream_state_t      *state;
    ngx_http_civicgate_loc_conf_t  *cglcf;

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_module);

    ngx_memzero(ev, sizeof(ngx_http_civicgate_event_t));

    tp = ngx_timeofday();
    ev->time = (uint64_t) tp->sec * 1000 + tp->msec;
    ev->ttl = (uint32_t) ngx_http_civicgate_journey_ttl(r);
    ev->status = (uint16_t) r->headers_out.status;
    ev->latency = -1;

    if (r->upstream_states && r->upstream_states->nelts) {
        state = r->upstream_states->elts;
        ev->latency = state[r->upstream_states->nelts - 1].response_time;
    }

    if (ngx_http_civicgate_random(rnd, sizeof(rnd)) != 0) {
        ngx_memcpy(rnd, &ev->time, sizeof(rnd));
    }

    ngx_hex_dump(ev->eid, rnd, sizeof(rnd));

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
}


static ngx_int_t
ngx_http_civicgate_event_send(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_t *ev)
{
    ngx_http_civicgate_event_send_t  *s;

    if (!ngx_http_civicgate_redis_ready(ecf->core->client)) {
        return NGX_DECLINED;
    }

    s = ngx_alloc(sizeof(ngx_http_civicgate_event_send_t), ngx_cycle->log);
    if (s == NULL) {
        return NGX_ERROR;
    }

    s->event = *ev;
    s->ecf = ecf;
    s->batch = NULL;
    s->commands = 0;
    s->failed = 0;

    if (ngx_http_civicgate_event_commands(ecf, s) != NGX_OK) {
        if (s->commands == 0) {
            ngx_free(s);
            return NGX_ERROR;
        }

        /* replies due for the commands sent: the last one spools it */
        s->failed = 1;
    }

    ecf->direct++;

    return NGX_OK;
}


/* the stream entry fields, in this order, in every place they are written */

static ngx_str_t  ngx_http_civicgate_event_names[] = {
    ngx_string("time"),
    ngx_string("eid"),
    ngx_string("journey"),
    ngx_string("channel"),
    ngx_string("service"),
    ngx_string("method"),
    ngx_string("status"),
    ngx_string("latency_ms"),
    ngx_string("citizen")
};


static void
ngx_http_civicgate_event_fields(ngx_http_civicgate_event_t *ev,
    u_char bufs[][NGX_INT64_LEN], ngx_str_t *values)
{
    values[0].data = bufs[0];
    values[0].len = ngx_sprintf(bufs[0], "%uL", ev->time) - bufs[0];
    values[1].data = ev->eid;
    values[1].len = sizeof(ev->eid);
    values[2].data = ev->journey;
    values[2].len = NGX_HTTP_CIVICGATE_JID_LEN;
    values[3].data = ev->channel;
    values[3].len = ev->channel_len;
    values[4].data = ev->service;
    values[4].len = ev->service_len;
    values[5].data = ev->method;
    values[5].len = ev->method_len;
    values[6].data = bufs[1];
    values[6].len = ngx_sprintf(bufs[1], "%ui", (ngx_uint_t) ev->status)
                    - bufs[1];
    values[7].data = bufs[2];
    values[7].len = ev->latency < 0
                    ? 0 : ngx_sprintf(bufs[2], "%L", ev->latency) - bufs[2];
    values[8].data = ev->citizen;
    values[8].len = ev->citizen_len;
}


/*
 * Journey stream and summary in one script call (one hash slot), the
 * global stream, and the citizen index: at most three commands.
 */

static ngx_int_t
ngx_http_civicgate_event_commands(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_send_t *s)
{
    u_char                            *p, bufs[5][NGX_INT64_LEN];
    size_t                             ttl_len;
    u_char                             keys[3][80];
    size_t                             lens[NGX_HTTP_CIVICGATE_EVENT_ARGS];
    ngx_str_t                          values[NGX_HTTP_CIVICGATE_EVENT_FIELDS];
    ngx_uint_t                         i, n;
    const char                        *argv[NGX_HTTP_CIVICGATE_EVENT_ARGS];
    ngx_http_civicgate_event_t        *ev;

    ev = &s->event;

    ngx_http_civicgate_event_fields(ev, bufs, values);

#define arg(d, l)  argv[n] = (const char *) (d); lens[n++] = (l)

    n = 0;
    arg("EVALSHA", 7);
    arg(ecf->journey_script->sha, 40);
    arg("2", 1);
    p = ngx_http_civicgate_key_journey(keys[0], ev->journey,
                                       NGX_HTTP_CIVICGATE_JID_LEN,
                                       NGX_HTTP_CIVICGATE_KEY_EVENTS);
    arg(keys[0], p - keys[0]);
    p = ngx_http_civicgate_key_journey(keys[1], ev->journey,
                                       NGX_HTTP_CIVICGATE_JID_LEN,
                                       NGX_HTTP_CIVICGATE_KEY_SUMMARY);
    arg(keys[1], p - keys[1]);

    for (i = 0; i < NGX_HTTP_CIVICGATE_EVENT_FIELDS; i++) {
        arg(values[i].data, values[i].len);
    }

    ttl_len = ngx_sprintf(bufs[3], "%uD", ev->ttl) - bufs[3];
    arg(bufs[3], ttl_len);
    p = ngx_sprintf(bufs[4], "%ui", ecf->journey_maxlen);
    arg(bufs[4], p - bufs[4]);
    p = ngx_http_civicgate_key_journey(keys[2], ev->journey,
                                       NGX_HTTP_CIVICGATE_JID_LEN,
                                       NGX_HTTP_CIVICGATE_KEY_STEPS);
    arg(keys[2], p - keys[2]);

    if (ngx_http_civicgate_event_cmd(ecf, s, n, argv, lens) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ngx_http_civicgate_event_xadd(ecf, s, values) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ev->citizen_len == 0) {
        return NGX_OK;
    }

    n = 0;
    arg("EVALSHA", 7);
    arg(ecf->citizen_script->sha, 40);
    arg("1", 1);
    p = ngx_http_civicgate_key_citizen(keys[2], ev->citizen, ev->citizen_len,
                                       NGX_HTTP_CIVICGATE_KEY_JOURNEYS);
    arg(keys[2], p - keys[2]);
    arg(values[0].data, values[0].len);
    arg(ev->journey, NGX_HTTP_CIVICGATE_JID_LEN);
    arg(bufs[3], ttl_len);

#undef arg

    return ngx_http_civicgate_event_cmd(ecf, s, n, argv, lens);
}


/* the global stream, for agencies' consumer groups */

static ngx_int_t
ngx_http_civicgate_event_xadd(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_send_t *s, ngx_str_t *values)
{
    u_char       maxlen[NGX_INT_T_LEN], *p;
    size_t       lens[NGX_HTTP_CIVICGATE_EVENT_ARGS];
    ngx_uint_t   i, n;
    const char  *argv[NGX_HTTP_CIVICGATE_EVENT_ARGS];

#define arg(d, l)  argv[n] = (const char *) (d); lens[n++] = (l)

    n = 0;
    arg("XADD", 4);
    arg(NGX_HTTP_CIVICGATE_KEY_EVENTS_STREAM,
        sizeof(NGX_HTTP_CIVICGATE_KEY_EVENTS_STREAM) - 1);
    arg("MAXLEN", 6);
    arg("~", 1);
    p = ngx_sprintf(maxlen, "%ui", ecf->maxlen);
    arg(maxlen, p - maxlen);
    arg("*", 1);

    for (i = 0; i < NGX_HTTP_CIVICGATE_EVENT_FIELDS; i++) {
        arg(ngx_http_civicgate_event_names[i].data,
            ngx_http_civicgate_event_names[i].len);
        arg(values[i].data, values[i].len);
    }

#undef arg

    return ngx_http_civicgate_event_cmd(ecf, s, n, argv, lens);
}


static ngx_int_t
ngx_http_civicgate_event_cmd(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_send_t *s, int argc, const char **argv,
    size_t *lens)
{
    if (ngx_http_civicgate_redis_send(ecf->core->client, argc, argv, lens,
                                      ngx_http_civicgate_event_reply, s)
        == NULL)
    {
        return NGX_ERROR;
    }

    s->commands++;

    return NGX_OK;
}


/* the last reply of an event decides: written, or back to the spool */

static void
ngx_http_civicgate_event_reply(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_http_civicgate_event_send_t  *s = cmd->data;

    ngx_http_civicgate_events_conf_t  *ecf;
    ngx_http_civicgate_spool_batch_t  *b;

    ecf = s->ecf;

    if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
        if (reply && !s->failed) {
            ngx_http_civicgate_event_refused(ecf, reply);
        }

        s->failed = 1;
    }

    if (--s->commands) {
        return;
    }

    ngx_http_civicgate_metrics_inc(ecf->core->metrics,
                                   ecf->core->metrics->events,
                                   s->failed
                                   ? NGX_HTTP_CIVICGATE_EVENTS_FAILED
                                   : NGX_HTTP_CIVICGATE_EVENTS_WRITTEN);

    b = s->batch;

    if (b == NULL) {
        ngx_http_civicgate_event_settled(ecf, s);
        return;
    }

    b->failed |= s->failed;

    if (--b->pending == 0) {
        ngx_http_civicgate_spool_complete(b);
    }
}


/*
 * An event sent directly is answered.  Those that failed are kept, in the
 * order their replies came, which is the order they were logged; once no
 * other is in flight they go back in front of the spool, ahead of those
 * this worker spooled meanwhile.
 */

static void
ngx_http_civicgate_event_settled(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_send_t *s)
{
    ecf->direct--;

    if (s->failed) {
        ngx_queue_insert_tail(&ecf->back, &s->queue);
        ecf->nback++;

    } else {
        ngx_free(s);
    }

    if (ecf->direct == 0 && ecf->nback) {
        ngx_http_civicgate_spool_return(ecf);
    }
}


/* a refusal repeats for every event: logged once per interval */

static void
ngx_http_civicgate_event_refused(ngx_http_civicgate_events_conf_t *ecf,
    redisReply *reply)
{
    if (ngx_http_civicgate_log_due(&ecf->refused)) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "civicgate: redis refused a journey event: %*s",
                      (size_t) reply->len, reply->str);
    }

    if (ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0) {
        ngx_http_civicgate_redis_load_scripts(ecf->core->client);
    }
}


/* overflow drops the newest event: those spooled earlier keep their order */

static void
ngx_http_civicgate_spool_append(ngx_http_civicgate_events_conf_t *ecf,
    ngx_http_civicgate_event_t *ev)
{
    ngx_uint_t                         full;
    ngx_http_civicgate_spool_sh_t     *sh;

    sh = ecf->sh;

    ngx_shmtx_lock(&ecf->shpool->mutex);

    full = (sh->head - sh->tail >= sh->nslots);

    if (!full) {
        sh->slots[sh->head % sh->nslots] = *ev;
        sh->head++;

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
    ngx_uint_t                         i, n;
    ngx_queue_t                       *q;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_event_send_t   *s;

    sh = ecf->sh;

    ngx_shmtx_lock(&ecf->shpool->mutex);

    n = ngx_min(ecf->nback, sh->nslots - (sh->head - sh->tail));

    if (n && ngx_http_civicgate_spool_front(ecf, n) != NGX_OK) {
        n = 0;
    }

    for (i = 0; i < n; i++) {
        q = ngx_queue_head(&ecf->back);
        ngx_queue_remove(q);
        s = ngx_queue_data(q, ngx_http_civicgate_event_send_t, queue);

        sh->slots[(sh->tail + i) % sh->nslots] = s->event;
        ngx_free(s);
    }

    ngx_shmtx_unlock(&ecf->shpool->mutex);

    ngx_http_civicgate_metrics_add(ecf->core->metrics,
                                   ecf->core->metrics->events,
                                   NGX_HTTP_CIVICGATE_EVENTS_SPOOLED, n);

    while (!ngx_queue_empty(&ecf->back)) {
        q = ngx_queue_head(&ecf->back);
        ngx_queue_remove(q);
        s = ngx_queue_data(q, ngx_http_civicgate_event_send_t, queue);

        ngx_http_civicgate_spool_append(ecf, &s->event);
        ngx_free(s);
    }

    ecf->nback = 0;
}


/*
 * Under the lock: n slots before the tail.  Claimed events are there: the
 * new slots get claims of their own, "to send again", which come first.
 * A spool moved away by a reload counts only what is appended to it.
 */

static ngx_int_t
ngx_http_civicgate_spool_front(ngx_http_civicgate_events_conf_t *ecf,
    ngx_uint_t n)
{
    ngx_uint_t                         size, k, last;
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
    k = (n + size - 1) / size;

    if (sh->nclaims + k > NGX_HTTP_CIVICGATE_SPOOL_CLAIMS) {
        return NGX_DECLINED;
    }

    /* the last events first, each claim in front of the one before */
    last = n % size ? n % size : size;

    while (k--) {
        sh->first = (sh->first + NGX_HTTP_CIVICGATE_SPOOL_CLAIMS - 1)
                    % NGX_HTTP_CIVICGATE_SPOOL_CLAIMS;
        sh->nclaims++;

        c = &sh->claims[sh->first];
        c->n = last;
        last = size;
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
 * NGX_HTTP_CIVICGATE_SPOOL_BATCH events pipelined on its connection, while
 * the events in flight stay within its share of the drain limit.
 */

static void
ngx_http_civicgate_spool_drain(ngx_http_civicgate_events_conf_t *ecf)
{
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_spool_batch_t  *b;

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


static ngx_http_civicgate_spool_batch_t *
ngx_http_civicgate_spool_take(ngx_http_civicgate_events_conf_t *ecf)
{
    ngx_uint_t                         i;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_spool_claim_t  *c;
    ngx_http_civicgate_spool_batch_t  *b;

    sh = ecf->sh;
    b = NULL;

    ngx_shmtx_lock(&ecf->shpool->mutex);

    c = ngx_http_civicgate_spool_claim(ecf);

    if (c != NULL) {
        b = ngx_alloc(offsetof(ngx_http_civicgate_spool_batch_t, sends)
                      + c->n * sizeof(ngx_http_civicgate_event_send_t),
                      ngx_cycle->log);

        if (b == NULL) {
            ngx_http_civicgate_spool_release(sh, c, 0);

        } else {
            for (i = 0; i < c->n; i++) {
                b->sends[i].event = sh->slots[(c->start + i) % sh->nslots];
            }

            b->claim = c - sh->claims;
            b->start = c->start;
            b->n = c->n;
        }
    }

    ngx_shmtx_unlock(&ecf->shpool->mutex);

    if (b == NULL) {
        return NULL;
    }

    b->ecf = ecf;
    b->pending = 0;
    b->failed = 0;

    ecf->inflight += b->n;

    return b;
}


/*
 * Under the lock: first a claim whose sending failed or whose worker died
 * (past its deadline), else the next events, within the limits.
 */

static ngx_http_civicgate_spool_claim_t *
ngx_http_civicgate_spool_claim(ngx_http_civicgate_events_conf_t *ecf)
{
    ngx_uint_t                         i, room;
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

    c = &sh->claims[(sh->first + sh->nclaims)
                    % NGX_HTTP_CIVICGATE_SPOOL_CLAIMS];
    sh->nclaims++;

    c->start = sh->next;
    c->n = ngx_min(ngx_min(sh->head - sh->next, room),
                   NGX_HTTP_CIVICGATE_SPOOL_BATCH);
    c->done = 0;
    sh->next += c->n;
    sh->inflight += c->n;

claimed:

    c->pid = ngx_pid;
    c->deadline = ngx_current_msec + ecf->claim_ttl;

    return c;
}


static ngx_int_t
ngx_http_civicgate_spool_send(ngx_http_civicgate_spool_batch_t *b)
{
    ngx_int_t                         rc;
    ngx_uint_t                        i;
    ngx_http_civicgate_event_send_t  *s;

    rc = NGX_OK;

    for (i = 0; i < b->n; i++) {
        s = &b->sends[i];
        s->ecf = b->ecf;
        s->batch = b;
        s->commands = 0;
        s->failed = 0;

        if (ngx_http_civicgate_event_commands(b->ecf, s) != NGX_OK) {
            b->failed = 1;
            s->failed = 1;
            rc = NGX_ERROR;
        }

        if (s->commands == 0) {
            break;
        }

        b->pending++;

        if (rc != NGX_OK) {
            break;
        }
    }

    if (b->pending == 0) {
        ngx_http_civicgate_spool_complete(b);
    }

    return rc;
}


/* all replies in: the claim leaves the spool, or waits to be sent again */

static void
ngx_http_civicgate_spool_complete(ngx_http_civicgate_spool_batch_t *b)
{
    ngx_uint_t                         failed;
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_spool_claim_t  *c;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = b->ecf;
    sh = ecf->sh;
    c = &sh->claims[b->claim];
    failed = b->failed;

    ngx_shmtx_lock(&ecf->shpool->mutex);

    /* unless another worker took it over meanwhile */
    if (c->pid == ngx_pid && c->start == b->start && !c->done) {
        ngx_http_civicgate_spool_release(sh, c, !failed);
    }

    ngx_shmtx_unlock(&ecf->shpool->mutex);

    ecf->inflight -= b->n;

    ngx_free(b);

    /* after a failure, the timer tries again */
    if (!failed && !ngx_exiting) {
        ngx_http_civicgate_spool_drain(ecf);
    }
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


/* unlocked: a reading a moment old is good enough for a health check */

ngx_uint_t
ngx_http_civicgate_events_spool_high(void)
{
    ngx_http_civicgate_spool_sh_t     *sh;
    ngx_http_civicgate_events_conf_t  *ecf;

    ecf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                            ngx_http_civicgate_events_module);

    if (ecf == NULL || ecf->sh == NULL) {
        return 0;
    }

    sh = ecf->sh;

    return (sh->head - sh->tail) * 100
           >= (uint64_t) sh->nslots * NGX_HTTP_CIVICGATE_SPOOL_HIGH;
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
