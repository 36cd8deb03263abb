
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_metrics.h"
#include "ngx_http_civicgate_events.h"


/* answers, indexes in ngx_http_civicgate_health_answers */
#define NGX_HTTP_CIVICGATE_HEALTH_OK           0
#define NGX_HTTP_CIVICGATE_HEALTH_REDIS        1
#define NGX_HTTP_CIVICGATE_HEALTH_SPOOL        2
#define NGX_HTTP_CIVICGATE_HEALTH_MAINTENANCE  3
#define NGX_HTTP_CIVICGATE_HEALTH_WAIT         4


/* per worker: Redis's last answer, and the requests awaiting the next */
typedef struct {
    ngx_http_civicgate_main_conf_t  *core;
    ngx_queue_t                      waiting;  /* of health waiters */
    ngx_http_civicgate_redis_cmd_t  *ping;     /* in flight, or NULL */
    ngx_msec_t                       checked;  /* when the answer came */
    unsigned                         known:1;
    unsigned                         redis_ok:1;
} ngx_http_civicgate_health_main_conf_t;


typedef struct {
    ngx_msec_t                       interval;
} ngx_http_civicgate_health_loc_conf_t;


/* a request parked until the PING in flight is answered */
typedef struct {
    ngx_queue_t                      queue;
    ngx_http_request_t              *r;       /* NULL: not waiting */
} ngx_http_civicgate_health_waiter_t;


static char *ngx_http_civicgate_health(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_civicgate_health_handler(ngx_http_request_t *r);
static ngx_uint_t ngx_http_civicgate_health_local(
    ngx_http_civicgate_health_main_conf_t *hmcf);
static ngx_uint_t ngx_http_civicgate_health_redis(ngx_http_request_t *r,
    ngx_http_civicgate_health_main_conf_t *hmcf);
static void ngx_http_civicgate_health_pong(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply);
static void ngx_http_civicgate_health_wake(
    ngx_http_civicgate_health_main_conf_t *hmcf);
static void ngx_http_civicgate_health_cleanup(void *data);
static ngx_int_t ngx_http_civicgate_health_send(ngx_http_request_t *r,
    ngx_uint_t answer);
static ngx_int_t ngx_http_civicgate_maintenance(ngx_http_request_t *r,
    ngx_str_t *rest);
static ngx_int_t ngx_http_civicgate_health_postconfiguration(ngx_conf_t *cf);
static void *ngx_http_civicgate_health_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_civicgate_health_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_health_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_int_t ngx_http_civicgate_health_init_process(ngx_cycle_t *cycle);


static ngx_command_t  ngx_http_civicgate_health_commands[] = {

    { ngx_string("civicgate_health"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS|NGX_CONF_TAKE1,
      ngx_http_civicgate_health,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_civicgate_health_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_civicgate_health_postconfiguration, /* postconfiguration */

    ngx_http_civicgate_health_create_main_conf, /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_civicgate_health_create_loc_conf, /* create location conf */
    ngx_http_civicgate_health_merge_loc_conf   /* merge location conf */
};


ngx_module_t  ngx_http_civicgate_health_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_health_module_ctx, /* module context */
    ngx_http_civicgate_health_commands,    /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_civicgate_health_init_process, /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_str_t  ngx_http_civicgate_health_answers[] = {
    ngx_string("{\"status\":\"ok\"}\n"),
    ngx_string("{\"status\":\"unavailable\",\"reason\":\"redis\"}\n"),
    ngx_string("{\"status\":\"unavailable\",\"reason\":\"spool\"}\n"),
    ngx_string("{\"status\":\"maintenance\"}\n")
};

static ngx_str_t  ngx_http_civicgate_maintenance_answers[] = {
    ngx_string("{\"maintenance\":false}\n"),
    ngx_string("{\"maintenance\":true}\n")
};

static ngx_str_t  ngx_http_civicgate_health_type =
    ngx_string("application/json");


/* civicgate_health [interval=time]; */

static char *
ngx_http_civicgate_health(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_health_loc_conf_t *hlcf = conf;

    ngx_str_t                 *value, s;
    ngx_int_t                  n;
    ngx_http_core_loc_conf_t  *clcf;

    if (hlcf->interval != NGX_CONF_UNSET_MSEC) {
        return "is duplicate";
    }

    value = cf->args->elts;
    hlcf->interval = 1000;

    if (cf->args->nelts == 2) {
        if (ngx_strncmp(value[1].data, "interval=", 9) != 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }

        s.data = value[1].data + 9;
        s.len = value[1].len - 9;

        n = ngx_parse_time(&s, 0);
        if (n == NGX_ERROR || n == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid interval \"%V\"", &value[1]);
            return NGX_CONF_ERROR;
        }

        hlcf->interval = n;
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_civicgate_health_handler;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_civicgate_health_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_civicgate_health_main_conf_t  *hmcf;

    hmcf = ngx_http_conf_get_module_main_conf(cf,
                                            ngx_http_civicgate_health_module);
    hmcf->core = ngx_http_conf_get_module_main_conf(cf,
                                                    ngx_http_civicgate_module);

    return ngx_http_civicgate_admin_route(cf, "maintenance",
                                          ngx_http_civicgate_maintenance);
}


static void *
ngx_http_civicgate_health_create_main_conf(ngx_conf_t *cf)
{
    return ngx_pcalloc(cf->pool,
                       sizeof(ngx_http_civicgate_health_main_conf_t));
}


static void *
ngx_http_civicgate_health_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_health_loc_conf_t  *hlcf;

    hlcf = ngx_palloc(cf->pool, sizeof(ngx_http_civicgate_health_loc_conf_t));
    if (hlcf == NULL) {
        return NULL;
    }

    hlcf->interval = NGX_CONF_UNSET_MSEC;

    return hlcf;
}


static char *
ngx_http_civicgate_health_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_civicgate_health_loc_conf_t *prev = parent;
    ngx_http_civicgate_health_loc_conf_t *conf = child;

    ngx_conf_merge_msec_value(conf->interval, prev->interval, 1000);

    return NGX_CONF_OK;
}


/* per worker: nothing known of Redis yet, nobody waiting */

static ngx_int_t
ngx_http_civicgate_health_init_process(ngx_cycle_t *cycle)
{
    ngx_http_civicgate_health_main_conf_t  *hmcf;

    hmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                            ngx_http_civicgate_health_module);
    if (hmcf == NULL) {
        return NGX_OK;
    }

    hmcf->ping = NULL;
    hmcf->known = 0;
    hmcf->redis_ok = 0;
    hmcf->checked = 0;
    ngx_queue_init(&hmcf->waiting);

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_health_handler(ngx_http_request_t *r)
{
    ngx_int_t                               rc;
    ngx_uint_t                              answer;
    ngx_http_cleanup_t                     *cln;
    ngx_http_civicgate_health_waiter_t     *w;
    ngx_http_civicgate_health_main_conf_t  *hmcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    hmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_health_module);

    answer = ngx_http_civicgate_health_local(hmcf);

    if (answer == NGX_HTTP_CIVICGATE_HEALTH_OK && hmcf->core->redis != NULL) {
        answer = ngx_http_civicgate_health_redis(r, hmcf);
    }

    if (answer != NGX_HTTP_CIVICGATE_HEALTH_WAIT) {
        return ngx_http_civicgate_health_send(r, answer);
    }

    cln = ngx_http_cleanup_add(r, sizeof(ngx_http_civicgate_health_waiter_t));
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    w = cln->data;
    w->r = r;
    cln->handler = ngx_http_civicgate_health_cleanup;

    ngx_queue_insert_tail(&hmcf->waiting, &w->queue);

    ngx_http_civicgate_wait(r);

    /* balanced by the finalization once Redis answered */
    r->main->count++;

    return NGX_DONE;
}


/* what needs no round trip: the maintenance flag, the spool, the state */

static ngx_uint_t
ngx_http_civicgate_health_local(ngx_http_civicgate_health_main_conf_t *hmcf)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = hmcf->core;

    if (ngx_http_civicgate_metrics_maintenance(cgmcf->metrics, -1)) {
        return NGX_HTTP_CIVICGATE_HEALTH_MAINTENANCE;
    }

    if (cgmcf->redis == NULL) {
        return NGX_HTTP_CIVICGATE_HEALTH_OK;
    }

    if (ngx_http_civicgate_events_spool_high()) {
        return NGX_HTTP_CIVICGATE_HEALTH_SPOOL;
    }

    if (cgmcf->client == NULL
        || (cgmcf->subscriber != NULL
            && !ngx_http_civicgate_redis_ready(cgmcf->subscriber)))
    {
        return NGX_HTTP_CIVICGATE_HEALTH_REDIS;
    }

    return NGX_HTTP_CIVICGATE_HEALTH_OK;
}


/*
 * Redis's answer of the last interval, else a PING: one per worker at a
 * time, however many health checks wait for it.
 */

static ngx_uint_t
ngx_http_civicgate_health_redis(ngx_http_request_t *r,
    ngx_http_civicgate_health_main_conf_t *hmcf)
{
    size_t                                  len;
    const char                             *argv;
    ngx_http_civicgate_health_main_conf_t  *h;
    ngx_http_civicgate_health_loc_conf_t   *hlcf;

    hlcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_health_module);
    h = hmcf;

    if (h->known && ngx_current_msec - h->checked < hlcf->interval) {
        return h->redis_ok ? NGX_HTTP_CIVICGATE_HEALTH_OK
                           : NGX_HTTP_CIVICGATE_HEALTH_REDIS;
    }

    if (h->ping != NULL) {
        return NGX_HTTP_CIVICGATE_HEALTH_WAIT;
    }

    argv = "PING";
    len = 4;

    h->ping = ngx_http_civicgate_redis_send(hmcf->core->client, 1, &argv,
                                            &len,
                                            ngx_http_civicgate_health_pong,
                                            hmcf);
    if (h->ping != NULL) {
        return NGX_HTTP_CIVICGATE_HEALTH_WAIT;
    }

    /* not connected (waiting to reconnect): that is the answer */
    h->known = 1;
    h->redis_ok = 0;
    h->checked = ngx_current_msec;

    return NGX_HTTP_CIVICGATE_HEALTH_REDIS;
}


static void
ngx_http_civicgate_health_pong(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_http_civicgate_health_main_conf_t  *h = cmd->data;

    h->ping = NULL;

    /* the worker is exiting: its requests go with it */
    if (cmd->redis->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED) {
        return;
    }

    h->known = 1;
    h->checked = ngx_current_msec;
    h->redis_ok = (reply != NULL && reply->type == REDIS_REPLY_STATUS
                   && reply->len == 4 && ngx_strncmp(reply->str, "PONG", 4)
                                         == 0);

    ngx_http_civicgate_health_wake(h);
}


/* each waiting request gets the answer; one that dies unlinks itself */

static void
ngx_http_civicgate_health_wake(ngx_http_civicgate_health_main_conf_t *h)
{
    ngx_uint_t                           answer;
    ngx_queue_t                         *q;
    ngx_connection_t                    *c;
    ngx_http_request_t                  *r;
    ngx_http_civicgate_health_waiter_t  *w;

    while (!ngx_queue_empty(&h->waiting)) {
        q = ngx_queue_head(&h->waiting);
        ngx_queue_remove(q);

        w = ngx_queue_data(q, ngx_http_civicgate_health_waiter_t, queue);
        r = w->r;
        w->r = NULL;

        answer = ngx_http_civicgate_health_local(h);

        if (answer == NGX_HTTP_CIVICGATE_HEALTH_OK && !h->redis_ok) {
            answer = NGX_HTTP_CIVICGATE_HEALTH_REDIS;
        }

        c = r->connection;
        ngx_http_set_log_request(c->log, r);

        ngx_http_finalize_request(r, ngx_http_civicgate_health_send(r, answer));
        ngx_http_run_posted_requests(c);
    }
}


static void
ngx_http_civicgate_health_cleanup(void *data)
{
    ngx_http_civicgate_health_waiter_t  *w = data;

    if (w->r != NULL) {
        ngx_queue_remove(&w->queue);
        w->r = NULL;
    }
}


static ngx_int_t
ngx_http_civicgate_health_send(ngx_http_request_t *r, ngx_uint_t answer)
{
    ngx_table_elt_t  *h;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, "no-store");

    return ngx_http_civicgate_send(r, answer == NGX_HTTP_CIVICGATE_HEALTH_OK
                                      ? NGX_HTTP_OK
                                      : NGX_HTTP_SERVICE_UNAVAILABLE,
                                   &ngx_http_civicgate_health_type,
                                   &ngx_http_civicgate_health_answers[answer]);
}


/*
 * <admin location>maintenance: PUT on, DELETE off, GET reads.  The flag
 * is in shared memory: every worker answers by it at once, and a reload
 * keeps it.
 */

static ngx_int_t
ngx_http_civicgate_maintenance(ngx_http_request_t *r, ngx_str_t *rest)
{
    json_t                          *problem;
    ngx_int_t                        rc, set;
    ngx_uint_t                       on;
    ngx_table_elt_t                 *h;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    if (r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD)) {
        set = -1;

    } else if (r->method & (NGX_HTTP_PUT|NGX_HTTP_DELETE)) {
        set = (r->method == NGX_HTTP_PUT);

    } else {
        h = ngx_http_civicgate_push_header(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "Allow");
        ngx_str_set(&h->value, "GET, HEAD, PUT, DELETE");

        problem = ngx_http_civicgate_problem_new(NGX_HTTP_NOT_ALLOWED,
                      "urn:civicgate:problem:method-not-allowed",
                      "Method not allowed", "This method is not allowed here.");

        return ngx_http_civicgate_problem_send(r, NGX_HTTP_NOT_ALLOWED,
                                               problem);
    }

    on = ngx_http_civicgate_metrics_maintenance(cgmcf->metrics, -1);

    if (set >= 0 && (ngx_uint_t) set != on) {
        on = ngx_http_civicgate_metrics_maintenance(cgmcf->metrics, set);

        ngx_log_error(NGX_LOG_NOTICE, r->connection->log, 0,
                      "civicgate: maintenance %s", on ? "on" : "off");
    }

    return ngx_http_civicgate_send(r, NGX_HTTP_OK,
                                   &ngx_http_civicgate_health_type,
                                   &ngx_http_civicgate_maintenance_answers[on]);
}
