
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <openssl/crypto.h>

#include "ngx_http_civicgate_status.h"
#include "ngx_http_civicgate_json.h"


/*
 * <status location>notices/{code}: an official notice, as the status
 * admin endpoint stored it with the change (code, service, state,
 * message, time, sid, jws), or 404 "not an official notice".  Lookups
 * are limited per client address (GCRA in a shared-memory table), so
 * that codes cannot be tried at speed.
 */


#define NGX_HTTP_CIVICGATE_NOTICE_ZONE       "civicgate_notices"
#define NGX_HTTP_CIVICGATE_NOTICE_ZONE_SIZE  (1024 * 1024)

/* by default 60 lookups a minute, 20 at once, per client address */
#define NGX_HTTP_CIVICGATE_NOTICE_RATE       60
#define NGX_HTTP_CIVICGATE_NOTICE_BURST      20


static ngx_int_t ngx_http_civicgate_notice_rate(ngx_str_t *value,
    uint64_t *interval);
static ngx_int_t ngx_http_civicgate_notice_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static ngx_int_t ngx_http_civicgate_notice_limited(ngx_http_request_t *r,
    ngx_http_civicgate_status_conf_t *scf);
static void ngx_http_civicgate_notice_key(ngx_http_request_t *r,
    u_char *key);
static void ngx_http_civicgate_notice_found(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static ngx_int_t ngx_http_civicgate_notice_answer(ngx_http_request_t *r,
    redisReply *reply);
static ngx_int_t ngx_http_civicgate_not_official(ngx_http_request_t *r);


static ngx_str_t  ngx_http_civicgate_notice_type =
    ngx_string("application/json");

static ngx_http_civicgate_log_limit_t  ngx_http_civicgate_notice_refused;
static ngx_http_civicgate_log_limit_t  ngx_http_civicgate_notice_failed;


/* civicgate_notice_limit RATE [burst=N] | off; RATE as "30r/m", "1r/s" */

char *
ngx_http_civicgate_notice_limit(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_civicgate_status_conf_t *scf = conf;

    ngx_int_t   n;
    ngx_str_t  *value;

    if (scf->notice_limit_set) {
        return "is duplicate";
    }

    scf->notice_limit_set = 1;
    value = cf->args->elts;

    if (value[1].len == 3 && ngx_strncmp(value[1].data, "off", 3) == 0) {
        if (cf->args->nelts > 2) {
            return "takes no burst when off";
        }

        scf->notice_limit.interval = 0;
        return NGX_CONF_OK;
    }

    if (ngx_http_civicgate_notice_rate(&value[1], &scf->notice_limit.interval)
        != NGX_OK)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid rate \"%V\", it must be like \"60r/m\" "
                           "or \"1r/s\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    scf->notice_limit.burst = 0;

    if (cf->args->nelts > 2) {
        n = -1;

        if (ngx_strncmp(value[2].data, "burst=", 6) == 0) {
            n = ngx_atoi(value[2].data + 6, value[2].len - 6);
        }

        if (n < 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[2]);
            return NGX_CONF_ERROR;
        }

        scf->notice_limit.burst = n;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_civicgate_notice_rate(ngx_str_t *value, uint64_t *interval)
{
    size_t     len;
    ngx_int_t  n;
    uint64_t   per;

    if (value->len < 4) {
        return NGX_ERROR;
    }

    len = value->len - 3;

    if (ngx_strncmp(value->data + len, "r/s", 3) == 0) {
        per = 1000000;

    } else if (ngx_strncmp(value->data + len, "r/m", 3) == 0) {
        per = 60000000;

    } else {
        return NGX_ERROR;
    }

    n = ngx_atoi(value->data, len);
    if (n <= 0 || n > 1000000) {
        return NGX_ERROR;
    }

    *interval = per / n;

    return NGX_OK;
}


/* with civicgate_status: the default limit and the zone of addresses */

ngx_int_t
ngx_http_civicgate_notice_init_conf(ngx_conf_t *cf,
    ngx_http_civicgate_status_conf_t *scf)
{
    ngx_str_t  name = ngx_string(NGX_HTTP_CIVICGATE_NOTICE_ZONE);

    if (!scf->notice_limit_set) {
        scf->notice_limit.interval = 60000000 / NGX_HTTP_CIVICGATE_NOTICE_RATE;
        scf->notice_limit.burst = NGX_HTTP_CIVICGATE_NOTICE_BURST;
    }

    scf->notice_limit.delay = scf->notice_limit.burst;

    if (scf->notice_limit.interval == 0) {
        return NGX_OK;
    }

    scf->notice_zone = ngx_shared_memory_add(cf, &name,
                                         NGX_HTTP_CIVICGATE_NOTICE_ZONE_SIZE,
                                         &ngx_http_civicgate_status_module);
    if (scf->notice_zone == NULL) {
        return NGX_ERROR;
    }

    scf->notice_zone->init = ngx_http_civicgate_notice_init_zone;
    scf->notice_zone->data = scf;

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_notice_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_civicgate_status_conf_t  *oscf = data;

    ngx_http_civicgate_status_conf_t  *scf;

    scf = shm_zone->data;

    return ngx_http_civicgate_table_init(shm_zone, &scf->notice_table,
                                         oscf ? &oscf->notice_table : NULL,
                                         &shm_zone->shm.name);
}


ngx_int_t
ngx_http_civicgate_notice_lookup(ngx_http_request_t *r, ngx_str_t *code)
{
    u_char                             canonical[NGX_HTTP_CIVICGATE_NOTICE_LEN];
    ngx_int_t                          rc;
    ngx_http_civicgate_ctx_t          *ctx;
    ngx_http_civicgate_redis_args_t    a;
    ngx_http_civicgate_status_conf_t  *scf;

    scf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_status_module);

    rc = ngx_http_civicgate_notice_limited(r, scf);
    if (rc != NGX_DECLINED) {
        return rc;
    }

    if (ngx_http_civicgate_notice_parse(code->data, code->len, canonical)
        != NGX_OK)
    {
        return ngx_http_civicgate_not_official(r);
    }

    /* the canonical code, for the comparison once Redis answers */
    code = ngx_palloc(r->pool, sizeof(ngx_str_t) + sizeof(canonical));
    if (code == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    code->data = (u_char *) (code + 1);
    code->len = sizeof(canonical);
    ngx_memcpy(code->data, canonical, sizeof(canonical));

    ngx_http_set_ctx(r, code, ngx_http_civicgate_status_module);

    a.argc = 0;
    ngx_http_civicgate_redis_arg_str(&a, "HGET");
    ngx_http_civicgate_redis_arg_str(&a,
                                     NGX_HTTP_CIVICGATE_KEY_STATUS_NOTICES);
    ngx_http_civicgate_redis_arg(&a, code->data, code->len);

    ctx = ngx_http_civicgate_get_ctx(r);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->cmd = ngx_http_civicgate_redis_send(scf->core->client, a.argc,
                                             a.argv, a.lens,
                                             ngx_http_civicgate_notice_found,
                                             r);
    if (ctx->cmd == NULL) {
        return ngx_http_civicgate_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "notices-unavailable",
                                        "Notices cannot be checked now; "
                                        "retry later.");
    }

    ngx_http_civicgate_wait(r);
    r->main->count++;

    return NGX_DONE;
}


/* NGX_DECLINED if the address may look up a notice now, else the 429 */

static ngx_int_t
ngx_http_civicgate_notice_limited(ngx_http_request_t *r,
    ngx_http_civicgate_status_conf_t *scf)
{
    u_char                             key[NGX_HTTP_CIVICGATE_TABLE_KEY];
    uint64_t                           now, tat;
    ngx_table_elt_t                   *h;
    ngx_http_civicgate_table_node_t   *node;
    ngx_http_civicgate_gcra_result_t   res;

    if (scf->notice_zone == NULL) {
        return NGX_DECLINED;
    }

    ngx_http_civicgate_notice_key(r, key);
    now = (uint64_t) ngx_current_msec * 1000;

    ngx_shmtx_lock(&scf->notice_table.shpool->mutex);

    node = ngx_http_civicgate_table_lookup(&scf->notice_table, key);
    tat = node ? node->value : now;

    ngx_http_civicgate_gcra_decide(&scf->notice_limit,
                                   ngx_http_civicgate_gcra_excess(tat, now),
                                   &res);

    if (res.admitted) {
        if (node == NULL) {
            node = ngx_http_civicgate_table_insert(&scf->notice_table, key);

        } else {
            ngx_http_civicgate_table_touch(&scf->notice_table, node);
        }

        if (node != NULL) {
            node->value = ngx_http_civicgate_gcra_next(&scf->notice_limit,
                                                       tat, now);
        }
    }

    ngx_shmtx_unlock(&scf->notice_table.shpool->mutex);

    if (res.admitted) {
        return NGX_DECLINED;
    }

    if (ngx_http_civicgate_log_due(&ngx_http_civicgate_notice_refused)) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "civicgate: notice lookups over the limit are refused "
                      "(logged once every 10 s)");
    }

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Retry-After");
    h->value.data = ngx_pnalloc(r->pool, NGX_INT64_LEN);
    if (h->value.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* whole seconds, rounded up: a client retrying then is admitted */
    h->value.len = ngx_sprintf(h->value.data, "%uL",
                               (res.retry_us + 999999) / 1000000)
                   - h->value.data;

    return ngx_http_civicgate_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                    "notice-lookups-limited",
                                    "Too many notice lookups from this "
                                    "address; retry later.");
}


/* the client's address, family first, zero-padded */

static void
ngx_http_civicgate_notice_key(ngx_http_request_t *r, u_char *key)
{
    struct sockaddr      *sa;
    struct sockaddr_in   *sin;
#if (NGX_HAVE_INET6)
    struct sockaddr_in6  *sin6;
#endif

    ngx_memzero(key, NGX_HTTP_CIVICGATE_TABLE_KEY);

    sa = r->connection->sockaddr;
    key[0] = (u_char) sa->sa_family;

    switch (sa->sa_family) {

#if (NGX_HAVE_INET6)
    case AF_INET6:
        sin6 = (struct sockaddr_in6 *) sa;
        ngx_memcpy(key + 1, sin6->sin6_addr.s6_addr, 16);
        break;
#endif

    case AF_INET:
        sin = (struct sockaddr_in *) sa;
        ngx_memcpy(key + 1, &sin->sin_addr, 4);
        break;

    default:
        /* unix sockets: one shared budget */
        break;
    }
}


static void
ngx_http_civicgate_notice_found(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_int_t                  rc;
    ngx_connection_t          *c;
    ngx_http_request_t        *r;
    ngx_http_civicgate_ctx_t  *ctx;

    r = ngx_http_civicgate_answered(cmd, &ctx);
    if (r == NULL) {
        return;
    }

    c = r->connection;
    ngx_http_set_log_request(c->log, r);

    ngx_http_civicgate_redis_refused(cmd->redis, reply, "a notice lookup",
                                     &ngx_http_civicgate_notice_failed);

    rc = ngx_http_civicgate_notice_answer(r, reply);

    ngx_http_finalize_request(r, rc);
    ngx_http_run_posted_requests(c);
}


/* the stored notice, once its code equals the one asked for */

static ngx_int_t
ngx_http_civicgate_notice_answer(ngx_http_request_t *r, redisReply *reply)
{
    json_t      *notice;
    ngx_str_t   *code, body;
    const char  *stored;

    code = ngx_http_get_module_ctx(r, ngx_http_civicgate_status_module);

    if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
        return ngx_http_civicgate_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "notices-unavailable",
                                        "Notices cannot be checked now; "
                                        "retry later.");
    }

    if (reply->type != REDIS_REPLY_STRING) {
        return ngx_http_civicgate_not_official(r);
    }

    notice = json_loadb(reply->str, reply->len, 0, NULL);
    stored = json_string_value(json_object_get(notice, "code"));

    if (stored == NULL || ngx_strlen(stored) != code->len
        || CRYPTO_memcmp(stored, code->data, code->len) != 0)
    {
        json_decref(notice);
        return ngx_http_civicgate_not_official(r);
    }

    json_decref(notice);

    body.data = ngx_pnalloc(r->pool, reply->len + 1);
    if (body.data == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    body.len = ngx_sprintf(body.data, "%*s\n", reply->len, reply->str)
               - body.data;

    return ngx_http_civicgate_send(r, NGX_HTTP_OK,
                                   &ngx_http_civicgate_notice_type, &body);
}


static ngx_int_t
ngx_http_civicgate_not_official(ngx_http_request_t *r)
{
    return ngx_http_civicgate_problem_send(r, NGX_HTTP_NOT_FOUND,
               ngx_http_civicgate_problem_new(NGX_HTTP_NOT_FOUND,
                   NGX_HTTP_CIVICGATE_PROBLEM "not-an-official-notice",
                   "Not an official notice",
                   "No notice of this gateway has this code: the message "
                   "that gave it is not an official notice."));
}
