
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_conf.h"
#include "ngx_http_civicgate_journey.h"
#include "ngx_http_civicgate_metrics.h"
#include "ngx_http_civicgate_events.h"
#include "ngx_http_civicgate_limit.h"
#include "ngx_http_civicgate_consent.h"
#include "ngx_http_civicgate_status.h"


static ngx_int_t ngx_http_civicgate_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_log_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_init_process(ngx_cycle_t *cycle);
static void ngx_http_civicgate_exit_process(ngx_cycle_t *cycle);
static void ngx_http_civicgate_exit_master(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_civicgate_subscriber(ngx_cycle_t *cycle,
    ngx_http_civicgate_main_conf_t *cgmcf);
static void *ngx_http_civicgate_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_civicgate_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);


static ngx_conf_enum_t  ngx_http_civicgate_log_levels[] = {
    { ngx_string("info"), NGX_LOG_INFO },
    { ngx_string("notice"), NGX_LOG_NOTICE },
    { ngx_string("warn"), NGX_LOG_WARN },
    { ngx_string("error"), NGX_LOG_ERR },
    { ngx_null_string, 0 }
};


static ngx_conf_num_bounds_t  ngx_http_civicgate_status_bounds = {
    ngx_conf_check_num_bounds, 400, 599
};


static ngx_conf_num_bounds_t  ngx_http_civicgate_drain_inflight_bounds = {
    ngx_conf_check_num_bounds, 1, NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT_MAX
};


static ngx_command_t  ngx_http_civicgate_commands[] = {

    { ngx_string("civicgate_secret_file"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE12,
      ngx_http_civicgate_secret_file,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_channels"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_civicgate_channels,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_service"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_civicgate_service,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_redis"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_civicgate_redis,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_civicgate_main_conf_t, redis),
      NULL },

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
      offsetof(ngx_http_civicgate_main_conf_t, event_stream_maxlen),
      NULL },

    { ngx_string("civicgate_event_drain_inflight"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_civicgate_main_conf_t, event_drain_inflight),
      &ngx_http_civicgate_drain_inflight_bounds },

    { ngx_string("civicgate_events"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_loc_conf_t, events),
      NULL },

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
      offsetof(ngx_http_civicgate_loc_conf_t, limit_dry_run),
      NULL },

    { ngx_string("civicgate_limit_status"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_loc_conf_t, limit_status),
      &ngx_http_civicgate_status_bounds },

    { ngx_string("civicgate_limit_log_level"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_enum_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_loc_conf_t, limit_log_level),
      &ngx_http_civicgate_log_levels },

    { ngx_string("civicgate_limit_headers"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_loc_conf_t, limit_headers),
      NULL },

    { ngx_string("civicgate_admin"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_civicgate_admin,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

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
      offsetof(ngx_http_civicgate_loc_conf_t, status_max_wait),
      NULL },

    { ngx_string("civicgate_status_heartbeat"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_loc_conf_t, status_heartbeat),
      NULL },

    { ngx_string("civicgate_status_history"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_civicgate_status_history,
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


static ngx_http_module_t  ngx_http_civicgate_module_ctx = {
    ngx_http_civicgate_preconfiguration,   /* preconfiguration */
    ngx_http_civicgate_postconfiguration,  /* postconfiguration */

    ngx_http_civicgate_create_main_conf,   /* create main configuration */
    ngx_http_civicgate_init_main_conf,     /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_civicgate_create_loc_conf,    /* create location configuration */
    ngx_http_civicgate_merge_loc_conf      /* merge location configuration */
};


ngx_module_t  ngx_http_civicgate_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_module_ctx,        /* module context */
    ngx_http_civicgate_commands,           /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_civicgate_init_process,       /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_civicgate_exit_process,       /* exit process */
    ngx_http_civicgate_exit_master,        /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


static ngx_int_t
ngx_http_civicgate_header_filter(ngx_http_request_t *r)
{
    ngx_http_civicgate_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_civicgate_module);

    if (ctx != NULL && r == r->main
        && ngx_http_civicgate_limit_headers(r, ctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_civicgate_log_handler(ngx_http_request_t *r)
{
    if (r == r->main) {
        ngx_http_civicgate_events_log(r);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_preconfiguration(ngx_conf_t *cf)
{
    return ngx_http_civicgate_hub_variables(cf);
}


static ngx_int_t
ngx_http_civicgate_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_handler_pt             *h;
    ngx_http_core_main_conf_t       *cmcf;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    if (ngx_http_civicgate_events_init_conf(cf, cgmcf) != NGX_OK
        || ngx_http_civicgate_metrics_init_conf(cf, cgmcf) != NGX_OK
        || ngx_http_civicgate_limit_init_conf(cf, cgmcf) != NGX_OK
        || ngx_http_civicgate_status_init_conf(cf, cgmcf) != NGX_OK)
    {
        return NGX_ERROR;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_civicgate_log_handler;

    if (cgmcf->limit_zones.nelts) {
        h = ngx_array_push(&cmcf->phases[NGX_HTTP_PREACCESS_PHASE].handlers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        *h = ngx_http_civicgate_limit_handler;
    }

    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_civicgate_header_filter;

    return NGX_OK;
}


/* per worker: the Redis connection and the spool writer */

static ngx_int_t
ngx_http_civicgate_init_process(ngx_cycle_t *cycle)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    cgmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                                ngx_http_civicgate_module);
    if (cgmcf == NULL) {
        return NGX_OK;
    }

    /* first: gauges count from here on */
    ngx_http_civicgate_metrics_init_worker(cgmcf->metrics);

    if (cgmcf->redis == NULL) {
        return NGX_OK;
    }

    cgmcf->client = ngx_http_civicgate_redis_create(cycle, cgmcf->redis);
    if (cgmcf->client == NULL) {
        return NGX_ERROR;
    }

    cgmcf->client->on_ready = ngx_http_civicgate_client_ready;
    cgmcf->client->data = cgmcf;
    cgmcf->client->metrics = cgmcf->metrics;
    cgmcf->client->role = NGX_HTTP_CIVICGATE_REDIS_COMMAND;

    ngx_http_civicgate_redis_start(cgmcf->client);

    if (ngx_http_civicgate_status_init_worker(cycle, cgmcf) != NGX_OK
        || ngx_http_civicgate_subscriber(cycle, cgmcf) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_civicgate_events_init_worker(cycle, cgmcf);
}


/*
 * One subscriber connection per worker carries every subscription:
 * consent invalidations, status changes, followed journeys.
 */

static ngx_int_t
ngx_http_civicgate_subscriber(ngx_cycle_t *cycle,
    ngx_http_civicgate_main_conf_t *cgmcf)
{
    ngx_str_t                          *ch;
    ngx_uint_t                          i;
    ngx_http_civicgate_redis_t         *rc;
    ngx_http_civicgate_subscription_t  *s;

    s = cgmcf->subscriptions.elts;

    ch = ngx_pcalloc(cycle->pool,
                     (cgmcf->subscriptions.nelts + 1) * sizeof(ngx_str_t));
    if (ch == NULL) {
        return NGX_ERROR;
    }

    rc = ngx_http_civicgate_redis_create(cycle, cgmcf->redis);
    if (rc == NULL) {
        return NGX_ERROR;
    }

    rc->channels = ch;

    for (i = 0; i < cgmcf->subscriptions.nelts; i++) {
        if (s[i].channel.len) {
            ch[rc->nchannels++] = s[i].channel;
        }
    }

    if (rc->nchannels == 0) {
        ngx_http_civicgate_redis_destroy(rc);
        return NGX_OK;
    }

    rc->on_ready = ngx_http_civicgate_subscriber_ready;
    rc->on_message = ngx_http_civicgate_pubsub_message;
    rc->data = cgmcf;
    rc->metrics = cgmcf->metrics;
    rc->role = NGX_HTTP_CIVICGATE_REDIS_SUBSCRIBER;

    cgmcf->subscriber = rc;

    ngx_http_civicgate_redis_start(rc);

    return NGX_OK;
}


static void
ngx_http_civicgate_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                                ngx_http_civicgate_module);
    if (cgmcf == NULL) {
        return;
    }

    if (cgmcf->client != NULL) {
        /* commands in flight fail now: their events go back to the spool */
        ngx_http_civicgate_redis_destroy(cgmcf->client);
        cgmcf->client = NULL;

        if (cgmcf->subscriber) {
            ngx_http_civicgate_redis_destroy(cgmcf->subscriber);
            cgmcf->subscriber = NULL;
        }

        ngx_http_civicgate_events_exit_worker(cgmcf);
    }

    ngx_http_civicgate_status_exit_worker();

    /* last: what this worker still holds leaves the gauges */
    ngx_http_civicgate_metrics_exit_worker(cgmcf->metrics);
}


/* also after a single process: the spool is lost with the zone */

static void
ngx_http_civicgate_exit_master(ngx_cycle_t *cycle)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                                ngx_http_civicgate_module);
    if (cgmcf != NULL) {
        ngx_http_civicgate_events_exit_master(cgmcf);
    }
}


static void *
ngx_http_civicgate_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_main_conf_t));
    if (cgmcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     cgmcf->keyring = NULL;
     *     cgmcf->secret_file = { 0, NULL };
     *     cgmcf->channels = NULL;
     *     cgmcf->nchannels = 0;
     *     cgmcf->redis = NULL;
     *     cgmcf->client = NULL;
     *     cgmcf->events = NULL;
     */

    cgmcf->event_buffer = NGX_CONF_UNSET_SIZE;
    cgmcf->event_stream_maxlen = NGX_CONF_UNSET_UINT;
    cgmcf->event_drain_inflight = NGX_CONF_UNSET_UINT;

    if (ngx_array_init(&cgmcf->services, cf->pool, 8, sizeof(ngx_str_t))
        != NGX_OK
        || ngx_array_init(&cgmcf->ready, cf->pool, 4,
                          sizeof(ngx_http_civicgate_redis_ready_pt))
           != NGX_OK
        || ngx_array_init(&cgmcf->subscriptions, cf->pool, 4,
                          sizeof(ngx_http_civicgate_subscription_t))
           != NGX_OK
        || ngx_array_init(&cgmcf->admin_routes, cf->pool, 4,
                          sizeof(ngx_http_civicgate_admin_route_t))
           != NGX_OK
        || ngx_array_init(&cgmcf->limit_zones, cf->pool, 4,
                          sizeof(ngx_http_civicgate_limit_zone_t *))
           != NGX_OK)
    {
        return NULL;
    }

    cgmcf->metrics = ngx_http_civicgate_metrics_create(cf);
    if (cgmcf->metrics == NULL) {
        return NULL;
    }

    cgmcf->status = ngx_pcalloc(cf->pool,
                                sizeof(ngx_http_civicgate_status_conf_t));
    if (cgmcf->status == NULL) {
        return NULL;
    }

    cgmcf->status->history = NGX_CONF_UNSET_UINT;
    cgmcf->status->max_clients = NGX_CONF_UNSET_UINT;

    return cgmcf;
}


static char *
ngx_http_civicgate_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_civicgate_main_conf_t *cgmcf = conf;

    if (cgmcf->channels == NULL
        && ngx_http_civicgate_default_channels(cf, cgmcf) != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (cgmcf->keyring == NULL && cgmcf->needs_keys != NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"%s\" requires \"civicgate_secret_file\" in %s:%ui",
                      cgmcf->needs_keys, cgmcf->needs_keys_file,
                      cgmcf->needs_keys_line);
        return NGX_CONF_ERROR;
    }

    if (cgmcf->admin_file != NULL && cgmcf->redis == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"civicgate_admin\" requires \"civicgate_redis\" in "
                      "%s:%ui", cgmcf->admin_file, cgmcf->admin_line);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_civicgate_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_loc_conf_t  *cglcf;

    cglcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_loc_conf_t));
    if (cglcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     cglcf->service = { 0, NULL };
     *     cglcf->limits = NULL;
     */

    cglcf->events = NGX_CONF_UNSET;
    cglcf->limit_dry_run = NGX_CONF_UNSET;
    cglcf->limit_status = NGX_CONF_UNSET_UINT;
    cglcf->limit_log_level = NGX_CONF_UNSET_UINT;
    cglcf->limit_headers = NGX_CONF_UNSET;
    cglcf->status_language = NGX_CONF_UNSET_UINT;
    cglcf->status_max_wait = NGX_CONF_UNSET_MSEC;
    cglcf->status_heartbeat = NGX_CONF_UNSET_MSEC;
    cglcf->service_index = NGX_CONF_UNSET_UINT;

    return cglcf;
}


static char *
ngx_http_civicgate_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_civicgate_loc_conf_t *prev = parent;
    ngx_http_civicgate_loc_conf_t *conf = child;

    ngx_conf_merge_uint_value(conf->service_index, prev->service_index,
                              NGX_CONF_UNSET_UINT);
    ngx_conf_merge_str_value(conf->service, prev->service, "");
    ngx_conf_merge_value(conf->events, prev->events, 1);
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

    if (ngx_http_civicgate_limit_merge(cf, prev, conf) != NGX_CONF_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}
