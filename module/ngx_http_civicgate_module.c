
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_module.h"
#include "ngx_http_civicgate_conf.h"
#include "ngx_http_civicgate_journey.h"
#include "ngx_http_civicgate_metrics.h"
#include "ngx_http_civicgate_events.h"
#include "ngx_http_civicgate_limit.h"
#include "ngx_http_civicgate_consent.h"
#include "ngx_http_civicgate_status.h"
#include "ngx_http_civicgate_health.h"


static ngx_int_t ngx_http_civicgate_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_log_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_ctx_inherit(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx);
static void ngx_http_civicgate_ctx_cleanup(void *data);
static ngx_int_t ngx_http_civicgate_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_init_process(ngx_cycle_t *cycle);
static void ngx_http_civicgate_exit_process(ngx_cycle_t *cycle);
static void ngx_http_civicgate_exit_master(ngx_cycle_t *cycle);
static void ngx_http_civicgate_client_ready(ngx_http_civicgate_redis_t *rc);
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

    { ngx_string("civicgate_channel"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_loc_conf_t, channel),
      NULL },

    { ngx_string("civicgate_citizen"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_civicgate_citizen,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_loc_conf_t, citizen),
      NULL },

    { ngx_string("civicgate_citizen_challenge"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_loc_conf_t, citizen_challenge),
      NULL },

    { ngx_string("civicgate_journey"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_civicgate_journey,
      NGX_HTTP_LOC_CONF_OFFSET,
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

    { ngx_string("civicgate_consent_purposes"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_BLOCK|NGX_CONF_NOARGS,
      ngx_http_civicgate_consent_purposes,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_consent"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_civicgate_consent,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_consent_cache"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_civicgate_consent_cache,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_consent_grant_url"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_civicgate_main_conf_t, consent_grant_url),
      NULL },

    { ngx_string("civicgate_consent_api"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_civicgate_consent_api,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
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

    { ngx_string("civicgate_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_civicgate_metrics,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_health"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS|NGX_CONF_TAKE1,
      ngx_http_civicgate_health,
      NGX_HTTP_LOC_CONF_OFFSET,
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


static ngx_http_civicgate_journey_conf_t  ngx_http_civicgate_journey_off;

static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


static ngx_int_t
ngx_http_civicgate_header_filter(ngx_http_request_t *r)
{
    ngx_http_civicgate_ctx_t  *ctx;

    if (ngx_http_civicgate_journey_headers(r) != NGX_OK) {
        return NGX_ERROR;
    }

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
    ngx_msec_int_t                   ms;
    ngx_time_t                      *tp;
    ngx_uint_t                       status, service, channel;
    ngx_http_civicgate_ctx_t        *ctx;
    ngx_http_civicgate_metrics_t    *m;
    ngx_http_civicgate_loc_conf_t   *cglcf;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    if (r != r->main) {
        return NGX_OK;
    }

    ctx = ngx_http_civicgate_get_ctx(r);
    if (ctx == NULL || ngx_http_civicgate_channel_resolve(r, ctx) != NGX_OK) {
        return NGX_OK;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_module);
    m = cgmcf->metrics;

    /* the label sets were laid out at configuration: only an index here */
    channel = ngx_min(ctx->channel, cgmcf->nchannels);
    service = ngx_min(cglcf->service_index, m->nservices);
    status = r->err_status ? r->err_status : r->headers_out.status;

    ngx_http_civicgate_metrics_inc(m, m->requests,
                                   ngx_http_civicgate_metrics_request(m,
                                       channel, service, status));

    tp = ngx_timeofday();
    ms = (ngx_msec_int_t) ((tp->sec - r->start_sec) * 1000
                           + (tp->msec - r->start_msec));

    ngx_http_civicgate_metrics_observe(m, m->duration, service,
                                       (uint64_t) ngx_max(ms, 0) * 1000);

    ngx_http_civicgate_events_log(r, ctx);

    return NGX_OK;
}


/*
 * The ctx is also reachable through a request pool cleanup: internal
 * redirects zero r->ctx, and a journey must not be minted twice.
 * Subrequests share the pool, so the cleanup names its request.
 */

ngx_http_civicgate_ctx_t *
ngx_http_civicgate_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t        *cln;
    ngx_http_civicgate_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_civicgate_module);
    if (ctx != NULL) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_civicgate_ctx_cleanup
            && ((ngx_http_civicgate_ctx_t *) cln->data)->request == r)
        {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_civicgate_module);
            return ctx;
        }
    }

    cln = ngx_pool_cleanup_add(r->pool, sizeof(ngx_http_civicgate_ctx_t));
    if (cln == NULL) {
        return NULL;
    }

    ctx = cln->data;
    ngx_memzero(ctx, sizeof(ngx_http_civicgate_ctx_t));

    if (r != r->main && ngx_http_civicgate_ctx_inherit(r, ctx) != NGX_OK) {
        return NULL;
    }

    ctx->request = r;

    cln->handler = ngx_http_civicgate_ctx_cleanup;
    ngx_http_set_ctx(r, ctx, ngx_http_civicgate_module);

    return ctx;
}


/*
 * A subrequest (auth_request, SSI, mirror) is the same citizen on the same
 * journey, but runs its own checks and waits on its own commands: sharing
 * the parent's would let one overwrite or detach the other's.
 */

static ngx_int_t
ngx_http_civicgate_ctx_inherit(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx)
{
    ngx_http_civicgate_ctx_t  *mctx;

    mctx = ngx_http_civicgate_get_ctx(r->main);

    /* minted once, for the main request, whichever asks first */
    if (mctx == NULL
        || ngx_http_civicgate_journey_resolve(r->main, mctx) != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_memcpy(ctx->journey_id, mctx->journey_id, NGX_HTTP_CIVICGATE_JID_LEN);
    ctx->journey_done = 1;
    ctx->journey_on = mctx->journey_on;
    ctx->journey_new = mctx->journey_new;
    ctx->headers_done = 1;

    ctx->channel = mctx->channel;
    ctx->channel_done = mctx->channel_done;

    if (mctx->citizen_done) {
        ngx_memcpy(ctx->citizen, mctx->citizen,
                   NGX_HTTP_CIVICGATE_PSEUDONYM_LEN);
        ctx->citizen_set = mctx->citizen_set;
        ctx->citizen_done = 1;
    }

    return NGX_OK;
}


/* every way a request ends passes here: detach what still waits on Redis */

static void
ngx_http_civicgate_ctx_cleanup(void *data)
{
    ngx_http_civicgate_ctx_t  *ctx = data;

    if (ctx->cmd != NULL) {
        ngx_http_civicgate_redis_detach(ctx->cmd);
        ctx->cmd = NULL;
    }
}


/* a request parked on Redis notices its client going away */

void
ngx_http_civicgate_wait(ngx_http_request_t *r)
{
    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_request_empty_handler;
}


/*
 * A phase handler's check: started once; while its command is out the
 * phase waits; the verdict comes once the reply (or the failure) is in.
 */

ngx_int_t
ngx_http_civicgate_step(ngx_http_request_t *r, ngx_http_civicgate_step_t *step,
    ngx_http_civicgate_step_pt start, ngx_http_civicgate_step_pt verdict,
    void *data)
{
    ngx_int_t  rc;

    if (step->done) {
        return NGX_DECLINED;
    }

    if (step->waiting) {
        return NGX_AGAIN;
    }

    if (!step->replied) {
        rc = start(r, data);

        if (rc != NGX_OK) {
            return rc;
        }
    }

    return verdict(r, data);
}


/*
 * The request a reply is for, no longer waiting on the command; NULL when
 * the worker is exiting and failing what is left: the request goes with it.
 */

ngx_http_request_t *
ngx_http_civicgate_answered(ngx_http_civicgate_redis_cmd_t *cmd,
    ngx_http_civicgate_ctx_t **ctx)
{
    ngx_http_request_t  *r;

    if (cmd->redis->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED) {
        return NULL;
    }

    r = cmd->data;

    *ctx = ngx_http_civicgate_get_ctx(r);
    (*ctx)->cmd = NULL;

    return r;
}


/* from a Redis reply handler: run the request on, as upstream does */

void
ngx_http_civicgate_resume(ngx_http_request_t *r)
{
    ngx_connection_t  *c;

    c = r->connection;

    ngx_http_set_log_request(c->log, r);

    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);

    ngx_http_run_posted_requests(c);
}


/* a phase handler that sent its own response stops the phases */

ngx_int_t
ngx_http_civicgate_finalize(ngx_http_request_t *r, ngx_int_t rc)
{
    ngx_http_finalize_request(r, rc);
    return NGX_DONE;
}


static ngx_int_t
ngx_http_civicgate_preconfiguration(ngx_conf_t *cf)
{
    return ngx_http_civicgate_add_variables(cf);
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
        || ngx_http_civicgate_consent_init_conf(cf, cgmcf) != NGX_OK
        || ngx_http_civicgate_status_init_conf(cf, cgmcf) != NGX_OK
        || ngx_http_civicgate_metrics_zone(cf, cgmcf->metrics) != NGX_OK)
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

    if (cgmcf->consent->used) {
        h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        *h = ngx_http_civicgate_consent_handler;
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

    if (ngx_http_civicgate_health_init_worker(cycle, cgmcf) != NGX_OK) {
        return NGX_ERROR;
    }

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


static void
ngx_http_civicgate_client_ready(ngx_http_civicgate_redis_t *rc)
{
    ngx_http_civicgate_events_ready(rc);
    ngx_http_civicgate_status_ready(rc);
}


/*
 * One subscriber connection per worker carries every subscription:
 * consent invalidations, status changes, followed journeys.
 */

static ngx_int_t
ngx_http_civicgate_subscriber(ngx_cycle_t *cycle,
    ngx_http_civicgate_main_conf_t *cgmcf)
{
    ngx_str_t                   *ch;
    ngx_http_civicgate_redis_t  *rc;

    ch = ngx_pcalloc(cycle->pool, 2 * sizeof(ngx_str_t));
    if (ch == NULL) {
        return NGX_ERROR;
    }

    rc = ngx_http_civicgate_redis_create(cycle, cgmcf->redis);
    if (rc == NULL) {
        return NGX_ERROR;
    }

    rc->channels = ch;

    if (cgmcf->consent->used && cgmcf->consent->cache != NULL) {
        ngx_str_set(&ch[rc->nchannels], NGX_HTTP_CIVICGATE_CONSENT_CHANNEL);
        rc->nchannels++;
    }

    if (cgmcf->status->used) {
        ngx_str_set(&ch[rc->nchannels], NGX_HTTP_CIVICGATE_STATUS_CHANNEL);
        rc->nchannels++;
        rc->on_ready = ngx_http_civicgate_status_subscriber_ready;
    }

    if (rc->nchannels == 0) {
        ngx_http_civicgate_redis_destroy(rc);
        return NGX_OK;
    }

    rc->on_message = ngx_http_civicgate_pubsub_message;
    rc->data = cgmcf;
    rc->metrics = cgmcf->metrics;
    rc->role = NGX_HTTP_CIVICGATE_REDIS_SUBSCRIBER;

    cgmcf->subscriber = rc;

    ngx_http_civicgate_redis_start(rc);

    return NGX_OK;
}


void
ngx_http_civicgate_pubsub_message(ngx_http_civicgate_redis_t *rc,
    redisReply *reply)
{
    redisReply  *channel;

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 3
        || reply->element[0]->type != REDIS_REPLY_STRING
        || reply->element[1]->type != REDIS_REPLY_STRING)
    {
        return;
    }

    channel = reply->element[1];

    if (channel->len == sizeof(NGX_HTTP_CIVICGATE_CONSENT_CHANNEL) - 1
        && ngx_strncmp(channel->str, NGX_HTTP_CIVICGATE_CONSENT_CHANNEL,
                       channel->len) == 0)
    {
        ngx_http_civicgate_consent_message(rc, reply);
        return;
    }

    ngx_http_civicgate_status_message(rc, reply);
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

    cgmcf->consent = ngx_pcalloc(cf->pool,
                                 sizeof(ngx_http_civicgate_consent_conf_t));
    if (cgmcf->consent == NULL
        || ngx_array_init(&cgmcf->consent->purposes, cf->pool, 8,
                          sizeof(ngx_http_civicgate_purpose_t))
           != NGX_OK)
    {
        return NULL;
    }

    cgmcf->consent->ttl = NGX_CONF_UNSET_MSEC;
    cgmcf->consent->negative_ttl = NGX_CONF_UNSET_MSEC;

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
     *     cglcf->citizen_challenge = { 0, NULL };
     *     cglcf->limits = NULL;
     */

    cglcf->channel = NGX_CONF_UNSET_PTR;
    cglcf->citizen = NGX_CONF_UNSET_PTR;
    cglcf->journey = NGX_CONF_UNSET_PTR;
    cglcf->events = NGX_CONF_UNSET;
    cglcf->limit_dry_run = NGX_CONF_UNSET;
    cglcf->limit_status = NGX_CONF_UNSET_UINT;
    cglcf->limit_log_level = NGX_CONF_UNSET_UINT;
    cglcf->limit_headers = NGX_CONF_UNSET;
    cglcf->consent_names = NGX_CONF_UNSET_PTR;
    cglcf->consent_on_error = NGX_CONF_UNSET_UINT;
    cglcf->status_language = NGX_CONF_UNSET_UINT;
    cglcf->status_max_wait = NGX_CONF_UNSET_MSEC;
    cglcf->status_heartbeat = NGX_CONF_UNSET_MSEC;
    cglcf->service_index = NGX_CONF_UNSET_UINT;
    cglcf->health_interval = NGX_CONF_UNSET_MSEC;

    return cglcf;
}


static char *
ngx_http_civicgate_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_civicgate_loc_conf_t *prev = parent;
    ngx_http_civicgate_loc_conf_t *conf = child;

    ngx_conf_merge_ptr_value(conf->channel, prev->channel, NULL);
    ngx_conf_merge_ptr_value(conf->citizen, prev->citizen, NULL);
    ngx_conf_merge_str_value(conf->citizen_challenge, prev->citizen_challenge,
                             "Bearer realm=\"civicgate\"");
    ngx_conf_merge_ptr_value(conf->journey, prev->journey,
                             &ngx_http_civicgate_journey_off);
    ngx_conf_merge_uint_value(conf->service_index, prev->service_index,
                              NGX_CONF_UNSET_UINT);
    ngx_conf_merge_str_value(conf->service, prev->service, "");
    ngx_conf_merge_msec_value(conf->health_interval, prev->health_interval,
                              1000);
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

    if (ngx_http_civicgate_limit_merge(cf, prev, conf) != NGX_CONF_OK
        || ngx_http_civicgate_consent_merge(cf, prev, conf) != NGX_CONF_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}
