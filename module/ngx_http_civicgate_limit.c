
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <openssl/sha.h>

#include "ngx_http_civicgate_limit.h"
#include "ngx_http_civicgate_conf.h"
#include "ngx_http_civicgate_json.h"
#include "ngx_http_civicgate_metrics.h"


static ngx_http_civicgate_log_limit_t  ngx_http_civicgate_limit_refused;
static ngx_http_civicgate_log_limit_t  ngx_http_civicgate_limit_denied;


#define NGX_HTTP_CIVICGATE_LIMIT_RESULTS  5
#define NGX_HTTP_CIVICGATE_LIMIT_ARGS     (4 + 3 * NGX_HTTP_CIVICGATE_LIMIT_MAX)
#define NGX_HTTP_CIVICGATE_LIMIT_ITEM     (NGX_HTTP_CIVICGATE_SERVICE_MAX      \
                                           + 3 * NGX_INT64_LEN)

/* keys per reconciliation call */
#define NGX_HTTP_CIVICGATE_LIMIT_CHUNK    512


/* a key's count taken out of shared memory, until Redis has it */
typedef struct {
    u_char                              digest[NGX_HTTP_CIVICGATE_TABLE_KEY];
    uint64_t                            count;
    ngx_uint_t                          slot;       /* cluster */
} ngx_http_civicgate_limit_synced_t;


/* one interval's counts of a zone, sent in one or more calls */
typedef struct {
    ngx_http_civicgate_limit_zone_t    *zone;
    ngx_pool_t                         *pool;
    ngx_array_t                         keys;       /* of synced_t */
    ngx_uint_t                          out;        /* calls awaiting */
} ngx_http_civicgate_limit_sync_t;


typedef struct {
    ngx_http_civicgate_limit_sync_t    *sync;
    ngx_uint_t                          first;
    ngx_uint_t                          n;
} ngx_http_civicgate_limit_chunk_t;


/* a key of a batch: whose, which of its limits, the key's slot */
typedef struct {
    ngx_http_civicgate_limit_waiter_t  *waiter;
    ngx_http_civicgate_limit_t         *limit;
    ngx_uint_t                          state;
    ngx_uint_t                          slot;
    ngx_uint_t                          order;      /* in the batch */
    u_char                              digest[NGX_HTTP_CIVICGATE_KEY_DIGEST];
} ngx_http_civicgate_limit_key_t;


/* one script call of a batch: the keys of one slot in a cluster, else all */
typedef struct {
    ngx_http_civicgate_limit_batch_t   *batch;
    ngx_http_civicgate_limit_key_t     *keys;
    ngx_uint_t                          nkeys;
    unsigned                            failed:1;   /* not sent */
} ngx_http_civicgate_limit_call_t;


#define NGX_HTTP_CIVICGATE_QUOTA_EXCEEDED                                     \
    "https://iana.org/assignments/http-problem-types#quota-exceeded"


static char *ngx_http_civicgate_limit_zone(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_civicgate_limit(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_civicgate_limit_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_limit_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_limit_hooks(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_limit_labels(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m,
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_zone_t *zone);
static ngx_int_t ngx_http_civicgate_limit_scripts(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf,
    ngx_http_civicgate_limit_main_conf_t *lmcf);
static ngx_int_t ngx_http_civicgate_limit_init_process(ngx_cycle_t *cycle);
static void *ngx_http_civicgate_limit_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_civicgate_limit_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_limit_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_int_t ngx_http_civicgate_limit_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_limit_header_filter(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_limit_headers(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_limit_status_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static char *ngx_http_civicgate_limit_zone_add(ngx_conf_t *cf,
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_zone_t *zone, ssize_t size);
static char *ngx_http_civicgate_limit_zone_param(ngx_conf_t *cf,
    ngx_http_civicgate_limit_zone_t *zone, ngx_str_t *value, ssize_t *size);
static ngx_int_t ngx_http_civicgate_limit_param(ngx_conf_t *cf,
    ngx_http_civicgate_limit_t *limit, ngx_str_t *value,
    ngx_uint_t *delay_set);
static ngx_shm_zone_t *ngx_http_civicgate_limit_shm(ngx_conf_t *cf,
    ngx_str_t *zone, size_t size);
static ngx_int_t ngx_http_civicgate_limit_rate(
    ngx_http_civicgate_limit_zone_t *zone, ngx_str_t *value);
static ngx_int_t ngx_http_civicgate_limit_sync_interval(
    ngx_http_civicgate_limit_zone_t *zone, ngx_str_t *value);
static ngx_int_t ngx_http_civicgate_limit_store(
    ngx_http_civicgate_limit_zone_t *zone, ngx_str_t *value);
static ngx_int_t ngx_http_civicgate_limit_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static ngx_int_t ngx_http_civicgate_limit_start(ngx_http_request_t *r,
    void *data);
static ngx_int_t ngx_http_civicgate_limit_digest(ngx_http_request_t *r,
    ngx_http_civicgate_limit_t *limit, u_char *digest);
static ngx_int_t ngx_http_civicgate_limit_enqueue(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx);
static ngx_http_civicgate_limit_batch_t *ngx_http_civicgate_limit_batch_new(
    void);
static void ngx_http_civicgate_limit_cleanup(void *data);
static void ngx_http_civicgate_limit_flush(ngx_event_t *ev);
static ngx_uint_t ngx_http_civicgate_limit_slot(u_char *digest);
static ngx_int_t ngx_http_civicgate_limit_batch_send(
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_batch_t *batch);
static ngx_http_civicgate_limit_key_t *ngx_http_civicgate_limit_batch_keys(
    ngx_http_civicgate_limit_batch_t *batch, ngx_uint_t *nkeys);
static int ngx_libc_cdecl ngx_http_civicgate_limit_key_cmp(const void *one,
    const void *two);
static ngx_int_t ngx_http_civicgate_limit_call_send(
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_call_t *call);
static void ngx_http_civicgate_limit_call_reply(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static void ngx_http_civicgate_limit_call_done(
    ngx_http_civicgate_limit_call_t *call, redisReply *reply);
static void ngx_http_civicgate_limit_answer(
    ngx_http_civicgate_limit_call_t *call, redisReply *reply);
static void ngx_http_civicgate_limit_batch_release(
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_batch_t *batch);
static void ngx_http_civicgate_limit_batch_fail(
    ngx_http_civicgate_limit_batch_t *batch);
static void ngx_http_civicgate_limit_give_back(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx);
static ngx_uint_t ngx_http_civicgate_limit_charged(
    ngx_http_civicgate_limit_ctx_t *lctx, ngx_uint_t slot);
static void ngx_http_civicgate_limit_give_back_slot(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx, ngx_uint_t slot);
static void ngx_http_civicgate_limit_given_back(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static ngx_int_t ngx_http_civicgate_limit_verdict(ngx_http_request_t *r,
    void *data);
static void ngx_http_civicgate_limit_evaluate(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx, ngx_uint_t *deny);
static ngx_uint_t ngx_http_civicgate_limit_fallback(ngx_http_request_t *r,
    ngx_http_civicgate_limit_state_t *st);
static ngx_int_t ngx_http_civicgate_limit_reject(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx, ngx_uint_t deny);
static ngx_int_t ngx_http_civicgate_limit_unavailable(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_retry_after(ngx_http_request_t *r,
    uint64_t retry);
static void ngx_http_civicgate_limit_delay(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_limit_reserve(
    ngx_http_civicgate_limit_ctx_t *lctx, ngx_uint_t charge);
static ngx_uint_t ngx_http_civicgate_limit_zones(
    ngx_http_civicgate_limit_ctx_t *lctx,
    ngx_http_civicgate_limit_zone_t **zones);
static ngx_uint_t ngx_http_civicgate_limit_pending(
    ngx_http_civicgate_limit_state_t *st);
static void ngx_http_civicgate_limit_check(
    ngx_http_civicgate_limit_state_t *st, uint64_t now);
static void ngx_http_civicgate_limit_charge(
    ngx_http_civicgate_limit_state_t *st, uint64_t now);
static void ngx_http_civicgate_limit_refund(
    ngx_http_civicgate_limit_ctx_t *lctx);
static void ngx_http_civicgate_limit_expire(
    ngx_http_civicgate_limit_zone_t *zone, uint64_t now);
static void ngx_http_civicgate_limit_sync_count(
    ngx_http_civicgate_table_node_t *node, ngx_int_t n);
static void ngx_http_civicgate_limit_sync_timer(ngx_event_t *ev);
static void ngx_http_civicgate_limit_sync(
    ngx_http_civicgate_limit_zone_t *zone);
static ngx_uint_t ngx_http_civicgate_limit_sync_due(
    ngx_http_civicgate_limit_zone_t *zone);
static ngx_http_civicgate_limit_sync_t *ngx_http_civicgate_limit_sync_collect(
    ngx_http_civicgate_limit_zone_t *zone);
static void ngx_http_civicgate_limit_sync_slots(
    ngx_http_civicgate_limit_sync_t *sync);
static int ngx_libc_cdecl ngx_http_civicgate_limit_synced_cmp(
    const void *one, const void *two);
static ngx_uint_t ngx_http_civicgate_limit_sync_chunk(
    ngx_http_civicgate_limit_sync_t *sync, ngx_uint_t first);
static ngx_int_t ngx_http_civicgate_limit_sync_send(
    ngx_http_civicgate_main_conf_t *cgmcf,
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_sync_t *sync, ngx_uint_t first, ngx_uint_t n);
static void ngx_http_civicgate_limit_sync_reply(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static void ngx_http_civicgate_limit_sync_adopt(
    ngx_http_civicgate_limit_sync_t *sync,
    ngx_http_civicgate_limit_chunk_t *chunk, redisReply *reply);
static void ngx_http_civicgate_limit_sync_restore(
    ngx_http_civicgate_limit_sync_t *sync, ngx_uint_t first, ngx_uint_t n);
static void ngx_http_civicgate_limit_sync_result(
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_zone_t *zone, ngx_uint_t ok);
static u_char *ngx_http_civicgate_limit_items(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx, ngx_uint_t policy, size_t *len);


/*
 * GCRA over the requests a worker collected in one event-loop iteration,
 * with the server's clock, read once.  For each request, every limit is
 * checked first, then all are charged or none (a rejected request
 * consumes no quota; a dry run is charged as limit_req's is); a request
 * sees the charges of the requests before it in the batch.  Keys are read
 * in one MGET and each charged key written once.  KEYS: every request's
 * keys in turn.  ARGV: per request, its number of keys, then per key
 * interval and tolerance (burst * interval), microseconds.  Returns each
 * key's excess, in the order of KEYS (one element per request with one
 * limit), then the clock: where a charge left a TAT.
 */
static const char  ngx_http_civicgate_limit_lua[] =
    "local t = redis.call('TIME')\n"
    "local now = t[1] * 1000000 + t[2]\n"
    "local v\n"
    "if #KEYS <= 1000 then\n"
    "  v = redis.call('MGET', unpack(KEYS))\n"
    "else\n"
    "  v = {}\n"
    "  for i = 1, #KEYS, 1000 do\n"
    "    local p = redis.call('MGET', unpack(KEYS, i, math.min(i + 999, #KEYS)))\n"
    "    for j = 1, #p do v[i + j - 1] = p[j] end\n"
    "  end\n"
    "end\n"
    "local tat, out, dirty = {}, {}, {}\n"
    "local a, k, nargv = 1, 0, #ARGV\n"
    "while a <= nargv do\n"
    "  local m = tonumber(ARGV[a])\n"
    "  local ok = true\n"
    "  for i = 1, m do\n"
    "    local x = tat[KEYS[k + i]] or tonumber(v[k + i]) or now\n"
    "    if x < now then x = now end\n"
    "    out[k + i] = x - now\n"
    "    if x - now > tonumber(ARGV[a + 2 * i]) then ok = false end\n"
    "  end\n"
    "  if ok then\n"
    "    for i = 1, m do\n"
    "      local key = KEYS[k + i]\n"
    "      if not tat[key] then dirty[#dirty + 1] = key end\n"
    "      tat[key] = now + out[k + i] + tonumber(ARGV[a + 2 * i - 1])\n"
    "    end\n"
    "  end\n"
    "  a = a + 1 + 2 * m\n"
    "  k = k + m\n"
    "end\n"
    "for i = 1, #dirty do\n"
    "  local x = tat[dirty[i]]\n"
    "  redis.call('SET', dirty[i], string.format('%d', x), 'PX',"
    " math.floor((x - now) / 1000) + 1)\n"
    "end\n"
    "out[#KEYS + 1] = now\n"
    "return out\n";


/*
 * The synchronised mode's reconciliation: each key's count of requests a
 * gateway admitted since its last call is charged at once to the key's
 * TAT, with the server's clock; returns every key's backlog (excess), the
 * state the gateway adopts.  KEYS: the keys of one zone.  ARGV: the
 * zone's interval (us), then one count per key.
 */
static const char  ngx_http_civicgate_limit_sync_lua[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local interval = tonumber(ARGV[1])\n"
    "local v = redis.call('MGET', unpack(KEYS))\n"
    "local out = {}\n"
    "for i = 1, #KEYS do\n"
    "  local tat = tonumber(v[i]) or now\n"
    "  if tat < now then tat = now end\n"
    "  local n = tonumber(ARGV[i + 1])\n"
    "  if n > 0 then\n"
    "    tat = tat + n * interval\n"
    "    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX',"
    " math.floor((tat - now) / 1000) + 1)\n"
    "  end\n"
    "  out[i] = tat - now\n"
    "end\n"
    "return out\n";


/*
 * Cluster: a request whose keys are in several slots is checked by one
 * call per slot; if another slot's limit rejects it, the charges a call
 * made are given back.  Without a later charge the key's TAT is AFTER
 * and goes back one interval; later charges added whole intervals to it
 * (a multiple of the interval above AFTER), so one interval less is
 * still what they would have left without ours.  Anything else means
 * the key drained since (expired, or charged from rest): ours no longer
 * weighs in it and there is nothing to give back.  KEYS: the keys of one
 * slot.  ARGV: per key, AFTER and the interval (us).
 */
static const char  ngx_http_civicgate_limit_refund_lua[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local n = 0\n"
    "for i = 1, #KEYS do\n"
    "  local after = tonumber(ARGV[2 * i - 1])\n"
    "  local interval = tonumber(ARGV[2 * i])\n"
    "  local tat = tonumber(redis.call('GET', KEYS[i]))\n"
    "  if tat and tat >= after and (tat - after) % interval == 0 then\n"
    "    tat = tat - interval\n"
    "    n = n + 1\n"
    "    if tat > now then\n"
    "      redis.call('SET', KEYS[i], string.format('%d', tat), 'PX',"
    " math.floor((tat - now) / 1000) + 1)\n"
    "    else\n"
    "      redis.call('DEL', KEYS[i])\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return n\n";


static ngx_str_t  ngx_http_civicgate_limit_statuses[] = {
    ngx_string("PASSED"),
    ngx_string("DELAYED"),
    ngx_string("REJECTED"),
    ngx_string("DELAYED_DRY_RUN"),
    ngx_string("REJECTED_DRY_RUN")
};

static char  *ngx_http_civicgate_limit_results[] = {
    "passed", "delayed", "rejected", "delayed_dry_run", "rejected_dry_run"
};

#define NGX_HTTP_CIVICGATE_LIMIT_PASSED            0
#define NGX_HTTP_CIVICGATE_LIMIT_DELAYED           1
#define NGX_HTTP_CIVICGATE_LIMIT_REJECTED          2
#define NGX_HTTP_CIVICGATE_LIMIT_DELAYED_DRY_RUN   3
#define NGX_HTTP_CIVICGATE_LIMIT_REJECTED_DRY_RUN  4


static ngx_conf_enum_t  ngx_http_civicgate_limit_log_levels[] = {
    { ngx_string("info"), NGX_LOG_INFO },
    { ngx_string("notice"), NGX_LOG_NOTICE },
    { ngx_string("warn"), NGX_LOG_WARN },
    { ngx_string("error"), NGX_LOG_ERR },
    { ngx_null_string, 0 }
};


static ngx_conf_num_bounds_t  ngx_http_civicgate_limit_status_bounds = {
    ngx_conf_check_num_bounds, 400, 599
};


static ngx_command_t  ngx_http_civicgate_limit_commands[] = {

    { ngx_string("civicgate_limit_zone"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_civicgate_limit_zone,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_limit"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_civicgate_limit,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_limit_dry_run"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_limit_loc_conf_t, limit_dry_run),
      NULL },

    { ngx_string("civicgate_limit_status"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_limit_loc_conf_t, limit_status),
      &ngx_http_civicgate_limit_status_bounds },

    { ngx_string("civicgate_limit_log_level"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_limit_loc_conf_t, limit_log_level),
      &ngx_http_civicgate_limit_log_levels },

    { ngx_string("civicgate_limit_headers"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_limit_loc_conf_t, limit_headers),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_civicgate_limit_module_ctx = {
    ngx_http_civicgate_limit_preconfiguration, /* preconfiguration */
    ngx_http_civicgate_limit_postconfiguration, /* postconfiguration */

    ngx_http_civicgate_limit_create_main_conf, /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_civicgate_limit_create_loc_conf, /* create location conf */
    ngx_http_civicgate_limit_merge_loc_conf   /* merge location conf */
};


ngx_module_t  ngx_http_civicgate_limit_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_limit_module_ctx,  /* module context */
    ngx_http_civicgate_limit_commands,     /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_civicgate_limit_init_process, /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_variable_t  ngx_http_civicgate_limit_vars[] = {

    { ngx_string("civicgate_limit_status"), NULL,
      ngx_http_civicgate_limit_status_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


static ngx_int_t
ngx_http_civicgate_limit_preconfiguration(ngx_conf_t *cf)
{
    if (ngx_http_civicgate_add_state(cf, &ngx_http_civicgate_limit_module)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_civicgate_add_variables(cf, ngx_http_civicgate_limit_vars);
}


static void *
ngx_http_civicgate_limit_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_limit_main_conf_t  *lmcf;

    lmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_limit_main_conf_t));
    if (lmcf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&lmcf->zones, cf->pool, 4,
                       sizeof(ngx_http_civicgate_limit_zone_t *))
        != NGX_OK)
    {
        return NULL;
    }

    return lmcf;
}


static void *
ngx_http_civicgate_limit_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_limit_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_limit_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->limits = NULL;
     */

    conf->limit_dry_run = NGX_CONF_UNSET;
    conf->limit_status = NGX_CONF_UNSET_UINT;
    conf->limit_log_level = NGX_CONF_UNSET_UINT;
    conf->limit_headers = NGX_CONF_UNSET;

    return conf;
}


/* configuration */

static char *
ngx_http_civicgate_limit_zone(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_limit_main_conf_t *lmcf = conf;

    char                               *rv;
    ssize_t                             size;
    ngx_str_t                          *value;
    ngx_uint_t                          i;
    ngx_http_civicgate_limit_zone_t    *zone;
    ngx_http_compile_complex_value_t    ccv;

    value = cf->args->elts;

    zone = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_limit_zone_t));
    if (zone == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));
    ccv.cf = cf;
    ccv.value = &value[1];
    ccv.complex_value = &zone->key;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    zone->store = NGX_CONF_UNSET_UINT;
    zone->on_error = NGX_HTTP_CIVICGATE_ON_ERROR_LOCAL;
    zone->file = cf->conf_file->file.name.data;
    zone->line = cf->conf_file->line;
    size = 0;

    for (i = 2; i < cf->args->nelts; i++) {
        rv = ngx_http_civicgate_limit_zone_param(cf, zone, &value[i], &size);
        if (rv != NGX_CONF_OK) {
            return rv;
        }
    }

    if (zone->name.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    /* the name appears in response headers and metrics labels */
    if (!ngx_http_civicgate_name_valid(zone->name.data, zone->name.len,
                                       NGX_HTTP_CIVICGATE_SERVICE_MAX))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid zone name \"%V\": use [a-z0-9_-]",
                           &zone->name);
        return NGX_CONF_ERROR;
    }

    if (zone->interval == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"rate\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    return ngx_http_civicgate_limit_zone_add(cf, lmcf, zone, size);
}


/* a name of its own, beside the module's other zones; size 0: a use */

static ngx_shm_zone_t *
ngx_http_civicgate_limit_shm(ngx_conf_t *cf, ngx_str_t *zone, size_t size)
{
    u_char     *p;
    ngx_str_t   name;

    name.len = sizeof("civicgate_limit:") - 1 + zone->len;
    name.data = ngx_pnalloc(cf->pool, name.len);
    if (name.data == NULL) {
        return NULL;
    }

    p = ngx_cpymem(name.data, "civicgate_limit:",
                   sizeof("civicgate_limit:") - 1);
    ngx_memcpy(p, zone->data, zone->len);

    return ngx_shared_memory_add(cf, &name, size, &ngx_http_civicgate_module);
}


/* once per name; the shared memory is the zone's own */

static char *
ngx_http_civicgate_limit_zone_add(ngx_conf_t *cf,
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_zone_t *zone, ssize_t size)
{
    ngx_uint_t                        i;
    ngx_http_civicgate_limit_zone_t **zp;

    zp = lmcf->zones.elts;

    for (i = 0; i < lmcf->zones.nelts; i++) {
        if (zp[i]->name.len == zone->name.len
            && ngx_strncmp(zp[i]->name.data, zone->name.data,
                           zone->name.len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate zone \"%V\"", &zone->name);
            return NGX_CONF_ERROR;
        }
    }

    zone->shm_zone = ngx_http_civicgate_limit_shm(cf, &zone->name, size);
    if (zone->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    if (zone->shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate zone \"%V\"", &zone->name);
        return NGX_CONF_ERROR;
    }

    zone->shm_zone->init = ngx_http_civicgate_limit_init_zone;
    zone->shm_zone->data = zone;
    zone->index = lmcf->zones.nelts;

    zp = ngx_array_push(&lmcf->zones);
    if (zp == NULL) {
        return NGX_CONF_ERROR;
    }

    *zp = zone;

    return NGX_CONF_OK;
}


static char *
ngx_http_civicgate_limit_zone_param(ngx_conf_t *cf,
    ngx_http_civicgate_limit_zone_t *zone, ngx_str_t *value, ssize_t *size)
{
    ngx_int_t  rc;

    if (ngx_strncmp(value->data, "zone=", 5) == 0) {
        rc = ngx_http_civicgate_zone_param(cf, value, &zone->name, size);

    } else if (ngx_strncmp(value->data, "rate=", 5) == 0) {
        rc = ngx_http_civicgate_limit_rate(zone, value);

    } else if (ngx_strncmp(value->data, "sync=", 5) == 0) {
        rc = ngx_http_civicgate_limit_sync_interval(zone, value);

    } else {
        rc = ngx_http_civicgate_limit_store(zone, value);
    }

    if (rc == NGX_ERROR) {
        return NGX_CONF_ERROR;
    }

    if (rc == NGX_DECLINED) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", value);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* rate=Nr/s or rate=Nr/m: the interval between two requests, in us */

static ngx_int_t
ngx_http_civicgate_limit_rate(ngx_http_civicgate_limit_zone_t *zone,
    ngx_str_t *value)
{
    u_char     *p;
    size_t      len;
    ngx_int_t   rate;

    len = value->len;
    p = value->data + len - 3;

    if (len > 8 && ngx_strncmp(p, "r/s", 3) == 0) {
        zone->window = 1;

    } else if (len > 8 && ngx_strncmp(p, "r/m", 3) == 0) {
        zone->window = 60;

    } else {
        return NGX_DECLINED;
    }

    rate = ngx_atoi(value->data + 5, len - 8);
    if (rate <= 0) {
        return NGX_DECLINED;
    }

    zone->quota = rate;
    zone->interval = (uint64_t) zone->window * 1000000 / rate;

    return zone->interval ? NGX_OK : NGX_DECLINED;
}


/* sync=time: decided locally, reconciled with Redis every interval */

static ngx_int_t
ngx_http_civicgate_limit_sync_interval(ngx_http_civicgate_limit_zone_t *zone,
    ngx_str_t *value)
{
    ngx_str_t  s;
    ngx_int_t  ms;

    s.data = value->data + 5;
    s.len = value->len - 5;

    ms = ngx_parse_time(&s, 0);

    if (ms == NGX_ERROR || ms == 0) {
        return NGX_DECLINED;
    }

    zone->sync = (ngx_msec_t) ms;

    return NGX_OK;
}


/* store= and on_error= */

static ngx_int_t
ngx_http_civicgate_limit_store(ngx_http_civicgate_limit_zone_t *zone,
    ngx_str_t *value)
{
    if (ngx_strcmp(value->data, "store=redis") == 0) {
        zone->store = NGX_HTTP_CIVICGATE_LIMIT_REDIS;
        return NGX_OK;
    }

    if (ngx_strcmp(value->data, "store=local") == 0) {
        zone->store = NGX_HTTP_CIVICGATE_LIMIT_LOCAL;
        return NGX_OK;
    }

    if (ngx_strcmp(value->data, "on_error=local") == 0) {
        zone->on_error = NGX_HTTP_CIVICGATE_ON_ERROR_LOCAL;
        return NGX_OK;
    }

    if (ngx_strcmp(value->data, "on_error=allow") == 0) {
        zone->on_error = NGX_HTTP_CIVICGATE_ON_ERROR_ALLOW;
        return NGX_OK;
    }

    if (ngx_strcmp(value->data, "on_error=deny") == 0) {
        zone->on_error = NGX_HTTP_CIVICGATE_ON_ERROR_DENY;
        return NGX_OK;
    }

    return NGX_DECLINED;
}


static char *
ngx_http_civicgate_limit(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_limit_loc_conf_t *cglcf = conf;

    ngx_int_t                    n;
    ngx_str_t                   *value;
    ngx_uint_t                   i, delay_set;
    ngx_http_civicgate_limit_t  *limit;

    if (cglcf->limits == NULL) {
        cglcf->limits = ngx_array_create(cf->pool, 2,
                                         sizeof(ngx_http_civicgate_limit_t));
        if (cglcf->limits == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    if (cglcf->limits->nelts == NGX_HTTP_CIVICGATE_LIMIT_MAX) {
        return "is used too many times in one location";
    }

    limit = ngx_array_push(cglcf->limits);
    if (limit == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(limit, sizeof(ngx_http_civicgate_limit_t));

    limit->file = cf->conf_file->file.name.data;
    limit->line = cf->conf_file->line;

    value = cf->args->elts;
    delay_set = 0;

    for (i = 1; i < cf->args->nelts; i++) {
        n = ngx_http_civicgate_limit_param(cf, limit, &value[i], &delay_set);

        if (n == NGX_ERROR) {
            return NGX_CONF_ERROR;
        }

        if (n == NGX_DECLINED) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }
    }

    if (limit->shm_zone == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" must have \"zone\" parameter",
                           &cmd->name);
        return NGX_CONF_ERROR;
    }

    /* the zone may be declared further down the http block */
    limit->zone = limit->shm_zone->data;

    return NGX_CONF_OK;
}


/* zone=, burst=, delay= or nodelay; NGX_DECLINED: none, or not valid */

static ngx_int_t
ngx_http_civicgate_limit_param(ngx_conf_t *cf,
    ngx_http_civicgate_limit_t *limit, ngx_str_t *value,
    ngx_uint_t *delay_set)
{
    ngx_int_t  n;
    ngx_str_t  name;

    if (ngx_strncmp(value->data, "zone=", 5) == 0 && value->len > 5) {
        name.data = value->data + 5;
        name.len = value->len - 5;

        limit->shm_zone = ngx_http_civicgate_limit_shm(cf, &name, 0);

        return limit->shm_zone ? NGX_OK : NGX_ERROR;
    }

    if (ngx_strncmp(value->data, "burst=", 6) == 0) {
        n = ngx_atoi(value->data + 6, value->len - 6);
        limit->burst = n;

        return (n == NGX_ERROR) ? NGX_DECLINED : NGX_OK;
    }

    if (*delay_set) {
        return NGX_DECLINED;
    }

    *delay_set = 1;

    if (ngx_strncmp(value->data, "delay=", 6) == 0) {
        n = ngx_atoi(value->data + 6, value->len - 6);
        limit->delay = n;

        return (n == NGX_ERROR) ? NGX_DECLINED : NGX_OK;
    }

    if (ngx_strcmp(value->data, "nodelay") == 0) {
        limit->delay = NGX_MAX_INT32_VALUE;
        return NGX_OK;
    }

    return NGX_DECLINED;
}


static char *
ngx_http_civicgate_limit_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_civicgate_limit_loc_conf_t *prev = parent;
    ngx_http_civicgate_limit_loc_conf_t *conf = child;

    ngx_uint_t                   i;
    ngx_http_civicgate_limit_t  *limit;

    if (conf->limits == NULL) {
        conf->limits = prev->limits;
    }

    ngx_conf_merge_value(conf->limit_dry_run, prev->limit_dry_run, 0);
    ngx_conf_merge_uint_value(conf->limit_status, prev->limit_status,
                              NGX_HTTP_TOO_MANY_REQUESTS);
    ngx_conf_merge_uint_value(conf->limit_log_level, prev->limit_log_level,
                              NGX_LOG_ERR);
    ngx_conf_merge_value(conf->limit_headers, prev->limit_headers, 0);

    if (conf->limits == NULL) {
        return NGX_CONF_OK;
    }

    limit = conf->limits->elts;

    for (i = 0; i < conf->limits->nelts; i++) {
        limit[i].zone = limit[i].shm_zone->data;

        if (limit[i].zone == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "unknown civicgate_limit_zone \"%*s\" in %s:%ui",
                          limit[i].shm_zone->shm.name.len - 16,
                          limit[i].shm_zone->shm.name.data + 16,
                          limit[i].file, limit[i].line);
            return NGX_CONF_ERROR;
        }

        if (limit[i].delay > limit[i].burst) {
            limit[i].delay = limit[i].burst;
        }
    }

    return NGX_CONF_OK;
}


/* after the http block: default stores, the script, metrics labels */

static ngx_int_t
ngx_http_civicgate_limit_postconfiguration(ngx_conf_t *cf)
{
    ngx_uint_t                             i;
    ngx_http_civicgate_metrics_t          *m;
    ngx_http_civicgate_main_conf_t        *cgmcf;
    ngx_http_civicgate_limit_zone_t      **zone;
    ngx_http_civicgate_limit_main_conf_t  *lmcf;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);
    lmcf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_civicgate_limit_module);
    m = cgmcf->metrics;
    zone = lmcf->zones.elts;

    m->limit = ngx_http_civicgate_metrics_family(cf, m,
                   "civicgate_limit_requests_total",
                   "Rate-limit decisions by zone.",
                   NGX_HTTP_CIVICGATE_COUNTER);
    m->limit_fallbacks = ngx_http_civicgate_metrics_family(cf, m,
                   "civicgate_limit_fallbacks_total",
                   "Rate-limit decisions made without Redis, by zone and "
                   "on_error policy.", NGX_HTTP_CIVICGATE_COUNTER);

    lmcf->syncs = ngx_http_civicgate_metrics_family(cf, m,
                   "civicgate_limit_syncs_total",
                   "Reconciliations of synchronised rate-limit zones with "
                   "Redis, by zone and result.", NGX_HTTP_CIVICGATE_COUNTER);
    lmcf->synced_keys = ngx_http_civicgate_metrics_family(cf, m,
                   "civicgate_limit_synced_keys_total",
                   "Keys whose counts a synchronised zone sent to Redis.",
                   NGX_HTTP_CIVICGATE_COUNTER);

    if (m->limit == NULL || m->limit_fallbacks == NULL
        || lmcf->syncs == NULL || lmcf->synced_keys == NULL)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < lmcf->zones.nelts; i++) {
        if (zone[i]->store == NGX_CONF_UNSET_UINT) {
            zone[i]->store = cgmcf->redis ? NGX_HTTP_CIVICGATE_LIMIT_REDIS
                                          : NGX_HTTP_CIVICGATE_LIMIT_LOCAL;
        }

        if (zone[i]->sync && zone[i]->store != NGX_HTTP_CIVICGATE_LIMIT_REDIS)
        {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "civicgate_limit_zone \"%V\" with sync= "
                          "requires store=redis in %s:%ui",
                          &zone[i]->name, zone[i]->file, zone[i]->line);
            return NGX_ERROR;
        }

        if (zone[i]->store == NGX_HTTP_CIVICGATE_LIMIT_REDIS
            && cgmcf->redis == NULL)
        {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "civicgate_limit_zone \"%V\" with store=redis "
                          "requires \"civicgate_redis\" in %s:%ui",
                          &zone[i]->name, zone[i]->file, zone[i]->line);
            return NGX_ERROR;
        }

        if (ngx_http_civicgate_limit_labels(cf, m, lmcf, zone[i]) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    if (lmcf->zones.nelts == 0) {
        return NGX_OK;
    }

    if (ngx_http_civicgate_limit_scripts(cf, cgmcf, lmcf) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_civicgate_limit_hooks(cf);
}


/* the preaccess phase handler, and RateLimit fields on the response */

static ngx_int_t
ngx_http_civicgate_limit_hooks(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PREACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_civicgate_limit_handler;

    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_civicgate_limit_header_filter;

    return NGX_OK;
}


/* the exact checks' script, and the reconciliation's if a zone syncs */

static ngx_int_t
ngx_http_civicgate_limit_scripts(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf,
    ngx_http_civicgate_limit_main_conf_t *lmcf)
{
    if (cgmcf->redis == NULL) {
        return NGX_OK;
    }

    lmcf->script = ngx_http_civicgate_redis_add_script(cf, cgmcf->redis,
                                                ngx_http_civicgate_limit_lua);
    if (lmcf->script == NULL) {
        return NGX_ERROR;
    }

    /* a request's keys in several slots go in several calls */
    if (cgmcf->redis->mode == NGX_HTTP_CIVICGATE_REDIS_CLUSTER) {
        lmcf->cluster = 1;
        lmcf->refund_script = ngx_http_civicgate_redis_add_script(cf,
                                  cgmcf->redis,
                                  ngx_http_civicgate_limit_refund_lua);
        if (lmcf->refund_script == NULL) {
            return NGX_ERROR;
        }
    }

    if (lmcf->nsync == 0) {
        return NGX_OK;
    }

    lmcf->sync_script = ngx_http_civicgate_redis_add_script(cf, cgmcf->redis,
                                           ngx_http_civicgate_limit_sync_lua);

    return lmcf->sync_script ? NGX_OK : NGX_ERROR;
}


/* every zone's series: one per result, and its fallbacks */

static ngx_int_t
ngx_http_civicgate_limit_labels(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m,
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_zone_t *zone)
{
    ngx_uint_t  j;

    if (zone->sync) {
        zone->sync_index = lmcf->nsync++;

        if (ngx_http_civicgate_metrics_label(cf, lmcf->syncs,
                "{zone=\"%V\",result=\"ok\"}", &zone->name) != NGX_OK
            || ngx_http_civicgate_metrics_label(cf, lmcf->syncs,
                "{zone=\"%V\",result=\"failed\"}", &zone->name) != NGX_OK
            || ngx_http_civicgate_metrics_label(cf, lmcf->synced_keys,
                "{zone=\"%V\"}", &zone->name) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    for (j = 0; j < NGX_HTTP_CIVICGATE_LIMIT_RESULTS; j++) {
        if (ngx_http_civicgate_metrics_label(cf, m->limit,
                "{zone=\"%V\",result=\"%s\"}", &zone->name,
                ngx_http_civicgate_limit_results[j])
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    if (ngx_http_civicgate_metrics_label(cf, m->limit_fallbacks,
            "{zone=\"%V\",on_error=\"%s\"}", &zone->name,
            zone->on_error == NGX_HTTP_CIVICGATE_ON_ERROR_LOCAL
            ? "local"
            : zone->on_error == NGX_HTTP_CIVICGATE_ON_ERROR_ALLOW
              ? "allow" : "deny")
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_limit_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_civicgate_limit_zone_t  *ozone = data;

    ngx_http_civicgate_limit_zone_t  *zone;

    zone = shm_zone->data;

    return ngx_http_civicgate_table_init(shm_zone, &zone->table,
                                         ozone ? &ozone->table : NULL,
                                         &zone->name);
}


/* the preaccess phase handler, re-entered until it has a verdict */

static ngx_int_t
ngx_http_civicgate_limit_handler(ngx_http_request_t *r)
{
    ngx_http_civicgate_limit_loc_conf_t  *cglcf;
    ngx_http_civicgate_limit_ctx_t       *lctx;

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_limit_module);

    if (cglcf->limits == NULL || r != r->main) {
        return NGX_DECLINED;
    }

    lctx = ngx_http_civicgate_get_state(r, &ngx_http_civicgate_limit_module);

    if (lctx == NULL) {
        lctx = ngx_pcalloc(r->pool, sizeof(ngx_http_civicgate_limit_ctx_t));
        if (lctx == NULL
            || ngx_http_civicgate_set_state(r, &ngx_http_civicgate_limit_module,
                                            lctx)
               != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    return ngx_http_civicgate_step(r, &lctx->step,
                                   ngx_http_civicgate_limit_start,
                                   ngx_http_civicgate_limit_verdict, lctx);
}


static ngx_int_t
ngx_http_civicgate_limit_start(ngx_http_request_t *r, void *data)
{
    ngx_http_civicgate_limit_ctx_t  *lctx = data;

    ngx_int_t                         rc;
    ngx_uint_t                        i, remote;
    ngx_http_civicgate_limit_t       *limit;
    ngx_http_civicgate_limit_loc_conf_t *cglcf;
    ngx_http_civicgate_limit_state_t *st;

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_limit_module);

    limit = cglcf->limits->elts;
    remote = 0;

    for (i = 0; i < cglcf->limits->nelts; i++) {
        st = &lctx->states[lctx->nstates];

        rc = ngx_http_civicgate_limit_digest(r, &limit[i], st->digest);

        if (rc == NGX_ERROR) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (rc == NGX_DECLINED) {
            /* an empty key is not limited, as in limit_req */
            continue;
        }

        st->limit = &limit[i];

        /* a synchronised zone decides locally, as a local one does */
        st->remote = (limit[i].zone->store == NGX_HTTP_CIVICGATE_LIMIT_REDIS
                      && limit[i].zone->sync == 0);
        remote |= st->remote;
        lctx->nstates++;
    }

    if (lctx->nstates == 0) {
        lctx->step.done = 1;
        return NGX_DECLINED;
    }

    /*
     * the local limits are decided and charged at once, before Redis: a
     * request they reject is not sent to Redis; one Redis rejects gives
     * their charge back
     */
    if (ngx_http_civicgate_limit_reserve(lctx, 1) != NGX_OK) {
        for (i = 0; i < lctx->nstates; i++) {
            lctx->states[i].skipped |= lctx->states[i].remote;
        }

        lctx->step.replied = 1;
        return NGX_OK;
    }

    if (remote) {
        rc = ngx_http_civicgate_limit_enqueue(r, lctx);

        if (rc == NGX_OK) {
            lctx->step.waiting = 1;
            ngx_http_civicgate_wait(r);
            return NGX_AGAIN;
        }

        if (rc == NGX_ERROR) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        lctx->step.failed = 1;
    }

    lctx->step.replied = 1;

    return NGX_OK;
}


/* keys reach Redis and shared memory only as a keyed digest */

static ngx_int_t
ngx_http_civicgate_limit_digest(ngx_http_request_t *r,
    ngx_http_civicgate_limit_t *limit, u_char *digest)
{
    u_char                           mac[NGX_HTTP_CIVICGATE_SHA256_LEN];
    ngx_str_t                        key;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    if (ngx_http_complex_value(r, &limit->zone->key, &key) != NGX_OK) {
        return NGX_ERROR;
    }

    if (key.len == 0) {
        return NGX_DECLINED;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    if (cgmcf->keyring) {
        ngx_http_civicgate_mac(&cgmcf->keyring->limit_mac, key.data, key.len,
                               mac);

    } else {
        SHA256(key.data, key.len, mac);
    }

    ngx_memcpy(digest, mac, NGX_HTTP_CIVICGATE_KEY_DIGEST);

    return NGX_OK;
}


/*
 * The exact checks of a worker's requests go to Redis together: a request
 * joins the batch of the current event-loop iteration, which a posted
 * event sends once every ready event has run, as one script call (one
 * per hash slot in a cluster).
 */

static ngx_int_t
ngx_http_civicgate_limit_enqueue(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx)
{
    ngx_uint_t                             i;
    ngx_pool_cleanup_t                    *cln;
    ngx_http_civicgate_main_conf_t        *cgmcf;
    ngx_http_civicgate_limit_batch_t      *batch;
    ngx_http_civicgate_limit_waiter_t     *w, **wp;
    ngx_http_civicgate_limit_main_conf_t  *lmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_limit_module);

    if (!ngx_http_civicgate_redis_accepting(cgmcf->client)) {
        return NGX_DECLINED;
    }

    if (lmcf->batch == NULL) {
        lmcf->batch = ngx_http_civicgate_limit_batch_new();
        if (lmcf->batch == NULL) {
            return NGX_DECLINED;
        }

        lmcf->flush.handler = ngx_http_civicgate_limit_flush;
        lmcf->flush.data = lmcf;
        lmcf->flush.log = ngx_cycle->log;

        ngx_post_event(&lmcf->flush, &ngx_posted_events);
    }

    batch = lmcf->batch;

    cln = ngx_pool_cleanup_add(r->pool, 0);
    w = ngx_pcalloc(batch->pool, sizeof(ngx_http_civicgate_limit_waiter_t));

    if (cln == NULL || w == NULL) {
        return NGX_ERROR;
    }

    wp = ngx_array_push(&batch->waiters);
    if (wp == NULL) {
        return NGX_ERROR;
    }

    w->request = r;
    w->lctx = lctx;
    *wp = w;
    lctx->waiter = w;

    /* the request may end before the answer: it leaves the batch then */
    cln->handler = ngx_http_civicgate_limit_cleanup;
    cln->data = lctx;

    for (i = 0; i < lctx->nstates; i++) {
        if (!lctx->states[i].remote) {
            continue;
        }

        batch->nkeys++;

        if (lmcf->cluster) {
            lctx->states[i].slot =
                ngx_http_civicgate_limit_slot(lctx->states[i].digest);
        }
    }

    return NGX_OK;
}


/* the slot of cg:{l:DIGEST}:ZONE: its hash tag's, whatever the zone */

static ngx_uint_t
ngx_http_civicgate_limit_slot(u_char *digest)
{
    u_char  *p, tag[2 + 2 * NGX_HTTP_CIVICGATE_KEY_DIGEST];

    p = ngx_sprintf(tag, "l:%*xs", (size_t) NGX_HTTP_CIVICGATE_KEY_DIGEST,
                    digest);

    return ngx_http_civicgate_key_slot(tag, p - tag);
}


static ngx_http_civicgate_limit_batch_t *
ngx_http_civicgate_limit_batch_new(void)
{
    ngx_pool_t                        *pool;
    ngx_http_civicgate_limit_batch_t  *batch;

    pool = ngx_create_pool(4096, ngx_cycle->log);
    if (pool == NULL) {
        return NULL;
    }

    batch = ngx_pcalloc(pool, sizeof(ngx_http_civicgate_limit_batch_t));

    if (batch == NULL
        || ngx_array_init(&batch->waiters, pool, 16,
                          sizeof(ngx_http_civicgate_limit_waiter_t *))
           != NGX_OK)
    {
        ngx_destroy_pool(pool);
        return NULL;
    }

    batch->pool = pool;

    return batch;
}


static void
ngx_http_civicgate_limit_cleanup(void *data)
{
    ngx_http_civicgate_limit_ctx_t  *lctx = data;

    if (lctx->waiter != NULL) {
        lctx->waiter->request = NULL;
        lctx->waiter = NULL;
    }
}


/* a posted event, after the iteration's ready events: the batch goes */

static void
ngx_http_civicgate_limit_flush(ngx_event_t *ev)
{
    ngx_http_civicgate_limit_main_conf_t *lmcf = ev->data;

    ngx_http_civicgate_limit_batch_t  *batch;

    batch = lmcf->batch;

    /*
     * while a batch is out, the next one grows: sent when the answer
     * comes, so that a busy worker sends few, large calls; in a cluster,
     * where a batch is cut by slot anyway, each goes at once, so that a
     * slow master holds up only the keys of its slots
     */
    if (batch == NULL || (lmcf->out && !lmcf->cluster)) {
        return;
    }

    lmcf->batch = NULL;

    if (ngx_http_civicgate_limit_batch_send(lmcf, batch) != NGX_OK) {
        /* each request falls back to its zones' on_error= policy */
        ngx_http_civicgate_limit_batch_fail(batch);
    }
}


/*
 * The batch's keys in KEYS order: per request, its Redis limits.  In a
 * cluster, a call's keys must share a slot: the keys are sorted by slot,
 * the requests' order kept within one, and each slot's run is one call.
 */

static ngx_int_t
ngx_http_civicgate_limit_batch_send(
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_batch_t *batch)
{
    ngx_uint_t                         i, j, n, ncalls;
    ngx_http_civicgate_limit_key_t    *keys;
    ngx_http_civicgate_limit_call_t   *calls;

    keys = ngx_http_civicgate_limit_batch_keys(batch, &n);
    if (keys == NULL) {
        return NGX_ERROR;
    }

    if (n == 0) {
        /* every request of the batch is gone */
        ngx_destroy_pool(batch->pool);
        return NGX_OK;
    }

    calls = ngx_palloc(batch->pool,
                       n * sizeof(ngx_http_civicgate_limit_call_t));
    if (calls == NULL) {
        return NGX_ERROR;
    }

    if (lmcf->cluster && n > 1) {
        ngx_qsort(keys, n, sizeof(ngx_http_civicgate_limit_key_t),
                  ngx_http_civicgate_limit_key_cmp);
    }

    ncalls = 0;

    for (i = 0; i < n; i = j) {
        for (j = i + 1; j < n && keys[j].slot == keys[i].slot; j++) {
            /* void */
        }

        calls[ncalls].batch = batch;
        calls[ncalls].keys = &keys[i];
        calls[ncalls].nkeys = j - i;
        calls[ncalls].failed = 0;
        ncalls++;

        /* a request's keys of one slot are together: one call each */
        for (/* void */; i < j; i++) {
            if (i == 0 || keys[i].waiter != keys[i - 1].waiter
                || keys[i].slot != keys[i - 1].slot)
            {
                keys[i].waiter->pending++;
            }
        }
    }

    /* held while sending: a call failed at once does not free the batch */
    batch->out = ncalls + 1;
    lmcf->out++;

    for (i = 0; i < ncalls; i++) {
        if (ngx_http_civicgate_limit_call_send(lmcf, &calls[i]) != NGX_OK) {
            calls[i].failed = 1;
        }
    }

    /* each request falls back to its zones' on_error= policy */
    for (i = 0; i < ncalls; i++) {
        if (calls[i].failed) {
            ngx_http_civicgate_limit_call_done(&calls[i], NULL);
            ngx_http_civicgate_limit_batch_release(lmcf, batch);
        }
    }

    ngx_http_civicgate_limit_batch_release(lmcf, batch);

    return NGX_OK;
}


/* the Redis keys of the requests still there, in the batch's order */

static ngx_http_civicgate_limit_key_t *
ngx_http_civicgate_limit_batch_keys(ngx_http_civicgate_limit_batch_t *batch,
    ngx_uint_t *nkeys)
{
    ngx_uint_t                           i, j, n;
    ngx_http_civicgate_limit_key_t      *keys, *k;
    ngx_http_civicgate_limit_state_t    *st;
    ngx_http_civicgate_limit_waiter_t  **wp;

    keys = ngx_palloc(batch->pool, ngx_max(batch->nkeys, 1)
                                   * sizeof(ngx_http_civicgate_limit_key_t));
    if (keys == NULL) {
        return NULL;
    }

    wp = batch->waiters.elts;
    n = 0;

    for (i = 0; i < batch->waiters.nelts; i++) {
        if (wp[i]->request == NULL) {
            continue;
        }

        for (j = 0; j < wp[i]->lctx->nstates; j++) {
            st = &wp[i]->lctx->states[j];

            if (!st->remote) {
                continue;
            }

            /* what a call needs, copied: a request may end before it goes */
            k = &keys[n];
            k->waiter = wp[i];
            k->limit = st->limit;
            k->state = j;
            k->slot = st->slot;
            k->order = n++;
            ngx_memcpy(k->digest, st->digest, NGX_HTTP_CIVICGATE_KEY_DIGEST);
        }
    }

    *nkeys = n;

    return keys;
}


static int ngx_libc_cdecl
ngx_http_civicgate_limit_key_cmp(const void *one, const void *two)
{
    const ngx_http_civicgate_limit_key_t  *a = one, *b = two;

    if (a->slot != b->slot) {
        return a->slot < b->slot ? -1 : 1;
    }

    return a->order < b->order ? -1 : (a->order > b->order);
}


/*
 * KEYS: the call's keys; ARGV: per request, its number of keys there,
 * then interval and tolerance of each.
 */

static ngx_int_t
ngx_http_civicgate_limit_call_send(ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_call_t *call)
{
    u_char                           *p, *start;
    size_t                           *lens;
    ngx_uint_t                        i, j, n, count, max;
    const char                      **argv;
    ngx_http_civicgate_limit_t       *limit;
    ngx_http_civicgate_limit_key_t   *k;
    ngx_http_civicgate_main_conf_t   *cgmcf;

    cgmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                                ngx_http_civicgate_module);

    k = call->keys;
    max = 3 + 4 * call->nkeys;

    argv = ngx_palloc(call->batch->pool, max * sizeof(char *));
    lens = ngx_palloc(call->batch->pool, max * sizeof(size_t));
    p = ngx_pnalloc(call->batch->pool,
                    call->nkeys * (128 + 3 * NGX_INT64_LEN) + NGX_INT64_LEN);

    if (argv == NULL || lens == NULL || p == NULL) {
        return NGX_ERROR;
    }

    argv[0] = "EVALSHA";
    lens[0] = 7;
    argv[1] = (const char *) lmcf->script->sha;
    lens[1] = 40;
    argv[2] = (const char *) p;
    p = ngx_sprintf(p, "%ui", call->nkeys);
    lens[2] = p - (u_char *) argv[2];

    n = 3;

    for (i = 0; i < call->nkeys; i++) {
        argv[n] = (const char *) p;
        p = ngx_http_civicgate_key_limit(p, k[i].digest,
                                         NGX_HTTP_CIVICGATE_KEY_DIGEST,
                                         &k[i].limit->zone->name);
        lens[n] = p - (u_char *) argv[n];
        n++;
    }

    for (i = 0; i < call->nkeys; i = j) {
        count = n++;

        for (j = i; j < call->nkeys && k[j].waiter == k[i].waiter; j++) {
            limit = k[j].limit;

            start = p;
            p = ngx_sprintf(p, "%uL", limit->zone->interval);
            argv[n] = (const char *) start;
            lens[n++] = p - start;

            start = p;
            p = ngx_sprintf(p, "%uL",
                            (uint64_t) limit->burst * limit->zone->interval);
            argv[n] = (const char *) start;
            lens[n++] = p - start;
        }

        start = p;
        p = ngx_sprintf(p, "%ui", j - i);
        argv[count] = (const char *) start;
        lens[count] = p - start;
    }

    if (ngx_http_civicgate_redis_send(cgmcf->client, n, argv, lens,
                                      ngx_http_civicgate_limit_call_reply,
                                      call)
        == NULL)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * Runs from the Redis connection's read event, or with a NULL reply when
 * the command failed; requests gone meanwhile have left the batch.
 */

static void
ngx_http_civicgate_limit_call_reply(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_uint_t                             i;
    ngx_http_civicgate_limit_key_t        *k;
    ngx_http_civicgate_limit_call_t       *call;
    ngx_http_civicgate_limit_main_conf_t  *lmcf;

    call = cmd->data;

    lmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                             ngx_http_civicgate_limit_module);

    if (cmd->redis->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED) {
        /* the worker is exiting: the requests go with it */
        k = call->keys;

        for (i = 0; i < call->nkeys; i++) {
            if (k[i].waiter->request != NULL) {
                k[i].waiter->lctx->waiter = NULL;
                k[i].waiter->request = NULL;
            }
        }

        ngx_http_civicgate_limit_batch_release(lmcf, call->batch);
        return;
    }

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY) {
        ngx_http_civicgate_redis_refused(cmd->redis, reply,
                                         "a rate limit check",
                                         &ngx_http_civicgate_limit_refused);
        reply = NULL;
    }

    ngx_http_civicgate_limit_call_done(call, reply);
    ngx_http_civicgate_limit_batch_release(lmcf, call->batch);
}


/*
 * Each request takes its keys' elements of the reply; one with all its
 * calls answered runs on.  A resumed request may end others of the
 * batch: each is checked, and the context of one gone (freed with its
 * pool) is never read.
 */

static void
ngx_http_civicgate_limit_call_done(ngx_http_civicgate_limit_call_t *call,
    redisReply *reply)
{
    ngx_uint_t                          i;
    ngx_http_request_t                 *r;
    ngx_http_civicgate_limit_ctx_t     *lctx;
    ngx_http_civicgate_limit_waiter_t  *w;

    ngx_http_civicgate_limit_answer(call, reply);

    for (i = 0; i < call->nkeys; i++) {
        w = call->keys[i].waiter;

        if (i > 0 && w == call->keys[i - 1].waiter) {
            continue;
        }

        if (--w->pending > 0 || w->request == NULL) {
            continue;
        }

        r = w->request;
        lctx = w->lctx;
        lctx->waiter = NULL;
        w->request = NULL;

        lctx->step.waiting = 0;
        lctx->step.replied = 1;

        ngx_http_civicgate_resume(r);
    }
}


/*
 * The excess of each key, in the order of KEYS, then Redis's clock: the
 * TAT a charge left, for a charge given back (cluster).
 */

static void
ngx_http_civicgate_limit_answer(ngx_http_civicgate_limit_call_t *call,
    redisReply *reply)
{
    uint64_t                           now;
    ngx_uint_t                         i;
    redisReply                        *e;
    ngx_http_civicgate_limit_key_t    *k;
    ngx_http_civicgate_limit_state_t  *st;

    if (reply != NULL && reply->elements < call->nkeys) {
        reply = NULL;
    }

    now = 0;

    if (reply != NULL && reply->elements > call->nkeys) {
        e = reply->element[call->nkeys];
        now = (e->type == REDIS_REPLY_INTEGER && e->integer > 0)
              ? (uint64_t) e->integer : 0;
    }

    for (i = 0; i < call->nkeys; i++) {
        k = &call->keys[i];

        if (k->waiter->request == NULL) {
            continue;
        }

        st = &k->waiter->lctx->states[k->state];
        e = reply ? reply->element[i] : NULL;

        if (e == NULL || e->type != REDIS_REPLY_INTEGER || e->integer < 0) {
            st->failed = 1;
            continue;
        }

        st->result.excess = e->integer;
        st->tat_after = now ? now + e->integer + k->limit->zone->interval : 0;
    }
}


/* the last call of a batch answered: the one collected meanwhile goes */

static void
ngx_http_civicgate_limit_batch_release(
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_batch_t *batch)
{
    if (--batch->out > 0) {
        return;
    }

    ngx_destroy_pool(batch->pool);

    lmcf->out--;

    if (lmcf->batch != NULL) {
        ngx_post_event(&lmcf->flush, &ngx_posted_events);
    }
}


/* a batch that could not be sent: every request falls back */

static void
ngx_http_civicgate_limit_batch_fail(ngx_http_civicgate_limit_batch_t *batch)
{
    ngx_uint_t                           i;
    ngx_http_request_t                  *r;
    ngx_http_civicgate_limit_ctx_t      *lctx;
    ngx_http_civicgate_limit_waiter_t  **wp;

    wp = batch->waiters.elts;

    for (i = 0; i < batch->waiters.nelts; i++) {
        r = wp[i]->request;

        if (r == NULL) {
            continue;
        }

        lctx = wp[i]->lctx;
        lctx->waiter = NULL;
        wp[i]->request = NULL;

        lctx->step.waiting = 0;
        lctx->step.replied = 1;
        lctx->step.failed = 1;

        ngx_http_civicgate_resume(r);
    }

    ngx_destroy_pool(batch->pool);
}


static ngx_int_t
ngx_http_civicgate_limit_verdict(ngx_http_request_t *r, void *data)
{
    ngx_http_civicgate_limit_ctx_t  *lctx = data;

    ngx_uint_t                       i, deny, status, dry, level;
    ngx_http_civicgate_limit_loc_conf_t *cglcf;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_limit_module);

    lctx->step.done = 1;
    dry = cglcf->limit_dry_run;

    ngx_http_civicgate_limit_evaluate(r, lctx, &deny);

    if (lctx->rejected || deny) {
        status = dry ? NGX_HTTP_CIVICGATE_LIMIT_REJECTED_DRY_RUN
                     : NGX_HTTP_CIVICGATE_LIMIT_REJECTED;

    } else if (lctx->delay_us) {
        status = dry ? NGX_HTTP_CIVICGATE_LIMIT_DELAYED_DRY_RUN
                     : NGX_HTTP_CIVICGATE_LIMIT_DELAYED;

    } else {
        status = NGX_HTTP_CIVICGATE_LIMIT_PASSED;
    }

    lctx->status = ngx_http_civicgate_limit_statuses[status];

    for (i = 0; i < lctx->nstates; i++) {
        ngx_http_civicgate_metrics_inc(cgmcf->metrics, cgmcf->metrics->limit,
            lctx->states[i].limit->zone->index
            * NGX_HTTP_CIVICGATE_LIMIT_RESULTS + status);
    }

    if (status == NGX_HTTP_CIVICGATE_LIMIT_REJECTED) {
        return ngx_http_civicgate_limit_reject(r, lctx, deny);
    }

    if (status == NGX_HTTP_CIVICGATE_LIMIT_PASSED || dry) {
        if (status != NGX_HTTP_CIVICGATE_LIMIT_PASSED) {
            ngx_log_error(cglcf->limit_log_level, r->connection->log, 0,
                          "civicgate: limiting requests, dry run");
        }

        return NGX_DECLINED;
    }

    /* delays are logged one level quieter, as limit_req does */
    level = (cglcf->limit_log_level == NGX_LOG_INFO)
            ? NGX_LOG_INFO : cglcf->limit_log_level + 1;

    ngx_log_error(level, r->connection->log, 0,
                  "civicgate: delaying request by %uLms",
                  (lctx->delay_us + 999) / 1000);

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_civicgate_limit_delay;

    r->connection->write->delayed = 1;
    ngx_add_timer(r->connection->write, (lctx->delay_us + 999) / 1000);

    return NGX_AGAIN;
}


/*
 * Decides the Redis limits from Redis's answer, or by their on_error=
 * policy; those that fall back to their local state are decided and
 * charged like the others, and only if nothing rejects so far.  If any
 * limit rejects, the local charges are given back.
 */

static void
ngx_http_civicgate_limit_evaluate(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx, ngx_uint_t *deny)
{
    ngx_uint_t                         i, rejected;
    ngx_http_civicgate_gcra_limit_t    gl;
    ngx_http_civicgate_limit_state_t  *st;

    *deny = 0;
    rejected = 0;

    for (i = 0; i < lctx->nstates; i++) {
        st = &lctx->states[i];

        if (st->skipped || !st->remote) {
            continue;
        }

        if (lctx->step.failed || st->failed) {
            *deny |= ngx_http_civicgate_limit_fallback(r, st);
            continue;
        }

        gl.interval = st->limit->zone->interval;
        gl.burst = st->limit->burst;
        gl.delay = st->limit->delay;

        ngx_http_civicgate_gcra_decide(&gl, st->result.excess, &st->result);

        rejected |= !st->result.admitted;
    }

    (void) ngx_http_civicgate_limit_reserve(lctx, !rejected && !*deny);

    for (i = 0; i < lctx->nstates; i++) {
        st = &lctx->states[i];

        if (st->skipped) {
            continue;
        }

        if (!st->result.admitted) {
            lctx->rejected = 1;
        }

        lctx->delay_us = ngx_max(lctx->delay_us, st->result.delay_us);
    }

    if (lctx->rejected || *deny) {
        ngx_http_civicgate_limit_refund(lctx);
        ngx_http_civicgate_limit_give_back(r, lctx);
    }
}


/*
 * Cluster: the calls of the slots whose limits all admitted the request
 * charged them; another slot rejected it (or fell back and refused it),
 * so each such slot's charges are given back, one call per slot.  With
 * one call per request (one slot, or one Redis) there is nothing to give
 * back: the script charged nothing.
 */

static void
ngx_http_civicgate_limit_give_back(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx)
{
    ngx_uint_t                             i, j;
    ngx_http_civicgate_limit_state_t      *st;
    ngx_http_civicgate_limit_main_conf_t  *lmcf;

    lmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_limit_module);

    if (lmcf->refund_script == NULL) {
        return;
    }

    for (i = 0; i < lctx->nstates; i++) {
        st = &lctx->states[i];

        if (!st->remote || st->skipped) {
            continue;
        }

        /* each slot once: at its first limit */
        for (j = 0; j < i; j++) {
            if (lctx->states[j].remote && lctx->states[j].slot == st->slot) {
                break;
            }
        }

        if (j == i && ngx_http_civicgate_limit_charged(lctx, st->slot)) {
            ngx_http_civicgate_limit_give_back_slot(r, lctx, st->slot);
        }
    }
}


/* the script charged a slot's keys if it admitted every one of them */

static ngx_uint_t
ngx_http_civicgate_limit_charged(ngx_http_civicgate_limit_ctx_t *lctx,
    ngx_uint_t slot)
{
    ngx_uint_t                         i;
    ngx_http_civicgate_limit_t        *limit;
    ngx_http_civicgate_limit_state_t  *st;

    for (i = 0; i < lctx->nstates; i++) {
        st = &lctx->states[i];

        if (!st->remote || st->slot != slot) {
            continue;
        }

        limit = st->limit;

        if (st->skipped || st->failed || st->tat_after == 0
            || st->result.excess > limit->burst * limit->zone->interval)
        {
            return 0;
        }
    }

    return 1;
}


static void
ngx_http_civicgate_limit_give_back_slot(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx, ngx_uint_t slot)
{
    u_char                                *p, *start;
    u_char                                 buf[NGX_HTTP_CIVICGATE_LIMIT_MAX
                                               * (128 + 2 * NGX_INT64_LEN)];
    size_t                                 lens[NGX_HTTP_CIVICGATE_LIMIT_ARGS];
    ngx_uint_t                             i, n, nkeys;
    const char                            *argv[NGX_HTTP_CIVICGATE_LIMIT_ARGS];
    ngx_http_civicgate_limit_state_t      *st;
    ngx_http_civicgate_main_conf_t        *cgmcf;
    ngx_http_civicgate_limit_main_conf_t  *lmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    lmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_limit_module);

    p = buf;
    n = 3;

    for (i = 0; i < lctx->nstates; i++) {
        st = &lctx->states[i];

        if (st->remote && st->slot == slot) {
            argv[n] = (const char *) p;
            p = ngx_http_civicgate_key_limit(p, st->digest,
                                             NGX_HTTP_CIVICGATE_KEY_DIGEST,
                                             &st->limit->zone->name);
            lens[n] = p - (u_char *) argv[n];
            n++;
        }
    }

    nkeys = n - 3;

    for (i = 0; i < lctx->nstates; i++) {
        st = &lctx->states[i];

        if (st->remote && st->slot == slot) {
            start = p;
            p = ngx_sprintf(p, "%uL", st->tat_after);
            argv[n] = (const char *) start;
            lens[n++] = p - start;

            start = p;
            p = ngx_sprintf(p, "%uL", st->limit->zone->interval);
            argv[n] = (const char *) start;
            lens[n++] = p - start;
        }
    }

    argv[0] = "EVALSHA";
    lens[0] = 7;
    argv[1] = (const char *) lmcf->refund_script->sha;
    lens[1] = 40;
    argv[2] = (const char *) p;
    lens[2] = ngx_sprintf(p, "%ui", nkeys) - p;

    /* nothing waits for it: a failure leaves the charge, as limit_req's */
    (void) ngx_http_civicgate_redis_send(cgmcf->client, n, argv, lens,
                                         ngx_http_civicgate_limit_given_back,
                                         NULL);
}


static void
ngx_http_civicgate_limit_given_back(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    if (cmd->redis->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED) {
        return;
    }

    if (reply == NULL || reply->type != REDIS_REPLY_INTEGER) {
        ngx_http_civicgate_redis_refused(cmd->redis, reply,
                                         "a rate limit refund",
                                         &ngx_http_civicgate_limit_refused);
    }
}


/* a Redis limit Redis could not decide; 1 if the request is to be denied */

static ngx_uint_t
ngx_http_civicgate_limit_fallback(ngx_http_request_t *r,
    ngx_http_civicgate_limit_state_t *st)
{
    ngx_http_civicgate_main_conf_t   *cgmcf;
    ngx_http_civicgate_limit_zone_t  *zone;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    zone = st->limit->zone;

    ngx_http_civicgate_metrics_inc(cgmcf->metrics,
                                   cgmcf->metrics->limit_fallbacks,
                                   zone->index);

    switch (zone->on_error) {

    case NGX_HTTP_CIVICGATE_ON_ERROR_ALLOW:
        st->skipped = 1;
        return 0;

    case NGX_HTTP_CIVICGATE_ON_ERROR_DENY:
        st->skipped = 1;
        return 1;

    default:
        /* decided by the zone's shared memory, with the local ones */
        st->remote = 0;
        return 0;
    }
}


static ngx_int_t
ngx_http_civicgate_limit_reject(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx, ngx_uint_t deny)
{
    json_t                               *problem, *violated;
    uint64_t                              retry;
    ngx_uint_t                            i, status;
    ngx_http_civicgate_limit_state_t     *st;
    ngx_http_civicgate_limit_loc_conf_t  *cglcf;

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_limit_module);

    if (deny && !lctx->rejected) {
        return ngx_http_civicgate_limit_unavailable(r);
    }

    violated = json_array();
    retry = 0;

    for (i = 0; i < lctx->nstates; i++) {
        st = &lctx->states[i];

        if (st->skipped || st->result.admitted) {
            continue;
        }

        json_array_append_new(violated,
                              json_stringn((char *) st->limit->zone->name.data,
                                           st->limit->zone->name.len));

        retry = ngx_max(retry, (st->result.retry_us + 999999) / 1000000);

        ngx_log_error(cglcf->limit_log_level, r->connection->log, 0,
                      "civicgate: limiting requests, excess: %uL.%03uL "
                      "by zone \"%V\"",
                      st->result.excess / st->limit->zone->interval,
                      st->result.excess % st->limit->zone->interval * 1000
                      / st->limit->zone->interval,
                      &st->limit->zone->name);
    }

    retry = ngx_max(retry, 1);
    status = cglcf->limit_status;

    if (ngx_http_civicgate_retry_after(r, retry) != NGX_OK) {
        json_decref(violated);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    problem = ngx_http_civicgate_problem_new(status,
                  NGX_HTTP_CIVICGATE_QUOTA_EXCEEDED,
                  "Request cannot be satisfied as assigned quota has been "
                  "exceeded",
                  "Too many requests: retry after the time given.");

    if (problem == NULL) {
        json_decref(violated);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    json_object_set_new(problem, "violated-policies", violated);
    json_object_set_new(problem, "retry-after", json_integer(retry));

    return ngx_http_civicgate_finalize(r,
                         ngx_http_civicgate_problem_send(r, status, problem));
}


/* Redis cannot decide and a limit's on_error=deny says no: 503 */

static ngx_int_t
ngx_http_civicgate_limit_unavailable(ngx_http_request_t *r)
{
    json_t  *problem;

    /* as long as Redis is out: logged at most once per interval */
    if (ngx_http_civicgate_log_due(&ngx_http_civicgate_limit_denied)) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "civicgate: rate limit unavailable, requests "
                      "denied (logged once every 10 s)");
    }

    problem = ngx_http_civicgate_problem_new(NGX_HTTP_SERVICE_UNAVAILABLE,
                  "about:blank", "Service Unavailable",
                  "The rate limit cannot be checked right now.");

    return ngx_http_civicgate_finalize(r,
               ngx_http_civicgate_problem_send(r,
                                 NGX_HTTP_SERVICE_UNAVAILABLE, problem));
}


static ngx_int_t
ngx_http_civicgate_retry_after(ngx_http_request_t *r, uint64_t retry)
{
    ngx_table_elt_t  *h;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Retry-After");
    h->value.data = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (h->value.data == NULL) {
        return NGX_ERROR;
    }

    h->value.len = ngx_sprintf(h->value.data, "%uL", retry) - h->value.data;

    return NGX_OK;
}


static void
ngx_http_civicgate_limit_delay(ngx_http_request_t *r)
{
    ngx_event_t  *wev;

    wev = r->connection->write;

    if (wev->delayed) {

        if (ngx_handle_write_event(wev, 0) != NGX_OK) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        }

        return;
    }

    if (ngx_handle_read_event(r->connection->read, 0) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    r->read_event_handler = ngx_http_block_reading;
    r->write_event_handler = ngx_http_core_run_phases;

    ngx_http_core_run_phases(r);
}


/* the shared-memory store: a table of digests, LRU expiry, as limit_req */

/*
 * Decides the local limits not decided yet and, if all admit and "charge"
 * is set, charges them all before any lock is released: no other request
 * can come in between the check and the charge.  The zones are locked in
 * one order in every worker, so that two requests cannot deadlock.
 * NGX_DECLINED if one rejects.
 */

static ngx_int_t
ngx_http_civicgate_limit_reserve(ngx_http_civicgate_limit_ctx_t *lctx,
    ngx_uint_t charge)
{
    uint64_t                           now;
    ngx_uint_t                         i, n, rejected, inserted;
    ngx_http_civicgate_limit_zone_t   *zones[NGX_HTTP_CIVICGATE_LIMIT_MAX];
    ngx_http_civicgate_limit_state_t  *st;

    n = ngx_http_civicgate_limit_zones(lctx, zones);

    if (n == 0) {
        return NGX_OK;
    }

    now = (uint64_t) ngx_current_msec * 1000;
    rejected = 0;

    for (i = 0; i < n; i++) {
        ngx_shmtx_lock(&zones[i]->table.shpool->mutex);
    }

    for (i = 0; i < lctx->nstates; i++) {
        st = &lctx->states[i];

        if (ngx_http_civicgate_limit_pending(st)) {
            ngx_http_civicgate_limit_check(st, now);
            rejected |= !st->result.admitted;
        }
    }

    inserted = 0;

    for (i = 0; i < lctx->nstates; i++) {
        st = &lctx->states[i];

        if (ngx_http_civicgate_limit_pending(st)) {
            if (charge && !rejected) {
                /* an insert may have evicted what a check found */
                if (inserted) {
                    st->node = ngx_http_civicgate_table_lookup(
                                           &st->limit->zone->table, st->digest);
                }

                inserted |= (st->node == NULL);
                ngx_http_civicgate_limit_charge(st, now);
            }

            st->looked_up = 1;
        }
    }

    while (n--) {
        ngx_shmtx_unlock(&zones[n]->table.shpool->mutex);
    }

    return rejected ? NGX_DECLINED : NGX_OK;
}


/* the zones of the pending limits, each once, by zone index */

static ngx_uint_t
ngx_http_civicgate_limit_zones(ngx_http_civicgate_limit_ctx_t *lctx,
    ngx_http_civicgate_limit_zone_t **zones)
{
    ngx_uint_t                        i, j, n;
    ngx_http_civicgate_limit_zone_t  *zone;

    n = 0;

    for (i = 0; i < lctx->nstates; i++) {
        if (!ngx_http_civicgate_limit_pending(&lctx->states[i])) {
            continue;
        }

        zone = lctx->states[i].limit->zone;

        for (j = n; j > 0 && zones[j - 1]->index > zone->index; j--) {
            /* void */
        }

        if (j > 0 && zones[j - 1] == zone) {
            continue;
        }

        ngx_memmove(&zones[j + 1], &zones[j], (n - j) * sizeof(zone));
        zones[j] = zone;
        n++;
    }

    return n;
}


static ngx_uint_t
ngx_http_civicgate_limit_pending(ngx_http_civicgate_limit_state_t *st)
{
    return !st->remote && !st->skipped && !st->looked_up;
}


/* under the zone's lock */

static void
ngx_http_civicgate_limit_check(ngx_http_civicgate_limit_state_t *st,
    uint64_t now)
{
    ngx_http_civicgate_gcra_limit_t   gl;
    ngx_http_civicgate_table_node_t  *node;

    gl.interval = st->limit->zone->interval;
    gl.burst = st->limit->burst;
    gl.delay = st->limit->delay;

    node = ngx_http_civicgate_table_lookup(&st->limit->zone->table,
                                           st->digest);
    st->node = node;

    ngx_http_civicgate_gcra_decide(&gl,
                     ngx_http_civicgate_gcra_excess(node ? node->value : now,
                                                    now),
                     &st->result);
}


/* under the zone's lock; the TAT before and after, to give it back */

static void
ngx_http_civicgate_limit_charge(ngx_http_civicgate_limit_state_t *st,
    uint64_t now)
{
    ngx_http_civicgate_gcra_limit_t   gl;
    ngx_http_civicgate_limit_zone_t  *zone;
    ngx_http_civicgate_table_node_t  *node;

    zone = st->limit->zone;
    gl.interval = zone->interval;

    /* the check's, under the same lock */
    node = st->node;

    if (node != NULL) {
        ngx_http_civicgate_table_touch(&zone->table, node);

    } else {
        ngx_http_civicgate_limit_expire(zone, now);

        node = ngx_http_civicgate_table_insert(&zone->table, st->digest);
        if (node == NULL) {
            return;
        }

        node->value = now;
    }

    st->tat_before = node->value;
    node->value = ngx_http_civicgate_gcra_next(&gl, node->value, now);
    st->tat_after = node->value;
    st->charged = 1;

    if (zone->sync) {
        ngx_http_civicgate_limit_sync_count(node, 1);
    }
}


/*
 * Gives back the local charges of a request another limit rejected: the
 * TAT as it was if no request came since, else one interval less (exact
 * unless the key had drained meanwhile: then at most the time since the
 * charge is given back too much).
 */

static void
ngx_http_civicgate_limit_refund(ngx_http_civicgate_limit_ctx_t *lctx)
{
    ngx_uint_t                         i;
    ngx_http_civicgate_limit_zone_t   *zone;
    ngx_http_civicgate_table_node_t   *node;
    ngx_http_civicgate_limit_state_t  *st;

    for (i = lctx->nstates; i-- > 0; /* void */) {
        st = &lctx->states[i];

        if (!st->charged) {
            continue;
        }

        zone = st->limit->zone;

        ngx_shmtx_lock(&zone->table.shpool->mutex);

        node = ngx_http_civicgate_table_lookup(&zone->table, st->digest);

        if (node != NULL) {
            if (node->value == st->tat_after) {
                node->value = st->tat_before;

            } else if (node->value >= zone->interval) {
                node->value -= zone->interval;
            }

            if (zone->sync) {
                ngx_http_civicgate_limit_sync_count(node, -1);
            }
        }

        ngx_shmtx_unlock(&zone->table.shpool->mutex);

        st->charged = 0;
    }
}


/* keys idle a minute go, up to two per insert, as limit_req's do */

static void
ngx_http_civicgate_limit_expire(ngx_http_civicgate_limit_zone_t *zone,
    uint64_t now)
{
    ngx_uint_t                        n;
    ngx_http_civicgate_table_node_t  *node;

    for (n = 0; n < 2; n++) {
        node = ngx_http_civicgate_table_oldest(&zone->table);

        /* a synchronised key's count waits for its reconciliation */
        if (node == NULL || node->flag || node->value + 60000000 > now)
        {
            return;
        }

        ngx_http_civicgate_table_delete(&zone->table, node);
    }
}


/*
 * Synchronised zones (sync=): each gateway decides from its shared memory
 * and one worker reconciles with Redis every interval.  A key's node holds
 * its TAT and the requests admitted since the last reconciliation, and its
 * flag says it has been charged since.  A charge touches the node, so
 * everything charged since the last reconciliation is at the head of the
 * LRU queue, before every clean node: the reconciliation walks from the
 * head and stops at the first clean one.
 */

/* under the zone's lock: n more (or, n < 0, fewer) requests to send */

static void
ngx_http_civicgate_limit_sync_count(ngx_http_civicgate_table_node_t *node,
    ngx_int_t n)
{
    if (n < 0) {
        /* a refund of a count already sent stays charged in Redis */
        if (node->count >= (uint32_t) -n) {
            node->count -= (uint32_t) -n;
        }

        return;
    }

    node->flag = 1;
    node->count += (uint32_t) n;
}


static ngx_int_t
ngx_http_civicgate_limit_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                             i;
    ngx_event_t                           *ev;
    ngx_http_civicgate_limit_zone_t      **zone;
    ngx_http_civicgate_limit_main_conf_t  *lmcf;

    lmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                             ngx_http_civicgate_limit_module);

    /* the counts are the gateway's, in shared memory: one worker sends */
    if (lmcf == NULL || lmcf->nsync == 0 || ngx_worker != 0
        || (ngx_process != NGX_PROCESS_WORKER
            && ngx_process != NGX_PROCESS_SINGLE))
    {
        return NGX_OK;
    }

    zone = lmcf->zones.elts;

    for (i = 0; i < lmcf->zones.nelts; i++) {
        if (zone[i]->sync == 0) {
            continue;
        }

        ev = &zone[i]->sync_event;
        ev->handler = ngx_http_civicgate_limit_sync_timer;
        ev->data = zone[i];
        ev->log = cycle->log;
        ev->cancelable = 1;

        ngx_add_timer(ev, zone[i]->sync);
    }

    return NGX_OK;
}


static void
ngx_http_civicgate_limit_sync_timer(ngx_event_t *ev)
{
    ngx_http_civicgate_limit_zone_t  *zone = ev->data;

    ngx_http_civicgate_limit_sync(zone);

    /* an exiting worker sends what it has once more, then leaves it */
    if (!ngx_exiting && !ngx_terminate && !ngx_quit) {
        ngx_add_timer(ev, zone->sync);
    }
}


/* one interval's reconciliation: the counts go, in calls of CHUNK keys */

static void
ngx_http_civicgate_limit_sync(ngx_http_civicgate_limit_zone_t *zone)
{
    ngx_uint_t                             first, n;
    ngx_http_civicgate_main_conf_t        *cgmcf;
    ngx_http_civicgate_limit_sync_t       *sync;
    ngx_http_civicgate_limit_main_conf_t  *lmcf;

    /* the last one still waits for its answer: its counts come next time */
    if (zone->sync_out || !ngx_http_civicgate_limit_sync_due(zone)) {
        return;
    }

    cgmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                                ngx_http_civicgate_module);
    lmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                             ngx_http_civicgate_limit_module);

    if (!ngx_http_civicgate_redis_accepting(cgmcf->client)) {
        /* the counts stay in shared memory until Redis is back */
        ngx_http_civicgate_limit_sync_result(lmcf, zone, 0);
        return;
    }

    sync = ngx_http_civicgate_limit_sync_collect(zone);
    if (sync == NULL) {
        return;
    }

    if (lmcf->cluster) {
        ngx_http_civicgate_limit_sync_slots(sync);
    }

    for (first = 0; first < sync->keys.nelts; first += n) {
        n = ngx_http_civicgate_limit_sync_chunk(sync, first);

        if (ngx_http_civicgate_limit_sync_send(cgmcf, lmcf, sync, first, n)
            != NGX_OK)
        {
            ngx_http_civicgate_limit_sync_restore(sync, first, n);
            ngx_http_civicgate_limit_sync_result(lmcf, zone, 0);
        }
    }

    if (sync->out == 0) {
        ngx_destroy_pool(sync->pool);
    }
}


/* cluster: a call's keys share a slot, so the keys go by slot */

static void
ngx_http_civicgate_limit_sync_slots(ngx_http_civicgate_limit_sync_t *sync)
{
    ngx_uint_t                          i;
    ngx_http_civicgate_limit_synced_t  *k;

    k = sync->keys.elts;

    for (i = 0; i < sync->keys.nelts; i++) {
        k[i].slot = ngx_http_civicgate_limit_slot(k[i].digest);
    }

    ngx_qsort(k, sync->keys.nelts, sizeof(ngx_http_civicgate_limit_synced_t),
              ngx_http_civicgate_limit_synced_cmp);
}


static int ngx_libc_cdecl
ngx_http_civicgate_limit_synced_cmp(const void *one, const void *two)
{
    const ngx_http_civicgate_limit_synced_t  *a = one, *b = two;

    return a->slot < b->slot ? -1 : (a->slot > b->slot);
}


/* the keys of one call from "first": up to CHUNK, of one slot (cluster) */

static ngx_uint_t
ngx_http_civicgate_limit_sync_chunk(ngx_http_civicgate_limit_sync_t *sync,
    ngx_uint_t first)
{
    ngx_uint_t                          n, max;
    ngx_http_civicgate_limit_synced_t  *k;

    k = sync->keys.elts;
    max = ngx_min(sync->keys.nelts - first, NGX_HTTP_CIVICGATE_LIMIT_CHUNK);

    /* outside a cluster every slot is 0 */
    for (n = 1; n < max && k[first + n].slot == k[first].slot; n++) {
        /* void */
    }

    return n;
}


/* anything charged since the last reconciliation */

static ngx_uint_t
ngx_http_civicgate_limit_sync_due(ngx_http_civicgate_limit_zone_t *zone)
{
    ngx_uint_t                        due;
    ngx_queue_t                      *q;
    ngx_http_civicgate_table_node_t  *node;

    ngx_shmtx_lock(&zone->table.shpool->mutex);

    q = ngx_queue_head(&zone->table.sh->queue);
    due = 0;

    if (q != ngx_queue_sentinel(&zone->table.sh->queue)) {
        node = ngx_queue_data(q, ngx_http_civicgate_table_node_t, queue);
        due = node->flag;
    }

    ngx_shmtx_unlock(&zone->table.shpool->mutex);

    return due;
}


/*
 * Takes the counts out of shared memory: from the head of the queue up to
 * the first node not charged since the last reconciliation.  After a
 * failed one, a count is kept only as far as it still weighs in the key's
 * local backlog.
 */

static ngx_http_civicgate_limit_sync_t *
ngx_http_civicgate_limit_sync_collect(ngx_http_civicgate_limit_zone_t *zone)
{
    uint64_t                            now, count;
    ngx_pool_t                         *pool;
    ngx_queue_t                        *q;
    ngx_http_civicgate_gcra_limit_t     gl;
    ngx_http_civicgate_table_node_t    *node;
    ngx_http_civicgate_limit_sync_t    *sync;
    ngx_http_civicgate_limit_synced_t  *k;

    pool = ngx_create_pool(4096, ngx_cycle->log);
    if (pool == NULL) {
        return NULL;
    }

    sync = ngx_pcalloc(pool, sizeof(ngx_http_civicgate_limit_sync_t));
    if (sync == NULL
        || ngx_array_init(&sync->keys, pool, 64,
                          sizeof(ngx_http_civicgate_limit_synced_t))
           != NGX_OK)
    {
        ngx_destroy_pool(pool);
        return NULL;
    }

    sync->pool = pool;
    sync->zone = zone;
    gl.interval = zone->interval;
    now = (uint64_t) ngx_current_msec * 1000;

    ngx_shmtx_lock(&zone->table.shpool->mutex);

    for (q = ngx_queue_head(&zone->table.sh->queue);
         q != ngx_queue_sentinel(&zone->table.sh->queue);
         q = ngx_queue_next(q))
    {
        node = ngx_queue_data(q, ngx_http_civicgate_table_node_t, queue);

        if (!node->flag) {
            break;
        }

        count = node->count;
        node->count = 0;
        node->flag = 0;

        if (zone->sync_failed) {
            count = ngx_http_civicgate_gcra_kept(&gl, count, node->value, now);
        }

        k = count ? ngx_array_push(&sync->keys) : NULL;

        if (k != NULL) {
            ngx_memcpy(k->digest, node->key, NGX_HTTP_CIVICGATE_TABLE_KEY);
            k->count = count;
            k->slot = 0;
        }
    }

    ngx_shmtx_unlock(&zone->table.shpool->mutex);

    return sync;
}


static ngx_int_t
ngx_http_civicgate_limit_sync_send(ngx_http_civicgate_main_conf_t *cgmcf,
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_sync_t *sync, ngx_uint_t first, ngx_uint_t n)
{
    u_char                             *p;
    size_t                             *lens;
    ngx_uint_t                          i, argc;
    const char                        **argv;
    ngx_http_civicgate_limit_chunk_t   *chunk;
    ngx_http_civicgate_limit_synced_t  *k;

    argc = 4 + 2 * n;
    argv = ngx_palloc(sync->pool, argc * sizeof(char *));
    lens = ngx_palloc(sync->pool, argc * sizeof(size_t));
    chunk = ngx_palloc(sync->pool, sizeof(ngx_http_civicgate_limit_chunk_t));
    p = ngx_pnalloc(sync->pool, n * (128 + NGX_INT64_LEN) + 2 * NGX_INT64_LEN);

    if (argv == NULL || lens == NULL || chunk == NULL || p == NULL) {
        return NGX_ERROR;
    }

    chunk->sync = sync;
    chunk->first = first;
    chunk->n = n;

    argv[0] = "EVALSHA";
    lens[0] = 7;
    argv[1] = (const char *) lmcf->sync_script->sha;
    lens[1] = 40;

    argv[2] = (const char *) p;
    p = ngx_sprintf(p, "%ui", n);
    lens[2] = p - (u_char *) argv[2];

    k = (ngx_http_civicgate_limit_synced_t *) sync->keys.elts + first;

    for (i = 0; i < n; i++) {
        argv[3 + i] = (const char *) p;
        p = ngx_http_civicgate_key_limit(p, k[i].digest,
                                         NGX_HTTP_CIVICGATE_KEY_DIGEST,
                                         &sync->zone->name);
        lens[3 + i] = p - (u_char *) argv[3 + i];
    }

    argv[3 + n] = (const char *) p;
    p = ngx_sprintf(p, "%uL", sync->zone->interval);
    lens[3 + n] = p - (u_char *) argv[3 + n];

    for (i = 0; i < n; i++) {
        argv[4 + n + i] = (const char *) p;
        p = ngx_sprintf(p, "%uL", k[i].count);
        lens[4 + n + i] = p - (u_char *) argv[4 + n + i];
    }

    if (ngx_http_civicgate_redis_send(cgmcf->client, argc, argv, lens,
                                      ngx_http_civicgate_limit_sync_reply,
                                      chunk)
        == NULL)
    {
        return NGX_ERROR;
    }

    sync->out++;
    sync->zone->sync_out++;

    ngx_http_civicgate_metrics_add(cgmcf->metrics, lmcf->synced_keys,
                                   sync->zone->sync_index, n);

    return NGX_OK;
}


/*
 * Redis's answer for one call: every key's backlog, adopted; or NULL (a
 * timeout, a lost connection, an exiting worker): the counts go back to
 * shared memory, for the next reconciliation (the next worker's, after a
 * reload).
 */

static void
ngx_http_civicgate_limit_sync_reply(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_uint_t                             i, ok;
    ngx_http_civicgate_limit_sync_t       *sync;
    ngx_http_civicgate_limit_chunk_t      *chunk;
    ngx_http_civicgate_limit_main_conf_t  *lmcf;

    chunk = cmd->data;
    sync = chunk->sync;

    ok = (reply != NULL && reply->type == REDIS_REPLY_ARRAY
          && reply->elements == chunk->n);

    for (i = 0; ok && i < chunk->n; i++) {
        ok = (reply->element[i]->type == REDIS_REPLY_INTEGER
              && reply->element[i]->integer >= 0);
    }

    if (ok) {
        ngx_http_civicgate_limit_sync_adopt(sync, chunk, reply);

    } else {
        if (cmd->redis->state != NGX_HTTP_CIVICGATE_REDIS_CLOSED) {
            ngx_http_civicgate_redis_refused(cmd->redis, reply,
                                             "a rate limit reconciliation",
                                             &ngx_http_civicgate_limit_refused);
        }

        ngx_http_civicgate_limit_sync_restore(sync, chunk->first, chunk->n);
    }

    lmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                             ngx_http_civicgate_limit_module);

    ngx_http_civicgate_limit_sync_result(lmcf, sync->zone, ok);

    sync->zone->sync_out--;

    if (--sync->out == 0) {
        ngx_destroy_pool(sync->pool);
    }
}


/* each key's TAT: Redis's backlog, and what was charged here since */

static void
ngx_http_civicgate_limit_sync_adopt(ngx_http_civicgate_limit_sync_t *sync,
    ngx_http_civicgate_limit_chunk_t *chunk, redisReply *reply)
{
    uint64_t                            now;
    ngx_uint_t                          i;
    ngx_http_civicgate_gcra_limit_t     gl;
    ngx_http_civicgate_limit_zone_t    *zone;
    ngx_http_civicgate_table_node_t    *tat;
    ngx_http_civicgate_limit_synced_t  *k;

    zone = sync->zone;
    gl.interval = zone->interval;
    now = (uint64_t) ngx_current_msec * 1000;
    k = (ngx_http_civicgate_limit_synced_t *) sync->keys.elts + chunk->first;

    ngx_shmtx_lock(&zone->table.shpool->mutex);

    for (i = 0; i < chunk->n; i++) {
        tat = ngx_http_civicgate_table_lookup(&zone->table, k[i].digest);
        if (tat == NULL) {
            continue;
        }

        tat->value = ngx_http_civicgate_gcra_adopt(&gl,
                                          reply->element[i]->integer,
                                          tat->count, now);
    }

    ngx_shmtx_unlock(&zone->table.shpool->mutex);
}


/* counts Redis did not take: kept while they weigh in the local backlog */

static void
ngx_http_civicgate_limit_sync_restore(ngx_http_civicgate_limit_sync_t *sync,
    ngx_uint_t first, ngx_uint_t n)
{
    uint64_t                            now, kept;
    ngx_uint_t                          i;
    ngx_http_civicgate_gcra_limit_t     gl;
    ngx_http_civicgate_limit_zone_t    *zone;
    ngx_http_civicgate_table_node_t    *tat;
    ngx_http_civicgate_limit_synced_t  *k;

    zone = sync->zone;
    gl.interval = zone->interval;
    now = (uint64_t) ngx_current_msec * 1000;
    k = (ngx_http_civicgate_limit_synced_t *) sync->keys.elts + first;

    ngx_shmtx_lock(&zone->table.shpool->mutex);

    for (i = 0; i < n; i++) {
        tat = ngx_http_civicgate_table_lookup(&zone->table, k[i].digest);
        if (tat == NULL) {
            continue;
        }

        kept = ngx_http_civicgate_gcra_kept(&gl, k[i].count, tat->value, now);

        if (kept) {
            ngx_http_civicgate_table_touch(&zone->table, tat);
            ngx_http_civicgate_limit_sync_count(tat, kept);
        }
    }

    ngx_shmtx_unlock(&zone->table.shpool->mutex);
}


static void
ngx_http_civicgate_limit_sync_result(
    ngx_http_civicgate_limit_main_conf_t *lmcf,
    ngx_http_civicgate_limit_zone_t *zone, ngx_uint_t ok)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                                ngx_http_civicgate_module);

    zone->sync_failed = !ok;

    ngx_http_civicgate_metrics_inc(cgmcf->metrics, lmcf->syncs,
                                   zone->sync_index * 2 + (ok ? 0 : 1));
}


/*
 * RateLimit-Policy and RateLimit fields (draft-ietf-httpapi-ratelimit-
 * headers), one item per limit decided; on rejections, and on every
 * response with civicgate_limit_headers on.
 */

static ngx_int_t
ngx_http_civicgate_limit_header_filter(ngx_http_request_t *r)
{
    if (r == r->main && ngx_http_civicgate_limit_headers(r) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_civicgate_limit_headers(ngx_http_request_t *r)
{
    size_t                                len;
    ngx_uint_t                            policy;
    ngx_table_elt_t                      *h;
    ngx_http_civicgate_limit_loc_conf_t  *cglcf;
    ngx_http_civicgate_limit_ctx_t       *lctx;

    lctx = ngx_http_civicgate_get_state(r, &ngx_http_civicgate_limit_module);

    if (lctx == NULL || !lctx->step.done || lctx->nstates == 0) {
        return NGX_OK;
    }

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_limit_module);

    if (!cglcf->limit_headers
        && !(lctx->rejected && !cglcf->limit_dry_run))
    {
        return NGX_OK;
    }

    for (policy = 0; policy < 2; policy++) {
        h = ngx_http_civicgate_push_header(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        h->value.data = ngx_http_civicgate_limit_items(r, lctx, policy, &len);
        if (h->value.data == NULL) {
            return NGX_ERROR;
        }

        h->hash = len ? 1 : 0;
        h->value.len = len;

        if (policy) {
            ngx_str_set(&h->key, "RateLimit-Policy");

        } else {
            ngx_str_set(&h->key, "RateLimit");
        }
    }

    return NGX_OK;
}


static u_char *
ngx_http_civicgate_limit_items(ngx_http_request_t *r,
    ngx_http_civicgate_limit_ctx_t *lctx, ngx_uint_t policy, size_t *len)
{
    u_char                           *p, *start;
    uint64_t                          t;
    ngx_str_t                         pk, digest;
    ngx_uint_t                        i;
    ngx_http_civicgate_limit_zone_t  *zone;
    ngx_http_civicgate_limit_state_t *st;

    start = ngx_pnalloc(r->pool, lctx->nstates * (NGX_HTTP_CIVICGATE_LIMIT_ITEM
                                                  + 64));
    if (start == NULL) {
        return NULL;
    }

    p = start;

    for (i = 0; i < lctx->nstates; i++) {
        st = &lctx->states[i];

        if (st->skipped) {
            continue;
        }

        zone = st->limit->zone;

        if (p != start) {
            *p++ = ',';
            *p++ = ' ';
        }

        if (policy) {
            p = ngx_sprintf(p, "\"%V\";q=%ui;w=%ui", &zone->name,
                            zone->quota, zone->window);
            continue;
        }

        t = st->result.admitted ? st->result.reset_us : st->result.retry_us;

        digest.data = st->digest;
        digest.len = 12;
        pk.data = ngx_pnalloc(r->pool, ngx_base64_encoded_length(digest.len));
        if (pk.data == NULL) {
            return NULL;
        }

        ngx_encode_base64(&pk, &digest);

        p = ngx_sprintf(p, "\"%V\";r=%uL;t=%uL;pk=:%V:", &zone->name,
                        st->result.remaining, (t + 999999) / 1000000, &pk);
    }

    *len = p - start;

    return start;
}


static ngx_int_t
ngx_http_civicgate_limit_status_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_civicgate_limit_ctx_t  *lctx;

    lctx = ngx_http_civicgate_get_state(r->main,
                                        &ngx_http_civicgate_limit_module);

    if (lctx == NULL || lctx->status.len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    ngx_http_civicgate_variable_set(v, lctx->status.data, lctx->status.len);

    return NGX_OK;
}
