
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_metrics.h"
#include "ngx_http_civicgate_journey.h"
#include "ngx_http_civicgate_events.h"


/*
 * The metrics concern: the endpoint, and each main request counted by
 * channel, service and status class when it is logged.  Last in the
 * module list: the series of every other concern are known by its
 * postconfiguration, which lays out the shared zone.
 */


static char *ngx_http_civicgate_metrics(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_civicgate_metrics_log(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_metrics_postconfiguration(
    ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_metrics_spool(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m);
static ngx_uint_t ngx_http_civicgate_metrics_spool_events(void);
static ngx_uint_t ngx_http_civicgate_metrics_spool_capacity(void);
static void ngx_http_civicgate_metrics_exit_process(ngx_cycle_t *cycle);


static ngx_command_t  ngx_http_civicgate_metrics_commands[] = {

    { ngx_string("civicgate_metrics"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_civicgate_metrics,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_civicgate_metrics_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_civicgate_metrics_postconfiguration, /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    NULL,                                  /* create location configuration */
    NULL                                   /* merge location configuration */
};


ngx_module_t  ngx_http_civicgate_metrics_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_metrics_module_ctx, /* module context */
    ngx_http_civicgate_metrics_commands,   /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_civicgate_metrics_exit_process, /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static char *
ngx_http_civicgate_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_civicgate_metrics_handler;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_civicgate_metrics_log(ngx_http_request_t *r)
{
    ngx_msec_int_t                   ms;
    ngx_time_t                      *tp;
    ngx_uint_t                       status, service, channel;
    ngx_http_civicgate_journey_t    *j;
    ngx_http_civicgate_metrics_t    *m;
    ngx_http_civicgate_loc_conf_t   *cglcf;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    if (r != r->main) {
        return NGX_OK;
    }

    j = ngx_http_civicgate_journey_channel(r);
    if (j == NULL) {
        return NGX_OK;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_module);
    m = cgmcf->metrics;

    /* the label sets were laid out at configuration: only an index here */
    channel = ngx_min(j->channel, cgmcf->nchannels);
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

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_metrics_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_handler_pt             *h;
    ngx_http_core_main_conf_t       *cmcf;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_civicgate_metrics_log;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    if (ngx_http_civicgate_metrics_spool(cf, cgmcf->metrics) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_civicgate_metrics_zone(cf, cgmcf->metrics);
}


/* the event spool's fill, read from the events concern at each scrape */

static ngx_int_t
ngx_http_civicgate_metrics_spool(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m)
{
    if (ngx_http_civicgate_metrics_sampled(cf, m,
            "civicgate_event_spool_events",
            "Journey events waiting in the shared-memory spool.",
            ngx_http_civicgate_metrics_spool_events)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_civicgate_metrics_sampled(cf, m,
               "civicgate_event_spool_capacity",
               "Slots of the shared-memory spool of journey events.",
               ngx_http_civicgate_metrics_spool_capacity);
}


static ngx_uint_t
ngx_http_civicgate_metrics_spool_events(void)
{
    ngx_uint_t  capacity;

    return ngx_http_civicgate_events_spool_usage(&capacity);
}


static ngx_uint_t
ngx_http_civicgate_metrics_spool_capacity(void)
{
    ngx_uint_t  capacity;

    (void) ngx_http_civicgate_events_spool_usage(&capacity);

    return capacity;
}


/* last of the modules: what this worker still holds leaves the gauges */

static void
ngx_http_civicgate_metrics_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                                ngx_http_civicgate_module);
    if (cgmcf != NULL) {
        ngx_http_civicgate_metrics_exit_worker(cgmcf->metrics);
    }
}
