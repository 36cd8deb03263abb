
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_core.h"


static ngx_http_civicgate_ctx_t *ngx_http_civicgate_find_ctx(
    ngx_http_request_t *r);
static void ngx_http_civicgate_ctx_cleanup(void *data);


/*
 * The ctx is also reachable through a request pool cleanup: internal
 * redirects zero r->ctx, and what a concern decided (a journey minted, a
 * limit charged) must not be done twice.  Subrequests share the pool, so
 * the cleanup names its request; a subrequest gets a ctx of its own, and
 * each concern decides what it takes from the main request's.
 */

ngx_http_civicgate_ctx_t *
ngx_http_civicgate_get_ctx(ngx_http_request_t *r)
{
    size_t                           size;
    ngx_pool_cleanup_t              *cln;
    ngx_http_civicgate_ctx_t        *ctx;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    ctx = ngx_http_civicgate_find_ctx(r);
    if (ctx != NULL) {
        return ctx;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    size = sizeof(ngx_http_civicgate_ctx_t) + cgmcf->nstates * sizeof(void *);

    cln = ngx_pool_cleanup_add(r->pool, size);
    if (cln == NULL) {
        return NULL;
    }

    ctx = cln->data;
    ngx_memzero(ctx, size);

    ctx->request = r;
    ctx->state = (void **) (ctx + 1);

    cln->handler = ngx_http_civicgate_ctx_cleanup;
    ngx_http_set_ctx(r, ctx, ngx_http_civicgate_module);

    return ctx;
}


/* the request's ctx if it has one: found again after a redirect */

static ngx_http_civicgate_ctx_t *
ngx_http_civicgate_find_ctx(ngx_http_request_t *r)
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

    return NULL;
}


/*
 * A slot in every request's ctx for a concern's state: only as many as
 * concerns keep state, not one per nginx module.
 */

ngx_int_t
ngx_http_civicgate_add_state(ngx_conf_t *cf, ngx_module_t *module)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    if (cgmcf->slots[module->ctx_index] == 0) {
        cgmcf->slots[module->ctx_index] = (u_char) ++cgmcf->nstates;
    }

    return NGX_OK;
}


/* a concern's state for the request: NULL if it has none yet */

void *
ngx_http_civicgate_get_state(ngx_http_request_t *r, ngx_module_t *module)
{
    ngx_http_civicgate_ctx_t        *ctx;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    ctx = ngx_http_civicgate_find_ctx(r);
    if (ctx == NULL) {
        return NULL;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    return ctx->state[cgmcf->slots[module->ctx_index] - 1];
}


ngx_int_t
ngx_http_civicgate_set_state(ngx_http_request_t *r, ngx_module_t *module,
    void *state)
{
    ngx_http_civicgate_ctx_t        *ctx;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    ctx = ngx_http_civicgate_get_ctx(r);
    if (ctx == NULL) {
        return NGX_ERROR;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    ctx->state[cgmcf->slots[module->ctx_index] - 1] = state;

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


/* the command connection is (again) ready: each concern resumes its work */

ngx_int_t
ngx_http_civicgate_on_ready(ngx_conf_t *cf,
    ngx_http_civicgate_redis_ready_pt handler)
{
    ngx_http_civicgate_redis_ready_pt  *h;
    ngx_http_civicgate_main_conf_t     *cgmcf;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    h = ngx_array_push(&cgmcf->ready);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = handler;

    return NGX_OK;
}


/*
 * A channel on the subscriber connection, subscribed at every connect;
 * with a NULL channel, the handler of every channel no other one names
 * (subscribed to later, by the concern).
 */

ngx_int_t
ngx_http_civicgate_subscribe(ngx_conf_t *cf, char *channel,
    ngx_http_civicgate_redis_message_pt handler,
    ngx_http_civicgate_redis_ready_pt ready)
{
    ngx_http_civicgate_main_conf_t     *cgmcf;
    ngx_http_civicgate_subscription_t  *s;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    s = ngx_array_push(&cgmcf->subscriptions);
    if (s == NULL) {
        return NGX_ERROR;
    }

    if (channel != NULL) {
        s->channel.data = (u_char *) channel;
        s->channel.len = ngx_strlen(channel);

    } else {
        ngx_str_null(&s->channel);
    }

    s->handler = handler;
    s->ready = ready;

    return NGX_OK;
}


void
ngx_http_civicgate_client_ready(ngx_http_civicgate_redis_t *rc)
{
    ngx_uint_t                          i;
    ngx_http_civicgate_main_conf_t     *cgmcf;
    ngx_http_civicgate_redis_ready_pt  *h;

    cgmcf = rc->data;
    h = cgmcf->ready.elts;

    for (i = 0; i < cgmcf->ready.nelts; i++) {
        h[i](rc);
    }
}


void
ngx_http_civicgate_subscriber_ready(ngx_http_civicgate_redis_t *rc)
{
    ngx_uint_t                          i;
    ngx_http_civicgate_main_conf_t     *cgmcf;
    ngx_http_civicgate_subscription_t  *s;

    cgmcf = rc->data;
    s = cgmcf->subscriptions.elts;

    for (i = 0; i < cgmcf->subscriptions.nelts; i++) {
        if (s[i].ready != NULL) {
            s[i].ready(rc);
        }
    }
}


/* a push on the subscriber connection, to the concern of its channel */

void
ngx_http_civicgate_pubsub_message(ngx_http_civicgate_redis_t *rc,
    redisReply *reply)
{
    ngx_uint_t                          i;
    redisReply                         *channel;
    ngx_http_civicgate_main_conf_t     *cgmcf;
    ngx_http_civicgate_subscription_t  *s, *other;

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 3
        || reply->element[0]->type != REDIS_REPLY_STRING
        || reply->element[1]->type != REDIS_REPLY_STRING)
    {
        return;
    }

    cgmcf = rc->data;
    channel = reply->element[1];
    s = cgmcf->subscriptions.elts;
    other = NULL;

    for (i = 0; i < cgmcf->subscriptions.nelts; i++) {
        if (s[i].channel.len == 0) {
            other = &s[i];
            continue;
        }

        if (s[i].channel.len == channel->len
            && ngx_strncmp(s[i].channel.data, channel->str, channel->len) == 0)
        {
            s[i].handler(rc, reply);
            return;
        }
    }

    if (other != NULL) {
        other->handler(rc, reply);
    }
}


/* a path below every civicgate_admin location, served by its concern */

ngx_int_t
ngx_http_civicgate_admin_route(ngx_conf_t *cf, char *path,
    ngx_http_civicgate_admin_pt handler)
{
    ngx_http_civicgate_main_conf_t     *cgmcf;
    ngx_http_civicgate_admin_route_t   *route;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    route = ngx_array_push(&cgmcf->admin_routes);
    if (route == NULL) {
        return NGX_ERROR;
    }

    route->path.data = (u_char *) path;
    route->path.len = ngx_strlen(path);
    route->handler = handler;

    return NGX_OK;
}


ngx_int_t
ngx_http_civicgate_add_variables(ngx_conf_t *cf, ngx_http_variable_t *vars)
{
    ngx_http_variable_t  *var, *v;

    for (v = vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


void
ngx_http_civicgate_variable_set(ngx_http_variable_value_t *v, u_char *data,
    size_t len)
{
    v->len = len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = len ? data : (u_char *) "";
}
