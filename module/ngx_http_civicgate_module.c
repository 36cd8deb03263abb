
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_conf.h"
#include "ngx_http_civicgate_metrics.h"
#include "ngx_http_civicgate_redis_cluster.h"


static ngx_int_t ngx_http_civicgate_service_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_init_process(ngx_cycle_t *cycle);
static void ngx_http_civicgate_exit_process(ngx_cycle_t *cycle);
static ngx_int_t ngx_http_civicgate_subscriber(ngx_cycle_t *cycle,
    ngx_http_civicgate_main_conf_t *cgmcf);
static void *ngx_http_civicgate_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_civicgate_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);


static ngx_command_t  ngx_http_civicgate_commands[] = {

    { ngx_string("civicgate_secret_file"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE12,
      ngx_http_civicgate_secret_file,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_signing_key"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE12,
      ngx_http_civicgate_signing_key,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_jwks"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_civicgate_jwks,
      NGX_HTTP_LOC_CONF_OFFSET,
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

    { ngx_string("civicgate_admin"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_civicgate_admin,
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
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_variable_t  ngx_http_civicgate_vars[] = {

    { ngx_string("civicgate_service"), NULL,
      ngx_http_civicgate_service_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_int_t
ngx_http_civicgate_service_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_civicgate_loc_conf_t  *cglcf;

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_module);

    ngx_http_civicgate_variable_set(v, cglcf->service.data,
                                    cglcf->service.len);
    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_preconfiguration(ngx_conf_t *cf)
{
    return ngx_http_civicgate_add_variables(cf, ngx_http_civicgate_vars);
}


static ngx_int_t
ngx_http_civicgate_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    return ngx_http_civicgate_metrics_init_conf(cf, cgmcf);
}


/* per worker: the Redis connection and the spool writer */

static ngx_int_t
ngx_http_civicgate_init_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                       cluster;
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

    cluster = cgmcf->redis->mode == NGX_HTTP_CIVICGATE_REDIS_CLUSTER;

    cgmcf->client = cluster
                    ? ngx_http_civicgate_cluster_create(cycle, cgmcf->redis)
                    : ngx_http_civicgate_redis_create(cycle, cgmcf->redis);
    if (cgmcf->client == NULL) {
        return NGX_ERROR;
    }

    cgmcf->client->on_ready = ngx_http_civicgate_client_ready;
    cgmcf->client->data = cgmcf;
    cgmcf->client->metrics = cgmcf->metrics;
    cgmcf->client->role = NGX_HTTP_CIVICGATE_REDIS_COMMAND;

    if (cluster) {
        ngx_http_civicgate_cluster_start(cgmcf->client);

    } else {
        ngx_http_civicgate_redis_start(cgmcf->client);
    }

    return ngx_http_civicgate_subscriber(cycle, cgmcf);
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

    /* a cluster forwards every publication to every node: a seed will do */
    rc = ngx_http_civicgate_redis_create(cycle, cgmcf->redis->seeds
                                                ? cgmcf->redis->seeds
                                                : cgmcf->redis);
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
        if (cgmcf->client->cluster) {
            ngx_http_civicgate_cluster_destroy(cgmcf->client);

        } else {
            ngx_http_civicgate_redis_destroy(cgmcf->client);
        }

        cgmcf->client = NULL;

        if (cgmcf->subscriber) {
            ngx_http_civicgate_redis_destroy(cgmcf->subscriber);
            cgmcf->subscriber = NULL;
        }
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
     *     cgmcf->signing = NULL;
     *     cgmcf->channels = NULL;
     *     cgmcf->nchannels = 0;
     *     cgmcf->redis = NULL;
     *     cgmcf->client = NULL;
     */

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
           != NGX_OK)
    {
        return NULL;
    }

    cgmcf->slots = ngx_pcalloc(cf->pool, ngx_http_max_module);
    if (cgmcf->slots == NULL) {
        return NULL;
    }

    cgmcf->metrics = ngx_http_civicgate_metrics_create(cf);
    if (cgmcf->metrics == NULL) {
        return NULL;
    }

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

    if (cgmcf->jwks_file != NULL && cgmcf->signing == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"civicgate_jwks\" requires \"civicgate_signing_key\" "
                      "in %s:%ui", cgmcf->jwks_file, cgmcf->jwks_line);
        return NGX_CONF_ERROR;
    }

    if (cgmcf->signing != NULL
        && ngx_http_civicgate_keyset_init(cf, cgmcf->signing) != NGX_OK)
    {
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
     */

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

    return NGX_CONF_OK;
}
