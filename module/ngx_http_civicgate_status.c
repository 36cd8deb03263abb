
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_status.h"
#include "ngx_http_civicgate_json.h"
#include "ngx_http_civicgate_metrics.h"


/*
 * Service status.  Redis holds the truth (a hash of records and a history
 * stream); every worker keeps a copy, follows the changes on pub/sub, and
 * catches up from the history after any gap.  Each record carries the ID
 * of the change that wrote it, so copies merge by ID whatever the order
 * in which changes and catch-ups arrive.
 */


#define NGX_HTTP_CIVICGATE_CATCHUP_MAX    "256"
#define NGX_HTTP_CIVICGATE_CATCHUP_RETRY  1000


typedef struct {
    ngx_str_t                      name;
    json_t                        *record;     /* NULL: nothing set */
    ngx_http_civicgate_sid_t       rev;
} ngx_http_civicgate_service_t;


typedef struct {
    ngx_str_t                      body;
    ngx_str_t                      jws;        /* of body, once asked for */
    u_char                         etag_data[20];
    ngx_str_t                      etag;
    ngx_uint_t                     stale;
    ngx_uint_t                     valid;
} ngx_http_civicgate_render_t;


typedef struct {
    ngx_http_civicgate_main_conf_t  *cgmcf;
    ngx_http_civicgate_status_conf_t  *scf;
    ngx_http_civicgate_service_t    *services;
    ngx_uint_t                       nservices;
    ngx_http_civicgate_topic_t       topic;
    ngx_http_civicgate_render_t      render[NGX_HTTP_CIVICGATE_LANGS];
    ngx_http_civicgate_redis_cmd_t  *cmd;      /* catch-up in flight */
    ngx_event_t                      retry;
    ngx_http_civicgate_log_limit_t   refused;
    ngx_http_civicgate_sid_t         asked;      /* catch-up from */

    unsigned                         loaded:1;
    unsigned                         subscribed:1;
    unsigned                         again:1;
} ngx_http_civicgate_status_t;


static char *ngx_http_civicgate_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_civicgate_status_language(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_civicgate_status_history(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_civicgate_status_max_clients(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_civicgate_status_number(ngx_conf_t *cf,
    ngx_uint_t *field, ngx_int_t min, char *what);
static ngx_int_t ngx_http_civicgate_status_postconfiguration(
    ngx_conf_t *cf);
static void *ngx_http_civicgate_status_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_civicgate_status_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_status_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_int_t ngx_http_civicgate_status_init_process(ngx_cycle_t *cycle);
static void ngx_http_civicgate_status_exit_process(ngx_cycle_t *cycle);
static void ngx_http_civicgate_status_ready(ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_status_subscriber_ready(
    ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_status_message(ngx_http_civicgate_redis_t *rc,
    redisReply *reply);
static ngx_int_t ngx_http_civicgate_status_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_status_below(ngx_http_request_t *r,
    ngx_str_t *rest, ngx_uint_t sse, ngx_msec_t wait);
static ngx_uint_t ngx_http_civicgate_jws_wanted(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_status_jws(ngx_http_request_t *r,
    ngx_http_civicgate_render_t *rd, ngx_uint_t lang);
static ngx_msec_t ngx_http_civicgate_status_wait(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_services_sse(ngx_http_request_t *r,
    ngx_uint_t lang);
static void ngx_http_civicgate_services_resumed(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static void ngx_http_civicgate_services_snapshot(
    ngx_http_civicgate_client_t *cl);
static void ngx_http_civicgate_services_longpoll(
    ngx_http_civicgate_client_t *cl);
static ngx_int_t ngx_http_civicgate_since(ngx_http_civicgate_sid_t *sid,
    ngx_http_civicgate_redis_handler_pt handler, void *data,
    ngx_http_civicgate_redis_cmd_t **cmd);
static ngx_int_t ngx_http_civicgate_resume_entry(
    ngx_http_civicgate_client_t *cl, redisReply *entry);
static ngx_int_t ngx_http_civicgate_entry_fields(redisReply *entry,
    ngx_http_civicgate_sid_t *sid, redisReply **fields);
static json_t *ngx_http_civicgate_field(json_t *record, const char *name);
static ngx_int_t ngx_http_civicgate_status_stale(void);
static ngx_http_civicgate_render_t *ngx_http_civicgate_status_render(
    ngx_uint_t lang);
static json_t *ngx_http_civicgate_service_json(
    ngx_http_civicgate_service_t *s, ngx_uint_t lang);
static const char *ngx_http_civicgate_overall(void);
static void ngx_http_civicgate_catch_up(void);
static void ngx_http_civicgate_catch_up_retry(ngx_event_t *ev);
static void ngx_http_civicgate_caught_up(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply);
static ngx_uint_t ngx_http_civicgate_snapshot_service(
    ngx_http_civicgate_service_t *s, redisReply *hash, ngx_uint_t *found);
static ngx_int_t ngx_http_civicgate_apply_snapshot(redisReply *id,
    redisReply *hash);
static ngx_int_t ngx_http_civicgate_apply_entry(redisReply *entry);
static ngx_int_t ngx_http_civicgate_apply(ngx_http_civicgate_sid_t *sid,
    u_char *name, size_t name_len, u_char *record, size_t record_len);
static ngx_http_civicgate_service_t *ngx_http_civicgate_service_find(
    u_char *name, size_t len);
static ngx_int_t ngx_http_civicgate_push_snapshot(void);
static void ngx_http_civicgate_status_invalidate(void);


/*
 * KEYS: services hash, history stream.  ARGV: an event ID, or "" for the
 * whole state; the most changes to answer before a snapshot is cheaper.
 * Answers {"changes", entries} when the ID is still in the history, or
 * {"snapshot", last ID, hash}.
 */
static const char  ngx_http_civicgate_since_lua[] =
    "local function snap()\n"
    "  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)\n"
    "  local id = '0-0'\n"
    "  if last[1] then id = last[1][1] end\n"
    "  return {'snapshot', id, redis.call('HGETALL', KEYS[1])}\n"
    "end\n"
    "if ARGV[1] == '' or ARGV[1] == '0-0' then return snap() end\n"
    "if #redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1]) == 0 then\n"
    "  return snap() end\n"
    "local e = redis.call('XRANGE', KEYS[2], '(' .. ARGV[1], '+', 'COUNT',"
    " ARGV[2] + 1)\n"
    "if #e > tonumber(ARGV[2]) then return snap() end\n"
    "return {'changes', e}\n";

/*
 * KEYS: services hash, history stream, notices hash, notices list.  ARGV:
 * service, record ("" clears), history length, channel; then the change's
 * ID ("" lets Redis choose), its notice code and notice, the number of
 * notices kept.  One change: stored, recorded, its notice kept,
 * published.  An ID not after the history's last is refused with
 * {"retry", last ID}: the gateway signs the notice again with a later ID.
 */
static const char  ngx_http_civicgate_change_lua[] =
    "local id = '*'\n"
    "if ARGV[5] ~= '' then\n"
    "  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)\n"
    "  if last[1] then\n"
    "    local lm, ls = string.match(last[1][1], '^(%d+)-(%d+)$')\n"
    "    local im, is = string.match(ARGV[5], '^(%d+)-(%d+)$')\n"
    "    lm, ls, im, is = tonumber(lm), tonumber(ls), tonumber(im),"
    " tonumber(is)\n"
    "    if im < lm or (im == lm and is <= ls) then\n"
    "      return {'retry', last[1][1]} end\n"
    "  end\n"
    "  id = ARGV[5]\n"
    "end\n"
    "id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], id,"
    " 'service', ARGV[1], 'record', ARGV[2])\n"
    "if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1])\n"
    "else redis.call('HSET', KEYS[1], ARGV[1], id .. ' ' .. ARGV[2]) end\n"
    "if ARGV[6] ~= '' then\n"
    "  redis.call('HSET', KEYS[3], ARGV[6], ARGV[7])\n"
    "  redis.call('LPUSH', KEYS[4], ARGV[6])\n"
    "  while redis.call('LLEN', KEYS[4]) > tonumber(ARGV[8]) do\n"
    "    redis.call('HDEL', KEYS[3], redis.call('RPOP', KEYS[4])) end\n"
    "end\n"
    "redis.call('PUBLISH', ARGV[4], id .. '\\n' .. ARGV[1] .. '\\n' .."
    " ARGV[2])\n"
    "return id\n";


static ngx_str_t  ngx_http_civicgate_jose_type =
    ngx_string("application/jose");


static const char  *ngx_http_civicgate_states[] = {
    "operational", "maintenance", "degraded", "outage", NULL
};

static ngx_http_civicgate_status_t  *ngx_http_civicgate_status_worker;


static ngx_command_t  ngx_http_civicgate_status_commands[] = {

    { ngx_string("civicgate_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_civicgate_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_status_language"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_civicgate_status_language,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_status_max_wait"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_status_loc_conf_t, status_max_wait),
      NULL },

    { ngx_string("civicgate_status_heartbeat"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_status_loc_conf_t, status_heartbeat),
      NULL },

    { ngx_string("civicgate_status_history"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_civicgate_status_history,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_notice_limit"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE12,
      ngx_http_civicgate_notice_limit,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_status_max_clients"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_civicgate_status_max_clients,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_civicgate_status_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_civicgate_status_postconfiguration, /* postconfiguration */

    ngx_http_civicgate_status_create_main_conf, /* create main conf */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_civicgate_status_create_loc_conf, /* create location conf */
    ngx_http_civicgate_status_merge_loc_conf   /* merge location conf */
};


ngx_module_t  ngx_http_civicgate_status_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_status_module_ctx, /* module context */
    ngx_http_civicgate_status_commands,    /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_civicgate_status_init_process, /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_civicgate_status_exit_process, /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static char *
ngx_http_civicgate_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t          *clcf;
    ngx_http_civicgate_status_conf_t  *scf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_civicgate_status_handler;

    /* "location /status/" also answers /status, with a redirect */
    if (clcf->name.len && clcf->name.data[clcf->name.len - 1] == '/') {
        clcf->auto_redirect = 1;
    }

    scf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_civicgate_status_module);

    if (!scf->used) {
        scf->used = 1;
        scf->file = cf->conf_file->file.name.data;
        scf->line = cf->conf_file->line;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_civicgate_status_language(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_civicgate_status_loc_conf_t *cglcf = conf;

    ngx_str_t  *value;

    if (cglcf->status_language != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (value[1].len == 2 && ngx_strncmp(value[1].data, "id", 2) == 0) {
        cglcf->status_language = NGX_HTTP_CIVICGATE_LANG_ID;

    } else if (value[1].len == 2 && ngx_strncmp(value[1].data, "en", 2) == 0) {
        cglcf->status_language = NGX_HTTP_CIVICGATE_LANG_EN;

    } else {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid language \"%V\", it must be \"id\" or "
                           "\"en\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_civicgate_status_history(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_civicgate_status_conf_t *scf = conf;

    return ngx_http_civicgate_status_number(cf, &scf->history, 10,
                                            "history length");
}


static char *
ngx_http_civicgate_status_max_clients(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_civicgate_status_conf_t *scf = conf;

    return ngx_http_civicgate_status_number(cf, &scf->max_clients, 1,
                                            "number of clients");
}


/* a directive's one argument: a number of at least min */

static char *
ngx_http_civicgate_status_number(ngx_conf_t *cf, ngx_uint_t *field,
    ngx_int_t min, char *what)
{
    ngx_int_t   n;
    ngx_str_t  *value;

    if (*field != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;
    n = ngx_atoi(value[1].data, value[1].len);

    if (n < min) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid %s \"%V\", it must be a number of at "
                           "least %i", what, &value[1], min);
        return NGX_CONF_ERROR;
    }

    *field = n;

    return NGX_CONF_OK;
}


/* after the http block: Redis is required; scripts and the clients gauge */

static void *
ngx_http_civicgate_status_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_status_conf_t  *scf;

    scf = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_status_conf_t));
    if (scf == NULL) {
        return NULL;
    }

    scf->history = NGX_CONF_UNSET_UINT;
    scf->max_clients = NGX_CONF_UNSET_UINT;

    return scf;
}


static void *
ngx_http_civicgate_status_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_status_loc_conf_t  *conf;

    conf = ngx_palloc(cf->pool, sizeof(ngx_http_civicgate_status_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->status_language = NGX_CONF_UNSET_UINT;
    conf->status_max_wait = NGX_CONF_UNSET_MSEC;
    conf->status_heartbeat = NGX_CONF_UNSET_MSEC;

    return conf;
}


static char *
ngx_http_civicgate_status_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_civicgate_status_loc_conf_t *prev = parent;
    ngx_http_civicgate_status_loc_conf_t *conf = child;

    ngx_conf_merge_uint_value(conf->status_language, prev->status_language,
                              NGX_HTTP_CIVICGATE_LANG_ID);
    ngx_conf_merge_msec_value(conf->status_max_wait, prev->status_max_wait,
                              60000);
    ngx_conf_merge_msec_value(conf->status_heartbeat, prev->status_heartbeat,
                              15000);

    if (conf->status_heartbeat < 1000) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"civicgate_status_heartbeat\" must be at "
                           "least 1s");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_civicgate_status_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_civicgate_metrics_t      *m;
    ngx_http_civicgate_main_conf_t    *cgmcf;
    ngx_http_civicgate_status_conf_t  *scf;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);
    scf = ngx_http_conf_get_module_main_conf(cf,
                                             ngx_http_civicgate_status_module);
    scf->core = cgmcf;
    m = cgmcf->metrics;

    if (scf->history == NGX_CONF_UNSET_UINT) {
        scf->history = 1000;
    }

    m->status_clients = ngx_http_civicgate_metrics_family(cf, m,
                            "civicgate_status_clients",
                            "Status clients waiting for changes: "
                            "Server-Sent Events streams and long-polls.",
                            NGX_HTTP_CIVICGATE_GAUGE);
    if (m->status_clients == NULL
        || ngx_http_civicgate_metrics_label(cf, m->status_clients,
                                            "{kind=\"sse\"}") != NGX_OK
        || ngx_http_civicgate_metrics_label(cf, m->status_clients,
                                            "{kind=\"longpoll\"}") != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (!scf->used) {
        return NGX_OK;
    }

    if (cgmcf->redis == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"civicgate_status\" requires \"civicgate_redis\" "
                      "in %s:%ui", scf->file, scf->line);
        return NGX_ERROR;
    }

    scf->since_script = ngx_http_civicgate_redis_add_script(cf, cgmcf->redis,
                                               ngx_http_civicgate_since_lua);
    scf->change_script = ngx_http_civicgate_redis_add_script(cf, cgmcf->redis,
                                               ngx_http_civicgate_change_lua);

    if (scf->since_script == NULL || scf->change_script == NULL) {
        return NGX_ERROR;
    }

    if (ngx_http_civicgate_on_ready(cf, ngx_http_civicgate_status_ready)
        != NGX_OK
        || ngx_http_civicgate_subscribe(cf,
                                        NGX_HTTP_CIVICGATE_KEY_STATUS_CHANGES,
                                        ngx_http_civicgate_status_message,
                                  ngx_http_civicgate_status_subscriber_ready)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* followed journeys' channels are the status's too */
    if (ngx_http_civicgate_subscribe(cf, NULL,
                                     ngx_http_civicgate_status_message, NULL)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_civicgate_notice_init_conf(cf, scf) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_civicgate_journey_status_init_conf(cf, scf);
}


static ngx_int_t
ngx_http_civicgate_status_init_process(ngx_cycle_t *cycle)
{
    ngx_str_t                         *name;
    ngx_uint_t                         i;
    ngx_http_civicgate_status_t       *st;
    ngx_http_civicgate_main_conf_t    *cgmcf;
    ngx_http_civicgate_status_conf_t  *scf;

    scf = ngx_http_cycle_get_module_main_conf(cycle,
                                            ngx_http_civicgate_status_module);

    if (scf == NULL || !scf->used
        || (ngx_process != NGX_PROCESS_WORKER
            && ngx_process != NGX_PROCESS_SINGLE))
    {
        return NGX_OK;
    }

    cgmcf = scf->core;

    st = ngx_pcalloc(cycle->pool, sizeof(ngx_http_civicgate_status_t));
    if (st == NULL) {
        return NGX_ERROR;
    }

    st->cgmcf = cgmcf;
    st->scf = scf;
    st->nservices = cgmcf->services.nelts;
    st->services = ngx_pcalloc(cycle->pool, st->nservices
                                       * sizeof(ngx_http_civicgate_service_t));
    st->topic.ring = ngx_pcalloc(cycle->pool, NGX_HTTP_CIVICGATE_RING
                                       * sizeof(ngx_http_civicgate_change_t));

    if (st->services == NULL || st->topic.ring == NULL) {
        return NGX_ERROR;
    }

    name = cgmcf->services.elts;

    for (i = 0; i < st->nservices; i++) {
        st->services[i].name = name[i];
    }

    st->topic.ring_size = NGX_HTTP_CIVICGATE_RING;
    ngx_queue_init(&st->topic.clients);
    ngx_queue_init(&st->topic.pending);

    st->retry.handler = ngx_http_civicgate_catch_up_retry;
    st->retry.log = cycle->log;
    st->retry.cancelable = 1;

    /* by default half the connections stay for ordinary requests */
    ngx_http_civicgate_clients_init(
                     scf->max_clients != NGX_CONF_UNSET_UINT
                     ? scf->max_clients
                     : ngx_max(cycle->connection_n / 2, 1));

    ngx_http_civicgate_status_worker = st;

    return ngx_http_civicgate_journey_status_init_worker(cycle, cgmcf);
}


/* the worker is exiting: its copy of the state is freed */

static void
ngx_http_civicgate_status_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                    i, j;
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;
    if (st == NULL) {
        return;
    }

    if (st->retry.timer_set) {
        ngx_del_timer(&st->retry);
    }

    for (i = 0; i < st->nservices; i++) {
        json_decref(st->services[i].record);
    }

    for (i = 0; i < NGX_HTTP_CIVICGATE_LANGS; i++) {
        ngx_free(st->render[i].body.data);
        ngx_free(st->render[i].jws.data);
    }

    for (i = 0; i < st->topic.ring_size; i++) {
        for (j = 0; j < NGX_HTTP_CIVICGATE_LANGS; j++) {
            ngx_free(st->topic.ring[i].text[j].data);
        }
    }

    ngx_http_civicgate_status_worker = NULL;
}


/* <location>, <location>journeys/{id} */

static ngx_int_t
ngx_http_civicgate_status_handler(ngx_http_request_t *r)
{
    ngx_int_t                     rc;
    ngx_str_t                     rest;
    ngx_uint_t                    lang, sse;
    ngx_msec_t                    wait;
    ngx_table_elt_t              *h;
    ngx_http_civicgate_render_t  *rd;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return ngx_http_civicgate_method_not_allowed(r, "GET, HEAD");
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    if (ngx_http_civicgate_location_rest(r, &rest) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* "location /status" serves /status/ and /status/journeys/ too */
    if (rest.len && rest.data[0] == '/') {
        rest.data++;
        rest.len--;
    }

    lang = ngx_http_civicgate_status_lang(r);
    wait = ngx_http_civicgate_status_wait(r);

    sse = 0;
    h = r->headers_in.accept;

    if (h && ngx_strlcasestrn(h->value.data, h->value.data + h->value.len,
                              (u_char *) "text/event-stream", 17 - 1)
             != NULL)
    {
        sse = 1;
    }

    if (rest.len != 0) {
        return ngx_http_civicgate_status_below(r, &rest, sse, wait);
    }

    if (ngx_http_civicgate_status_worker == NULL) {
        return ngx_http_civicgate_error(r, NGX_HTTP_NOT_FOUND, "not-found",
                                        "No such status resource.");
    }

    if (sse && !r->header_only) {
        return ngx_http_civicgate_services_sse(r, lang);
    }

    rd = ngx_http_civicgate_status_render(lang);
    if (rd == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rd->stale && ngx_http_civicgate_set_stale(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ngx_http_civicgate_jws_wanted(r)) {
        return ngx_http_civicgate_status_jws(r, rd, lang);
    }

    if (!ngx_http_civicgate_etag_matches(r, &rd->etag)) {
        return ngx_http_civicgate_send_etag(r, &rd->body, &rd->etag, lang);
    }

    if (wait == 0) {
        return ngx_http_civicgate_send_etag(r, NULL, &rd->etag, lang);
    }

    return ngx_http_civicgate_status_park(r, lang, wait, &rd->etag,
                                     &ngx_http_civicgate_status_worker->topic,
                                     ngx_http_civicgate_services_longpoll);
}


/* <location>journeys/{id}, <location>notices/{code} */

static ngx_int_t
ngx_http_civicgate_status_below(ngx_http_request_t *r, ngx_str_t *rest,
    ngx_uint_t sse, ngx_msec_t wait)
{
    if (rest->len > 9 && ngx_strncmp(rest->data, "journeys/", 9) == 0) {
        rest->data += 9;
        rest->len -= 9;
        return ngx_http_civicgate_journey_status(r, rest, sse, wait);
    }

    if (rest->len > 8 && ngx_strncmp(rest->data, "notices/", 8) == 0
        && ngx_http_civicgate_status_worker != NULL)
    {
        rest->data += 8;
        rest->len -= 8;
        return ngx_http_civicgate_notice_lookup(r, rest);
    }

    return ngx_http_civicgate_error(r, NGX_HTTP_NOT_FOUND, "not-found",
                                    "No such status resource.");
}


/* ?format=jws, or application/jose (not application/jose+json) in Accept */

static ngx_uint_t
ngx_http_civicgate_jws_wanted(ngx_http_request_t *r)
{
    u_char           *p, *end;
    ngx_str_t         arg;
    ngx_table_elt_t  *h;

    if (ngx_http_arg(r, (u_char *) "format", 6, &arg) == NGX_OK
        && arg.len == 3 && ngx_strncmp(arg.data, "jws", 3) == 0)
    {
        return 1;
    }

    h = r->headers_in.accept;
    if (h == NULL) {
        return 0;
    }

    end = h->value.data + h->value.len;
    p = ngx_strlcasestrn(h->value.data, end, (u_char *) "application/jose",
                         sizeof("application/jose") - 2);

    return p != NULL && (p + 16 == end || p[16] != '+');
}


/*
 * The status document as a compact JWS, its payload the exact bytes of
 * the JSON document (newline included); its ETag the JSON's with "-jws".
 */

static ngx_int_t
ngx_http_civicgate_status_jws(ngx_http_request_t *r,
    ngx_http_civicgate_render_t *rd, ngx_uint_t lang)
{
    u_char                          *p;
    ngx_str_t                        jws, etag;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    if (cgmcf->signing == NULL) {
        return ngx_http_civicgate_error(r, NGX_HTTP_CIVICGATE_NOT_ACCEPTABLE,
                                        "not-signed",
                                        "This gateway has no signing key: "
                                        "its status is JSON only.");
    }

    etag.len = rd->etag.len + sizeof("-jws") - 1;
    etag.data = ngx_pnalloc(r->pool, etag.len);
    if (etag.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_cpymem(etag.data, rd->etag.data, rd->etag.len - 1);
    ngx_memcpy(p, "-jws\"", sizeof("-jws\"") - 1);

    if (ngx_http_civicgate_etag_matches(r, &etag)) {
        return ngx_http_civicgate_send_typed(r, NULL, &etag, lang,
                                             &ngx_http_civicgate_jose_type);
    }

    /* signed once per version of the document, as it is rendered once */
    if (rd->jws.data == NULL) {
        if (ngx_http_civicgate_jws(r->pool, cgmcf->signing, &rd->body, &jws,
                                   NULL)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        rd->jws.data = ngx_alloc(jws.len, r->connection->log);
        if (rd->jws.data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        rd->jws.len = jws.len;
        ngx_memcpy(rd->jws.data, jws.data, jws.len);
    }

    /* the request's own copy: a change may re-sign while it is sent */
    jws.data = ngx_pstrdup(r->pool, &rd->jws);
    if (jws.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    jws.len = rd->jws.len;

    return ngx_http_civicgate_send_typed(r, &jws, &etag, lang,
                                         &ngx_http_civicgate_jose_type);
}


/* a long-poll waits for a change, or answers 304 at the deadline */

ngx_int_t
ngx_http_civicgate_status_park(ngx_http_request_t *r, ngx_uint_t lang,
    ngx_msec_t wait, ngx_str_t *etag, ngx_http_civicgate_topic_t *t,
    ngx_http_civicgate_client_pt notify)
{
    ngx_http_civicgate_client_t  *cl;

    if (ngx_http_civicgate_clients_full()) {
        return ngx_http_civicgate_client_refuse(r);
    }

    cl = ngx_http_civicgate_client_create(r, t, 1);
    if (cl == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cl->lang = lang;
    cl->notify = notify;
    cl->etag.data = ngx_pstrdup(r->pool, etag);
    cl->etag.len = etag->len;

    if (cl->etag.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_http_civicgate_client_wait(cl, wait);

    return NGX_DONE;
}


static void
ngx_http_civicgate_services_longpoll(ngx_http_civicgate_client_t *cl)
{
    ngx_int_t                     rc;
    ngx_http_civicgate_render_t  *rd;

    rd = ngx_http_civicgate_status_render(cl->lang);

    if (rd != NULL && rd->etag.len == cl->etag.len
        && ngx_strncmp(rd->etag.data, cl->etag.data, rd->etag.len) == 0)
    {
        return;
    }

    rc = (rd == NULL) ? NGX_HTTP_INTERNAL_SERVER_ERROR
         : ngx_http_civicgate_send_etag(cl->request, &rd->body, &rd->etag,
                                        cl->lang);

    ngx_http_civicgate_client_finish(cl, rc);
}


ngx_int_t
ngx_http_civicgate_set_stale(ngx_http_request_t *r)
{
    ngx_table_elt_t  *h;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Civicgate-Stale");
    ngx_str_set(&h->value, "1");

    return NGX_OK;
}


/* ?lang=, then Accept-Language by q, then civicgate_status_language */

ngx_uint_t
ngx_http_civicgate_status_lang(ngx_http_request_t *r)
{
    u_char                                *p, *end, *tag;
    ngx_str_t                              arg;
    ngx_uint_t                             lang, q, best, n;
    ngx_http_civicgate_status_loc_conf_t  *cglcf;

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_status_module);

    if (ngx_http_arg(r, (u_char *) "lang", 4, &arg) == NGX_OK) {
        if (arg.len == 3 && ngx_strncmp(arg.data, "all", 3) == 0) {
            return NGX_HTTP_CIVICGATE_LANG_ALL;
        }

        if (arg.len == 2 && ngx_strncmp(arg.data, "en", 2) == 0) {
            return NGX_HTTP_CIVICGATE_LANG_EN;
        }

        if (arg.len == 2 && ngx_strncmp(arg.data, "id", 2) == 0) {
            return NGX_HTTP_CIVICGATE_LANG_ID;
        }
    }

    lang = cglcf->status_language;

    if (r->headers_in.accept_language == NULL) {
        return lang;
    }

    p = r->headers_in.accept_language->value.data;
    end = p + r->headers_in.accept_language->value.len;
    best = 0;

    while (p < end) {
        while (p < end && (*p == ' ' || *p == ',')) {
            p++;
        }

        tag = p;

        while (p < end && *p != ',' && *p != ';' && *p != ' ') {
            p++;
        }

        n = p - tag;
        q = 1000;

        while (p < end && *p != ',') {
            if (*p == 'q' && p + 1 < end && p[1] == '=') {
                q = ngx_http_civicgate_qvalue(p + 2, end);
            }

            p++;
        }

        if (q <= best || n < 2 || (n > 2 && tag[2] != '-')) {
            continue;
        }

        if (ngx_strncasecmp(tag, (u_char *) "id", 2) == 0
            || ngx_strncasecmp(tag, (u_char *) "in", 2) == 0)
        {
            lang = NGX_HTTP_CIVICGATE_LANG_ID;
            best = q;

        } else if (ngx_strncasecmp(tag, (u_char *) "en", 2) == 0) {
            lang = NGX_HTTP_CIVICGATE_LANG_EN;
            best = q;
        }
    }

    return lang;
}


/* "0.5" as 500: at most three decimals, as RFC 9110 allows */

ngx_uint_t
ngx_http_civicgate_qvalue(u_char *p, u_char *end)
{
    ngx_uint_t  q, scale;

    if (p >= end || (*p != '0' && *p != '1')) {
        return 0;
    }

    q = (*p++ - '0') * 1000;

    if (p < end && *p == '.') {
        p++;

        for (scale = 100; scale && p < end && *p >= '0' && *p <= '9'; p++) {
            q += (*p - '0') * scale;
            scale /= 10;
        }
    }

    return ngx_min(q, 1000);
}


static ngx_msec_t
ngx_http_civicgate_status_wait(ngx_http_request_t *r)
{
    ngx_int_t                              n;
    ngx_str_t                              arg;
    ngx_http_civicgate_status_loc_conf_t  *cglcf;

    if (ngx_http_arg(r, (u_char *) "wait", 4, &arg) != NGX_OK) {
        return 0;
    }

    n = ngx_atoi(arg.data, arg.len);
    if (n <= 0) {
        return 0;
    }

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_status_module);

    if ((ngx_msec_t) n > cglcf->status_max_wait / 1000) {
        return cglcf->status_max_wait;
    }

    return (ngx_msec_t) n * 1000;
}


/* event stream: a snapshot, or the changes after Last-Event-ID; then live */

static ngx_int_t
ngx_http_civicgate_services_sse(ngx_http_request_t *r, ngx_uint_t lang)
{
    ngx_http_civicgate_sid_t       sid;
    ngx_http_civicgate_client_t   *cl;
    ngx_http_civicgate_status_t   *st;

    if (ngx_http_civicgate_clients_full()) {
        return ngx_http_civicgate_client_refuse(r);
    }

    st = ngx_http_civicgate_status_worker;

    cl = ngx_http_civicgate_client_create(r, &st->topic, 1);
    if (cl == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cl->lang = lang;
    cl->notify = ngx_http_civicgate_sse_notify;
    cl->seq = st->topic.seq;

    if (ngx_http_civicgate_sse_start(cl) != NGX_OK) {
        ngx_http_civicgate_client_finish(cl, NGX_ERROR);
        return NGX_DONE;
    }

    if (ngx_http_civicgate_last_event_id(r, &sid) != NGX_OK
        || ngx_http_civicgate_since(&sid, ngx_http_civicgate_services_resumed,
                                    cl, &cl->cmd)
           != NGX_OK)
    {
        ngx_http_civicgate_services_snapshot(cl);
        return NGX_DONE;
    }

    cl->last = sid;

    return NGX_DONE;
}


/* the since script: the changes after sid, or a snapshot (sid NULL) */

static ngx_int_t
ngx_http_civicgate_since(ngx_http_civicgate_sid_t *sid,
    ngx_http_civicgate_redis_handler_pt handler, void *data,
    ngx_http_civicgate_redis_cmd_t **cmd)
{
    u_char                           since[NGX_HTTP_CIVICGATE_SID_LEN];
    ngx_http_civicgate_status_t     *st;
    ngx_http_civicgate_redis_args_t  a;

    st = ngx_http_civicgate_status_worker;

    ngx_http_civicgate_redis_evalsha(&a, st->scf->since_script,
                                     "2");
    ngx_http_civicgate_redis_arg_str(&a,
                                     NGX_HTTP_CIVICGATE_KEY_STATUS_SERVICES);
    ngx_http_civicgate_redis_arg_str(&a,
                                     NGX_HTTP_CIVICGATE_KEY_STATUS_HISTORY);
    ngx_http_civicgate_redis_arg(&a, since,
                                 sid ? ngx_http_civicgate_sid_format(since, sid)
                                       - since
                                     : 0);
    ngx_http_civicgate_redis_arg_str(&a, NGX_HTTP_CIVICGATE_CATCHUP_MAX);

    *cmd = ngx_http_civicgate_redis_send(st->cgmcf->client, a.argc, a.argv,
                                         a.lens, handler, data);

    return *cmd ? NGX_OK : NGX_ERROR;
}


static void
ngx_http_civicgate_services_resumed(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_http_civicgate_client_t *cl = cmd->data;

    size_t       i;
    redisReply  *entries;

    cl->cmd = NULL;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != 2
        || reply->element[0]->type != REDIS_REPLY_STRING
        || ngx_strncmp(reply->element[0]->str, "changes", 7) != 0
        || reply->element[1]->type != REDIS_REPLY_ARRAY)
    {
        ngx_http_civicgate_services_snapshot(cl);
        return;
    }

    entries = reply->element[1];

    for (i = 0; i < entries->elements; i++) {
        if (ngx_http_civicgate_resume_entry(cl, entries->element[i])
            != NGX_OK)
        {
            ngx_http_civicgate_client_finish(cl, NGX_ERROR);
            return;
        }
    }

    ngx_http_civicgate_client_wait(cl, ngx_http_civicgate_heartbeat(cl));
    ngx_http_civicgate_sse_notify(cl);
}


/* one history entry, as the "service" event it was when live */

static ngx_int_t
ngx_http_civicgate_resume_entry(ngx_http_civicgate_client_t *cl,
    redisReply *entry)
{
    json_t                        *data;
    ngx_int_t                      rc;
    ngx_http_civicgate_sid_t       sid;
    ngx_http_civicgate_service_t   s, *known;
    ngx_http_civicgate_change_t    ch;
    redisReply                    *f;

    if (ngx_http_civicgate_entry_fields(entry, &sid, &f) != NGX_OK) {
        return NGX_OK;
    }

    known = ngx_http_civicgate_service_find((u_char *) f->element[1]->str,
                                            f->element[1]->len);
    if (known == NULL) {
        return NGX_OK;
    }

    s.name = known->name;
    s.record = NULL;
    s.rev = sid;

    if (f->element[3]->len) {
        s.record = json_loadb(f->element[3]->str, f->element[3]->len, 0,
                              NULL);
    }

    data = ngx_http_civicgate_service_json(&s, cl->lang);
    json_decref(s.record);

    if (data == NULL) {
        return NGX_ERROR;
    }

    json_object_set_new(data, "overall",
                        json_string(ngx_http_civicgate_overall()));

    ngx_memzero(&ch, sizeof(ngx_http_civicgate_change_t));
    ch.sid = sid;

    rc = ngx_http_civicgate_change_text(&ch, 0, "service", data, NULL);
    json_decref(data);

    if (rc != NGX_OK) {
        return NGX_ERROR;
    }

    /* the buffer grows: it holds only what was missed, not yet sent */
    rc = ngx_http_civicgate_sse_append(cl, ch.text[0].data, ch.text[0].len,
                                       1);
    ngx_free(ch.text[0].data);

    if (rc == NGX_OK && ngx_http_civicgate_sid_cmp(&sid, &cl->last) > 0) {
        cl->last = sid;
    }

    return rc;
}


/* [id, [service, NAME, record, JSON]] */

static ngx_int_t
ngx_http_civicgate_entry_fields(redisReply *entry,
    ngx_http_civicgate_sid_t *sid, redisReply **fields)
{
    redisReply  *f;

    if (entry->type != REDIS_REPLY_ARRAY || entry->elements != 2
        || entry->element[0]->type != REDIS_REPLY_STRING
        || entry->element[1]->type != REDIS_REPLY_ARRAY
        || entry->element[1]->elements != 4
        || ngx_http_civicgate_sid_parse((u_char *) entry->element[0]->str,
                                        entry->element[0]->len, sid)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    f = entry->element[1];

    if (f->element[1]->type != REDIS_REPLY_STRING
        || f->element[3]->type != REDIS_REPLY_STRING)
    {
        return NGX_ERROR;
    }

    *fields = f;

    return NGX_OK;
}


static void
ngx_http_civicgate_services_snapshot(ngx_http_civicgate_client_t *cl)
{
    ngx_http_civicgate_render_t  *rd;
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;
    rd = ngx_http_civicgate_status_render(cl->lang);

    cl->seq = st->topic.seq;
    cl->last.ms = 0;
    cl->last.seq = 0;

    if (rd == NULL
        || ngx_http_civicgate_sse_event(cl, "snapshot", &st->topic.version,
                                        NULL, &rd->body)
           != NGX_OK)
    {
        ngx_http_civicgate_client_finish(cl, NGX_ERROR);
        return;
    }

    cl->last = st->topic.version;

    ngx_http_civicgate_client_wait(cl, ngx_http_civicgate_heartbeat(cl));
    ngx_http_civicgate_sse_flush(cl);
}


/* Redis unreachable, or the copy not (yet) following the changes */

static ngx_int_t
ngx_http_civicgate_status_stale(void)
{
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;

    return !st->loaded || !st->subscribed
           || !ngx_http_civicgate_redis_ready(st->cgmcf->client)
           || !ngx_http_civicgate_redis_ready(st->cgmcf->subscriber);
}


/* the JSON of GET <location> per language, made once per change */

static ngx_http_civicgate_render_t *
ngx_http_civicgate_status_render(ngx_uint_t lang)
{
    u_char                        time[32], *p;
    json_t                       *root, *list, *item;
    size_t                        len;
    uint32_t                      h1, h2;
    ngx_uint_t                    i, stale;
    ngx_http_civicgate_render_t  *rd;
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;
    rd = &st->render[lang];
    stale = ngx_http_civicgate_status_stale();

    if (rd->valid && rd->stale == stale) {
        return rd;
    }

    list = json_array();
    root = json_object();

    for (i = 0; list && i < st->nservices; i++) {
        item = ngx_http_civicgate_service_json(&st->services[i], lang);
        json_array_append_new(list, item);
    }

    if (st->topic.version.ms) {
        p = ngx_http_civicgate_time_ms(time, st->topic.version.ms);
        json_object_set_new(root, "updated_at",
                            json_stringn((char *) time, p - time));
    } else {
        json_object_set_new(root, "updated_at", json_null());
    }

    json_object_set_new(root, "overall",
                        json_string(ngx_http_civicgate_overall()));
    json_object_set_new(root, "lang",
                        json_string(lang == NGX_HTTP_CIVICGATE_LANG_ID ? "id"
                                    : lang == NGX_HTTP_CIVICGATE_LANG_EN
                                      ? "en" : "all"));
    json_object_set_new(root, "stale", json_boolean(stale));
    json_object_set_new(root, "services", list);

    len = json_dumpb(root, NULL, 0, JSON_COMPACT);

    ngx_free(rd->body.data);
    rd->body.data = ngx_alloc(len + 1, ngx_cycle->log);
    rd->valid = 0;

    ngx_free(rd->jws.data);
    ngx_str_null(&rd->jws);

    if (rd->body.data == NULL) {
        json_decref(root);
        return NULL;
    }

    rd->body.len = json_dumpb(root, (char *) rd->body.data, len,
                              JSON_COMPACT);
    rd->body.data[rd->body.len++] = '\n';
    json_decref(root);

    h1 = ngx_crc32_long(rd->body.data, rd->body.len);
    h2 = ngx_murmur_hash2(rd->body.data, rd->body.len);

    rd->etag.data = rd->etag_data;
    rd->etag.len = ngx_sprintf(rd->etag_data, "\"%08xD%08xD\"", h1, h2)
                   - rd->etag_data;
    rd->stale = stale;
    rd->valid = 1;

    return rd;
}


/*
 * The document GET <location> answers, for a page that renders it; the
 * body is the worker's, valid until the status changes: use it at once.
 */

ngx_int_t
ngx_http_civicgate_status_document(ngx_uint_t lang, ngx_str_t *body)
{
    ngx_http_civicgate_render_t  *rd;

    if (ngx_http_civicgate_status_worker == NULL) {
        return NGX_DECLINED;
    }

    rd = ngx_http_civicgate_status_render(lang);
    if (rd == NULL) {
        return NGX_ERROR;
    }

    *body = rd->body;

    return NGX_OK;
}


static json_t *
ngx_http_civicgate_service_json(ngx_http_civicgate_service_t *s,
    ngx_uint_t lang)
{
    u_char      *p, time[32];
    json_t      *item, *r, *msg, *id, *en;
    const char  *state;

    r = s->record;
    msg = json_null();

    if (r == NULL) {
        state = ngx_http_civicgate_status_worker->loaded ? "operational"
                                                        : "unknown";
    } else {
        state = json_string_value(json_object_get(r, "state"));
        id = json_object_get(r, "message")
             ? json_object_get(json_object_get(r, "message"), "id") : NULL;
        en = json_object_get(r, "message")
             ? json_object_get(json_object_get(r, "message"), "en") : NULL;

        if (lang == NGX_HTTP_CIVICGATE_LANG_ALL) {
            if (id || en) {
                msg = json_deep_copy(json_object_get(r, "message"));
            }

        } else if (lang == NGX_HTTP_CIVICGATE_LANG_ID) {
            msg = id ? json_incref(id) : en ? json_incref(en) : msg;

        } else {
            msg = en ? json_incref(en) : id ? json_incref(id) : msg;
        }
    }

    item = json_object();
    json_object_set_new(item, "name",
                        json_stringn((char *) s->name.data, s->name.len));
    json_object_set_new(item, "state", json_string(state ? state
                                                         : "unknown"));
    json_object_set_new(item, "message", msg);
    json_object_set(item, "since", ngx_http_civicgate_field(r, "since"));
    json_object_set(item, "until", ngx_http_civicgate_field(r, "until"));

    /* the time of the change that set (or cleared) it, by Redis's clock */
    if (s->rev.ms) {
        p = ngx_http_civicgate_time_ms(time, s->rev.ms);
        json_object_set_new(item, "updated_at",
                            json_stringn((char *) time, p - time));

    } else {
        json_object_set_new(item, "updated_at", json_null());
    }

    return item;
}


static json_t *
ngx_http_civicgate_field(json_t *record, const char *name)
{
    json_t  *v;

    v = record ? json_object_get(record, name) : NULL;

    return v ? v : json_null();
}


/* the most severe state: outage > degraded > maintenance > operational */

static const char *
ngx_http_civicgate_overall(void)
{
    ngx_uint_t                    i, j, worst;
    const char                   *state;
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;

    if (!st->loaded) {
        return "unknown";
    }

    worst = 0;

    for (i = 0; i < st->nservices; i++) {
        if (st->services[i].record == NULL) {
            continue;
        }

        state = json_string_value(json_object_get(st->services[i].record,
                                                  "state"));

        for (j = 0; state && ngx_http_civicgate_states[j]; j++) {
            if (ngx_strcmp(state, ngx_http_civicgate_states[j]) == 0) {
                worst = ngx_max(worst, j);
                break;
            }
        }
    }

    return ngx_http_civicgate_states[worst];
}


/* the command connection is (again) ready */

static void
ngx_http_civicgate_status_ready(ngx_http_civicgate_redis_t *rc)
{
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;

    if (st != NULL && st->subscribed && st->again) {
        ngx_http_civicgate_catch_up();
    }
}


/* the subscriber connection is (again) up: its subscriptions are new */

static void
ngx_http_civicgate_status_subscriber_ready(ngx_http_civicgate_redis_t *rc)
{
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;
    if (st == NULL) {
        return;
    }

    st->subscribed = 0;
    ngx_http_civicgate_status_invalidate();

    ngx_http_civicgate_journeys_resubscribe();
}


/* pushes on the subscriber connection: confirmations and changes */

static void
ngx_http_civicgate_status_message(ngx_http_civicgate_redis_t *rc,
    redisReply *reply)
{
    u_char                       *p, *end, *name, *nl;
    ngx_str_t                     channel;
    redisReply                   *kind, *payload;
    ngx_http_civicgate_sid_t      sid;
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;
    if (st == NULL) {
        return;
    }

    kind = reply->element[0];
    payload = reply->element[2];
    channel.data = (u_char *) reply->element[1]->str;
    channel.len = reply->element[1]->len;

    if (channel.len != sizeof(NGX_HTTP_CIVICGATE_KEY_STATUS_CHANGES) - 1
        || ngx_strncmp(channel.data, NGX_HTTP_CIVICGATE_KEY_STATUS_CHANGES,
                       channel.len) != 0)
    {
        if (kind->len == 9 && ngx_strncmp(kind->str, "subscribe", 9) == 0) {
            ngx_http_civicgate_journey_subscribed(&channel);

        } else if (kind->len == 7
                   && ngx_strncmp(kind->str, "message", 7) == 0)
        {
            ngx_http_civicgate_journey_message(&channel, payload);
        }

        return;
    }

    if (kind->len == 9 && ngx_strncmp(kind->str, "subscribe", 9) == 0) {
        st->subscribed = 1;
        ngx_http_civicgate_catch_up();
        return;
    }

    if (kind->len != 7 || ngx_strncmp(kind->str, "message", 7) != 0
        || payload->type != REDIS_REPLY_STRING)
    {
        return;
    }

    /* "ID\nNAME\nRECORD" */

    p = (u_char *) payload->str;
    end = p + payload->len;

    nl = ngx_strlchr(p, end, '\n');
    if (nl == NULL || ngx_http_civicgate_sid_parse(p, nl - p, &sid) != NGX_OK)
    {
        return;
    }

    name = nl + 1;
    nl = ngx_strlchr(name, end, '\n');
    if (nl == NULL) {
        return;
    }

    if (ngx_http_civicgate_apply(&sid, name, nl - name, nl + 1,
                                 end - nl - 1)
        == NGX_OK)
    {
        ngx_http_civicgate_topic_notify(&st->topic);
    }
}


/* the state since the last change this worker saw, or all of it */

static void
ngx_http_civicgate_catch_up(void)
{
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;

    st->again = 1;

    if (st->cmd) {
        return;      /* again when it answers */
    }

    if (ngx_http_civicgate_since(st->loaded ? &st->topic.version : NULL,
                                 ngx_http_civicgate_caught_up, st, &st->cmd)
        == NGX_OK)
    {
        st->asked = st->loaded ? st->topic.version
                               : (ngx_http_civicgate_sid_t) { 0, 0 };
        st->again = 0;
    }
}


static void
ngx_http_civicgate_catch_up_retry(ngx_event_t *ev)
{
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;

    if (st->subscribed && st->again) {
        ngx_http_civicgate_catch_up();
    }
}


static void
ngx_http_civicgate_caught_up(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    size_t                        i;
    ngx_int_t                     changed;
    redisReply                   *kind;
    ngx_http_civicgate_status_t  *st;

    st = cmd->data;
    st->cmd = NULL;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements < 2
        || reply->element[0]->type != REDIS_REPLY_STRING)
    {
        ngx_http_civicgate_redis_refused(cmd->redis, reply,
                                         "a status catch-up",
                                         &st->refused);

        st->again = 1;

        if (!st->retry.timer_set && !ngx_exiting) {
            ngx_add_timer(&st->retry, NGX_HTTP_CIVICGATE_CATCHUP_RETRY);
        }

        return;
    }

    kind = reply->element[0];
    changed = 0;

    if (kind->len == 8 && ngx_strncmp(kind->str, "snapshot", 8) == 0
        && reply->elements == 3)
    {
        changed = ngx_http_civicgate_apply_snapshot(reply->element[1],
                                                    reply->element[2]);

    } else if (reply->element[1]->type == REDIS_REPLY_ARRAY) {
        for (i = 0; i < reply->element[1]->elements; i++) {
            if (ngx_http_civicgate_apply_entry(reply->element[1]->element[i])
                == NGX_OK)
            {
                changed = 1;
            }
        }
    }

    ngx_http_civicgate_status_invalidate();

    if (!st->loaded) {
        /* streams opened before the first load get the state at once */
        st->loaded = 1;
        changed = 1;
        (void) ngx_http_civicgate_push_snapshot();
    }

    if (changed) {
        ngx_http_civicgate_topic_notify(&st->topic);
    }

    if (st->again) {
        ngx_http_civicgate_catch_up();
    }
}


/* a service's record in the snapshot, if newer: 1 when it changed */

static ngx_uint_t
ngx_http_civicgate_snapshot_service(ngx_http_civicgate_service_t *s,
    redisReply *hash, ngx_uint_t *found)
{
    u_char                    *sp;
    size_t                     j;
    json_t                    *rec;
    redisReply                *v;
    ngx_http_civicgate_sid_t   rev;

    *found = 0;

    for (j = 0; j + 1 < hash->elements; j += 2) {
        if (hash->element[j]->len != s->name.len
            || ngx_strncmp(hash->element[j]->str, s->name.data,
                           s->name.len) != 0)
        {
            continue;
        }

        v = hash->element[j + 1];
        sp = (u_char *) ngx_strlchr((u_char *) v->str,
                                    (u_char *) v->str + v->len, ' ');

        if (sp == NULL
            || ngx_http_civicgate_sid_parse((u_char *) v->str,
                                            sp - (u_char *) v->str, &rev)
               != NGX_OK)
        {
            return 0;
        }

        *found = 1;

        if (ngx_http_civicgate_sid_cmp(&rev, &s->rev) <= 0) {
            return 0;
        }

        rec = json_loadb((char *) sp + 1, v->str + v->len - (char *) sp - 1,
                         0, NULL);
        if (rec == NULL) {
            return 0;
        }

        json_decref(s->record);
        s->record = rec;
        s->rev = rev;

        return 1;
    }

    return 0;
}


/*
 * A snapshot merges by revision: a record replaces the copy's only when it
 * is newer, and a service missing from it is cleared only when the copy's
 * record is older than the snapshot.  Anything that changed goes to
 * streaming clients as a new snapshot.
 */

static ngx_int_t
ngx_http_civicgate_apply_snapshot(redisReply *id, redisReply *hash)
{
    ngx_uint_t                     i, changed, found;
    ngx_http_civicgate_sid_t       snap;
    ngx_http_civicgate_status_t   *st;
    ngx_http_civicgate_service_t  *s;

    st = ngx_http_civicgate_status_worker;

    if (id->type != REDIS_REPLY_STRING || hash->type != REDIS_REPLY_ARRAY
        || ngx_http_civicgate_sid_parse((u_char *) id->str, id->len, &snap)
           != NGX_OK)
    {
        return 0;
    }

    changed = 0;

    /*
     * A history that ends before what this worker asked from was reset
     * (Redis restarted without persistence, or restored from an older
     * copy): Redis is the truth, the copy starts over from it.
     */
    if (ngx_http_civicgate_sid_cmp(&snap, &st->asked) < 0) {
        ngx_log_error(NGX_LOG_NOTICE, ngx_cycle->log, 0,
                      "civicgate: status history in Redis was reset, "
                      "state read again");

        for (i = 0; i < st->nservices; i++) {
            json_decref(st->services[i].record);
            st->services[i].record = NULL;
            st->services[i].rev.ms = 0;
            st->services[i].rev.seq = 0;
        }

        st->topic.version = snap;
        changed = 1;
    }

    for (i = 0; i < st->nservices; i++) {
        s = &st->services[i];

        changed |= ngx_http_civicgate_snapshot_service(s, hash, &found);

        if (!found && s->record
            && ngx_http_civicgate_sid_cmp(&s->rev, &snap) < 0)
        {
            json_decref(s->record);
            s->record = NULL;
            s->rev = snap;
            changed = 1;
        }
    }

    if (ngx_http_civicgate_sid_cmp(&snap, &st->topic.version) > 0) {
        st->topic.version = snap;
    }

    if (changed && st->loaded) {
        (void) ngx_http_civicgate_push_snapshot();
    }

    return changed;
}


static ngx_int_t
ngx_http_civicgate_apply_entry(redisReply *entry)
{
    redisReply                *f;
    ngx_http_civicgate_sid_t   sid;

    if (ngx_http_civicgate_entry_fields(entry, &sid, &f) != NGX_OK) {
        return NGX_DECLINED;
    }

    return ngx_http_civicgate_apply(&sid, (u_char *) f->element[1]->str,
                                    f->element[1]->len,
                                    (u_char *) f->element[3]->str,
                                    f->element[3]->len);
}


/* a change this worker made through the admin endpoint */

ngx_int_t
ngx_http_civicgate_status_apply(ngx_http_civicgate_sid_t *sid,
    ngx_str_t *name, ngx_str_t *record)
{
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;

    if (st == NULL
        || ngx_http_civicgate_apply(sid, name->data, name->len, record->data,
                                    record->len)
           != NGX_OK)
    {
        return NGX_DECLINED;
    }

    ngx_http_civicgate_topic_notify(&st->topic);

    return NGX_OK;
}


/* one change: NGX_OK when it was new to this worker */

static ngx_int_t
ngx_http_civicgate_apply(ngx_http_civicgate_sid_t *sid, u_char *name,
    size_t name_len, u_char *record, size_t record_len)
{
    json_t                        *rec, *data;
    ngx_uint_t                     lang;
    ngx_http_civicgate_change_t   *ch;
    ngx_http_civicgate_status_t   *st;
    ngx_http_civicgate_service_t  *s;

    st = ngx_http_civicgate_status_worker;

    s = ngx_http_civicgate_service_find(name, name_len);

    if (s == NULL || ngx_http_civicgate_sid_cmp(sid, &s->rev) <= 0) {
        if (ngx_http_civicgate_sid_cmp(sid, &st->topic.version) > 0) {
            st->topic.version = *sid;
        }

        return NGX_DECLINED;
    }

    rec = NULL;

    if (record_len) {
        rec = json_loadb((char *) record, record_len, 0, NULL);
        if (!json_is_object(rec)) {
            json_decref(rec);
            return NGX_DECLINED;
        }
    }

    json_decref(s->record);
    s->record = rec;
    s->rev = *sid;

    ngx_http_civicgate_status_invalidate();

    ch = ngx_http_civicgate_topic_push(&st->topic, sid);

    for (lang = 0; lang < NGX_HTTP_CIVICGATE_LANGS; lang++) {
        data = ngx_http_civicgate_service_json(s, lang);
        if (data == NULL) {
            return NGX_ERROR;
        }

        json_object_set_new(data, "overall",
                            json_string(ngx_http_civicgate_overall()));

        if (ngx_http_civicgate_change_text(ch, lang, "service", data, NULL)
            != NGX_OK)
        {
            json_decref(data);
            return NGX_ERROR;
        }

        json_decref(data);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_push_snapshot(void)
{
    ngx_uint_t                    lang;
    ngx_http_civicgate_change_t  *ch;
    ngx_http_civicgate_render_t  *rd;
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;

    ngx_http_civicgate_status_invalidate();

    ch = ngx_http_civicgate_topic_push(&st->topic, &st->topic.version);
    ch->force = 1;

    for (lang = 0; lang < NGX_HTTP_CIVICGATE_LANGS; lang++) {
        rd = ngx_http_civicgate_status_render(lang);

        if (rd == NULL
            || ngx_http_civicgate_change_text(ch, lang, "snapshot", NULL,
                                              &rd->body)
               != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_http_civicgate_service_t *
ngx_http_civicgate_service_find(u_char *name, size_t len)
{
    ngx_uint_t                    i;
    ngx_http_civicgate_status_t  *st;

    st = ngx_http_civicgate_status_worker;

    for (i = 0; i < st->nservices; i++) {
        if (st->services[i].name.len == len
            && ngx_strncmp(st->services[i].name.data, name, len) == 0)
        {
            return &st->services[i];
        }
    }

    return NULL;
}


static void
ngx_http_civicgate_status_invalidate(void)
{
    ngx_uint_t  i;

    for (i = 0; i < NGX_HTTP_CIVICGATE_LANGS; i++) {
        ngx_http_civicgate_status_worker->render[i].valid = 0;
    }
}
