
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <openssl/sha.h>

#include "ngx_http_civicgate_redis.h"
#include "ngx_http_civicgate_conf.h"
#include "ngx_http_civicgate_metrics.h"


#define NGX_HTTP_CIVICGATE_REDIS_BUF         16384
#define NGX_HTTP_CIVICGATE_REDIS_OUT_MAX     (64 * 1024 * 1024)
#define NGX_HTTP_CIVICGATE_REDIS_FREE_MAX    1024
#define NGX_HTTP_CIVICGATE_REDIS_PING        1000

/*
 * Reconnection delays: uniformly random (full jitter, so that the workers
 * of every gateway spread out) between a floor and a ceiling that starts
 * at the base and doubles with each failure, up to the cap; the count of
 * failures is forgotten only once a connection has been ready for the
 * healthy period, so a Redis that accepts and then drops keeps it growing.
 */
#define NGX_HTTP_CIVICGATE_REDIS_BACKOFF_FLOOR  10         /* ms */
#define NGX_HTTP_CIVICGATE_REDIS_BACKOFF_BASE   100
#define NGX_HTTP_CIVICGATE_REDIS_BACKOFF_CAP    2000
#define NGX_HTTP_CIVICGATE_REDIS_HEALTHY        10000

/* a Redis series, where the owner of the connection asked for metrics */
#define ngx_http_civicgate_redis_metric(rc, family, label, n)                 \
    if ((rc)->metrics) {                                                      \
        ngx_http_civicgate_metrics_add((rc)->metrics,                         \
                                       (rc)->metrics->family, label, n);      \
    }

/* an outage is logged once at error level, then quietly until it ends */
#define ngx_http_civicgate_redis_level(rc)                                    \
    ((rc)->failures ? NGX_LOG_INFO : NGX_LOG_ERR)


static ngx_http_civicgate_redis_conf_t *ngx_http_civicgate_redis_conf_create(
    ngx_conf_t *cf);
static char *ngx_http_civicgate_redis_urls(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_uint_t *tls, ngx_uint_t *nurls);
static ngx_uint_t ngx_http_civicgate_redis_is_url(ngx_str_t *value);
static char *ngx_http_civicgate_redis_seeds(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf);
static char *ngx_http_civicgate_redis_tls(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_uint_t tls,
    ngx_str_t *tls_files);
static char *ngx_http_civicgate_redis_mode(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_uint_t nurls,
    ngx_uint_t url_user);
static char *ngx_http_civicgate_redis_url(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *url, ngx_uint_t *tls);
static char *ngx_http_civicgate_redis_param(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *value,
    ngx_str_t *tls_files);
static ngx_int_t ngx_http_civicgate_redis_userdb(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *url, u_char **start,
    u_char **end);
#if (NGX_HTTP_SSL)
static ngx_int_t ngx_http_civicgate_redis_tls_param(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *value,
    ngx_str_t *tls_files);
#endif
static char *ngx_http_civicgate_redis_sentinel_param(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *value);
static char *ngx_http_civicgate_redis_password(ngx_conf_t *cf,
    ngx_str_t *password, ngx_str_t *path);
#if (NGX_HTTP_SSL)
static char *ngx_http_civicgate_redis_ssl(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *tls_files);
static void ngx_http_civicgate_redis_ssl_start(ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_redis_ssl_handshake(ngx_connection_t *c);
static ngx_int_t ngx_http_civicgate_redis_check_name(
    ngx_http_civicgate_redis_t *rc);
#endif

static ngx_int_t ngx_http_civicgate_redis_follow(ngx_cycle_t *cycle,
    ngx_http_civicgate_redis_t *rc);
static ngx_int_t ngx_http_civicgate_redis_listen(ngx_cycle_t *cycle,
    ngx_http_civicgate_sentinel_t *s, ngx_http_civicgate_redis_conf_t *sc);
static void ngx_http_civicgate_redis_unlisten(
    ngx_http_civicgate_sentinel_t *s);
static void ngx_http_civicgate_redis_unfollow(ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_redis_start_sentinels(
    ngx_http_civicgate_redis_t *rc);
static uint32_t ngx_http_civicgate_redis_fencer(ngx_http_civicgate_redis_t *rc);
static ngx_int_t ngx_http_civicgate_redis_ask(ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_redis_located(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static void ngx_http_civicgate_redis_announced(ngx_http_civicgate_redis_t *rc,
    redisReply *reply);
static void ngx_http_civicgate_redis_adopt(ngx_http_civicgate_redis_t *watch);
static void ngx_http_civicgate_redis_hold(ngx_http_civicgate_redis_t *from);
static void ngx_http_civicgate_redis_unfence(ngx_event_t *ev);
static void ngx_http_civicgate_redis_ask_again(
    ngx_http_civicgate_sentinel_t *s);
static void ngx_http_civicgate_redis_role(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply);
static void ngx_http_civicgate_redis_peer_init(ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_redis_connect(ngx_http_civicgate_redis_t *rc);
static ngx_int_t ngx_http_civicgate_redis_attach(
    ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_redis_connect_failed(
    ngx_http_civicgate_redis_t *rc, ngx_uint_t kind);
static void ngx_http_civicgate_redis_healthy(ngx_event_t *ev);
static ngx_msec_t ngx_http_civicgate_redis_backoff(
    ngx_http_civicgate_redis_t *rc);
static ngx_int_t ngx_http_civicgate_redis_queue_setup(
    ngx_http_civicgate_redis_t *rc);
static ngx_uint_t ngx_http_civicgate_redis_demoted(
    ngx_http_civicgate_redis_t *rc, void *reply);
static ngx_int_t ngx_http_civicgate_redis_queue_sentinel(
    ngx_http_civicgate_redis_t *rc);
static ngx_int_t ngx_http_civicgate_redis_subscribe(
    ngx_http_civicgate_redis_t *rc);
static ngx_int_t ngx_http_civicgate_redis_scripts_exist(
    ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_redis_exist_handler(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static void ngx_http_civicgate_redis_setup_handler(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static void ngx_http_civicgate_redis_connected(ngx_event_t *ev);
static void ngx_http_civicgate_redis_start_io(ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_redis_write(ngx_event_t *wev);
static ngx_int_t ngx_http_civicgate_redis_dispatch(
    ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_redis_answer(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply, uint64_t *now);
static ngx_int_t ngx_http_civicgate_redis_pushed(ngx_http_civicgate_redis_t *rc,
    void *reply);
static void ngx_http_civicgate_redis_observe(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply, uint64_t *now);
static void ngx_http_civicgate_redis_timeout(ngx_event_t *ev);
static void ngx_http_civicgate_redis_reconnect(ngx_event_t *ev);
static void ngx_http_civicgate_redis_ping(ngx_event_t *ev);
static ngx_int_t ngx_http_civicgate_redis_send_ping(
    ngx_http_civicgate_redis_t *rc);
static ngx_uint_t ngx_http_civicgate_redis_pong(redisReply *reply);
static void ngx_http_civicgate_redis_fail(ngx_http_civicgate_redis_t *rc,
    const char *reason);
static void ngx_http_civicgate_redis_timedout(ngx_http_civicgate_redis_t *rc,
    const char *what);
static void ngx_http_civicgate_redis_drop(ngx_http_civicgate_redis_t *rc,
    const char *reason);
static uint64_t ngx_http_civicgate_redis_now_us(void);
static void ngx_http_civicgate_redis_close(ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_redis_enqueue(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd);
static ngx_int_t ngx_http_civicgate_redis_append(ngx_http_civicgate_redis_t *rc,
    const char *buf, size_t len);
static ngx_http_civicgate_redis_cmd_t *ngx_http_civicgate_redis_cmd_alloc(
    ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_redis_cmd_free(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd);
static void ngx_http_civicgate_redis_post_write(ngx_http_civicgate_redis_t *rc);
static ngx_uint_t ngx_http_civicgate_redis_script_of(
    ngx_http_civicgate_redis_t *rc, int argc, const char **argv,
    const size_t *argvlen);
static ngx_uint_t ngx_http_civicgate_redis_noscript(redisReply *reply);
static ngx_int_t ngx_http_civicgate_redis_resend(
    ngx_http_civicgate_redis_t *rc, ngx_http_civicgate_redis_cmd_t *cmd);
static ngx_int_t ngx_http_civicgate_redis_script_load(
    ngx_http_civicgate_redis_t *rc, ngx_uint_t i);
static void ngx_http_civicgate_redis_script_loaded(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);


/* configuration */

char *
ngx_http_civicgate_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_redis_conf_t  **rcfp = (void *) ((char *) conf
                                                        + cmd->offset);

    char                             *rv;
    ngx_str_t                        *value, tls_files[4];
    ngx_uint_t                        i, tls, nurls, url_user;
    ngx_http_civicgate_redis_conf_t  *rcf;

    if (*rcfp != NULL) {
        return "is duplicate";
    }

    rcf = ngx_http_civicgate_redis_conf_create(cf);
    if (rcf == NULL) {
        return NGX_CONF_ERROR;
    }

    /* the Sentinels' own user, password and addresses, if mode=sentinel */
    rcf->sentinels = ngx_http_civicgate_redis_conf_create(cf);
    if (rcf->sentinels == NULL) {
        return NGX_CONF_ERROR;
    }

    value = cf->args->elts;
    ngx_memzero(tls_files, sizeof(tls_files));
    tls = 0;

    rv = ngx_http_civicgate_redis_urls(cf, rcf, &tls, &nurls);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    url_user = rcf->user.len;

    for (i = 1 + nurls; i < cf->args->nelts; i++) {
        rv = ngx_http_civicgate_redis_param(cf, rcf, &value[i], tls_files);
        if (rv != NGX_CONF_OK) {
            return rv;
        }
    }

    rv = ngx_http_civicgate_redis_mode(cf, rcf, nurls, url_user);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    rv = ngx_http_civicgate_redis_tls(cf, rcf, tls, tls_files);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    if (rcf->mode == NGX_HTTP_CIVICGATE_REDIS_CLUSTER) {
        rv = ngx_http_civicgate_redis_seeds(cf, rcf);
        if (rv != NGX_CONF_OK) {
            return rv;
        }
    }

    *rcfp = rcf;

    return NGX_CONF_OK;
}


static char *
ngx_http_civicgate_redis_tls(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_uint_t tls,
    ngx_str_t *tls_files)
{
#if (NGX_HTTP_SSL)
    char  *rv;
#endif

    if (!tls) {
        if (tls_files[0].len || tls_files[1].len || tls_files[2].len
            || tls_files[3].len)
        {
            return "has tls_ parameters without a rediss:// URL";
        }

        return NGX_CONF_OK;
    }

#if (NGX_HTTP_SSL)
    rv = ngx_http_civicgate_redis_ssl(cf, rcf, tls_files);
    if (rv != NGX_CONF_OK) {
        return rv;
    }

    /* one name for Sentinels and servers alike: see tls_name= */
    if (rcf->sentinels) {
        rcf->sentinels->ssl = rcf->ssl;
        rcf->sentinels->tls_verify = rcf->tls_verify;
        rcf->sentinels->tls_name = rcf->tls_name;
        rcf->sentinels->tls_name_ip = rcf->tls_name_ip;
    }

    return NGX_CONF_OK;
#else
    return "rediss:// requires nginx built with SSL";
#endif
}


static ngx_http_civicgate_redis_conf_t *
ngx_http_civicgate_redis_conf_create(ngx_conf_t *cf)
{
    ngx_http_civicgate_redis_conf_t  *rcf;

    rcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_redis_conf_t));
    if (rcf == NULL) {
        return NULL;
    }

    rcf->timeout = 200;
    rcf->connect_timeout = 1000;

#if (NGX_HTTP_SSL)
    rcf->tls_verify = 1;
#endif

    if (ngx_array_init(&rcf->scripts, cf->pool, 4,
                       sizeof(ngx_http_civicgate_redis_script_t *))
        != NGX_OK)
    {
        return NULL;
    }

    return rcf;
}


/* the URLs lead the directive: every address of each of them is kept */

static char *
ngx_http_civicgate_redis_urls(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_uint_t *tls, ngx_uint_t *nurls)
{
    char                             *rv;
    ngx_str_t                        *value;
    ngx_uint_t                        i, url_tls;
    ngx_addr_t                       *a;
    ngx_array_t                       addrs;
    ngx_http_civicgate_redis_conf_t   one;

    value = cf->args->elts;

    if (ngx_array_init(&addrs, cf->pool, 4, sizeof(ngx_addr_t)) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    for (i = 1; i < cf->args->nelts; i++) {
        if (i > 1 && !ngx_http_civicgate_redis_is_url(&value[i])) {
            break;
        }

        ngx_memzero(&one, sizeof(ngx_http_civicgate_redis_conf_t));

        rv = ngx_http_civicgate_redis_url(cf, &one, &value[i], &url_tls);
        if (rv != NGX_CONF_OK) {
            return rv;
        }

        if (i == 1) {
            *tls = url_tls;
            rcf->url = one.url;
            rcf->host = one.host;
            rcf->user = one.user;
            rcf->db = one.db;

        } else if (url_tls != *tls) {
            return "mixes redis:// and rediss:// URLs";

        } else if (one.db != rcf->db || one.user.len != rcf->user.len
                   || (one.user.len
                       && ngx_strncmp(one.user.data, rcf->user.data,
                                      one.user.len) != 0))
        {
            return "has URLs with different users or databases";
        }

        a = ngx_array_push_n(&addrs, one.naddrs);
        if (a == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memcpy(a, one.addrs, one.naddrs * sizeof(ngx_addr_t));
    }

    rcf->addrs = addrs.elts;
    rcf->naddrs = addrs.nelts;
    *nurls = i - 1;

    return NGX_CONF_OK;
}


static ngx_uint_t
ngx_http_civicgate_redis_is_url(ngx_str_t *value)
{
    return ngx_strncmp(value->data, "redis://", 8) == 0
           || ngx_strncmp(value->data, "rediss://", 9) == 0
           || ngx_strncmp(value->data, "unix:", 5) == 0;
}


/*
 * mode=sentinel: the URLs are the Sentinels'; the servers' addresses are
 * learnt from them at run time, one at a time: the master's.
 */

static char *
ngx_http_civicgate_redis_mode(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_uint_t nurls,
    ngx_uint_t url_user)
{
    ngx_http_civicgate_redis_conf_t  *sc;

    sc = rcf->sentinels;

    if (rcf->mode != NGX_HTTP_CIVICGATE_REDIS_SENTINEL) {
        if (nurls > 1 && rcf->mode == NGX_HTTP_CIVICGATE_REDIS_SINGLE) {
            return "takes several URLs only with \"mode=sentinel\" or "
                   "\"mode=cluster\"";
        }

        if (rcf->master.len) {
            return "has \"master=\" without \"mode=sentinel\"";
        }

        if (sc->user.len || sc->password.len) {
            return "has sentinel_ parameters without \"mode=sentinel\"";
        }

        /* a cluster has one database: SELECT is refused there */
        if (rcf->mode == NGX_HTTP_CIVICGATE_REDIS_CLUSTER && rcf->db != 0) {
            return "with \"mode=cluster\" takes database 0 only";
        }

        rcf->sentinels = NULL;
        return NGX_CONF_OK;
    }

    if (rcf->master.len == 0) {
        return "with \"mode=sentinel\" requires \"master=\"";
    }

    if (url_user) {
        return "has a user in a Sentinel's URL: use \"sentinel_user=\" for "
               "the Sentinels, \"user=\" for the Redis servers";
    }

#if (NGX_HTTP_SSL)
    if (ngx_strncmp(rcf->url.data, "rediss://", 9) == 0 && rcf->tls_verify
        && rcf->tls_name.len == 0)
    {
        return "with \"mode=sentinel\", rediss:// and tls_verify=on "
               "requires \"tls_name=\"";
    }
#endif

    sc->url = rcf->url;
    sc->master = rcf->master;
    sc->addrs = rcf->addrs;
    sc->naddrs = rcf->naddrs;
    sc->host = rcf->host;
    sc->timeout = rcf->timeout;
    sc->connect_timeout = rcf->connect_timeout;

    /* the master's address comes from the Sentinels, one at a time */
    rcf->addrs = NULL;
    rcf->naddrs = 1;

    rcf->url.len = sizeof("master \"\"") - 1 + rcf->master.len;
    rcf->url.data = ngx_pnalloc(cf->pool, rcf->url.len);
    if (rcf->url.data == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_sprintf(rcf->url.data, "master \"%V\"", &rcf->master);

    return NGX_CONF_OK;
}


/*
 * mode=cluster: the seed nodes are tried in turn by one connection that
 * reads the slot map and carries the subscriptions; the masters' own
 * connections are made at run time from the map, with these parameters.
 */

static char *
ngx_http_civicgate_redis_seeds(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf)
{
    ngx_http_civicgate_redis_conf_t  *seeds;

    seeds = ngx_palloc(cf->pool, sizeof(ngx_http_civicgate_redis_conf_t));
    if (seeds == NULL) {
        return NGX_CONF_ERROR;
    }

    *seeds = *rcf;
    seeds->mode = NGX_HTTP_CIVICGATE_REDIS_SINGLE;
    seeds->seeds = NULL;

    if (ngx_array_init(&seeds->scripts, cf->pool, 1,
                       sizeof(ngx_http_civicgate_redis_script_t *))
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    rcf->seeds = seeds;

    return NGX_CONF_OK;
}


/* redis://[user@]host[:port][/db], rediss://..., unix:/path */

static char *
ngx_http_civicgate_redis_url(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *url, ngx_uint_t *tls)
{
    u_char     *p, *last;
    ngx_url_t   u;

    rcf->url = *url;
    *tls = 0;

    ngx_memzero(&u, sizeof(ngx_url_t));
    u.default_port = 6379;

    p = url->data;
    last = url->data + url->len;

    if (ngx_strncmp(p, "unix:", 5) == 0) {
        u.url = *url;
        goto parse;
    }

    if (ngx_strncmp(p, "redis://", 8) == 0) {
        p += 8;

    } else if (ngx_strncmp(p, "rediss://", 9) == 0) {
        p += 9;
        *tls = 1;

    } else {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid redis URL \"%V\": expected redis://, "
                           "rediss:// or unix:", url);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_civicgate_redis_userdb(cf, rcf, url, &p, &last) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    u.url.data = p;
    u.url.len = last - p;

parse:

    if (ngx_parse_url(cf->pool, &u) != NGX_OK || u.naddrs == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%s in redis URL \"%V\"",
                           u.err ? u.err : "no address", url);
        return NGX_CONF_ERROR;
    }

    /*
     * resolved now, at configuration time, never on the request path;
     * every address is kept: "localhost" may be ::1 and 127.0.0.1
     */
    rcf->addrs = u.addrs;
    rcf->naddrs = u.naddrs;
    rcf->host = u.host;

    return NGX_CONF_OK;
}


/* user@ and /db of a redis:// URL: what is left is host and port */

static ngx_int_t
ngx_http_civicgate_redis_userdb(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *url, u_char **start,
    u_char **end)
{
    u_char     *p, *last, *at, *slash;
    ngx_int_t   db;

    p = *start;
    last = *end;

    at = ngx_strlchr(p, last, '@');
    if (at != NULL) {
        if (ngx_strlchr(p, at, ':') != NULL) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "password in redis URL \"%V\": use "
                               "\"password_file=\" instead", url);
            return NGX_ERROR;
        }

        rcf->user.data = p;
        rcf->user.len = at - p;
        p = at + 1;
    }

    slash = ngx_strlchr(p, last, '/');
    if (slash != NULL) {
        db = ngx_atoi(slash + 1, last - slash - 1);
        if (db == NGX_ERROR) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid database in redis URL \"%V\"", url);
            return NGX_ERROR;
        }

        rcf->db = db;
        last = slash;
    }

    *start = p;
    *end = last;

    return NGX_OK;
}


static char *
ngx_http_civicgate_redis_param(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *value,
    ngx_str_t *tls_files)
{
    ngx_str_t  s;
    ngx_int_t  n;

    if (ngx_strncmp(value->data, "timeout=", 8) == 0
        || ngx_strncmp(value->data, "connect_timeout=", 16) == 0)
    {
        s.data = (u_char *) ngx_strchr(value->data, '=') + 1;
        s.len = value->data + value->len - s.data;

        n = ngx_parse_time(&s, 0);
        if (n == NGX_ERROR || n == 0) {
            goto invalid;
        }

        if (value->data[0] == 't') {
            rcf->timeout = n;

        } else {
            rcf->connect_timeout = n;
        }

        return NGX_CONF_OK;
    }

    if (ngx_strncmp(value->data, "db=", 3) == 0) {
        n = ngx_atoi(value->data + 3, value->len - 3);
        if (n == NGX_ERROR) {
            goto invalid;
        }

        rcf->db = n;
        return NGX_CONF_OK;
    }

    if (ngx_strncmp(value->data, "password_file=", 14) == 0
        && value->len > 14)
    {
        s.data = value->data + 14;
        s.len = value->len - 14;
        return ngx_http_civicgate_redis_password(cf, &rcf->password, &s);
    }

    if (ngx_strncmp(value->data, "sentinel_", 9) == 0
        || ngx_strncmp(value->data, "mode=", 5) == 0
        || ngx_strncmp(value->data, "master=", 7) == 0
        || ngx_strncmp(value->data, "user=", 5) == 0)
    {
        return ngx_http_civicgate_redis_sentinel_param(cf, rcf, value);
    }

#if (NGX_HTTP_SSL)

    if (ngx_strncmp(value->data, "tls_", 4) == 0
        && ngx_http_civicgate_redis_tls_param(cf, rcf, value, tls_files)
           == NGX_OK)
    {
        return NGX_CONF_OK;
    }

#endif

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", value);
    return NGX_CONF_ERROR;
}


/* mode=, master= and the user and password of each kind of server */

static char *
ngx_http_civicgate_redis_sentinel_param(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *value)
{
    ngx_str_t  s;

    s.data = (u_char *) ngx_strchr(value->data, '=') + 1;
    s.len = value->data + value->len - s.data;

    if (s.len == 0) {
        goto invalid;
    }

    if (ngx_strncmp(value->data, "mode=", 5) == 0) {
        if (s.len == 6 && ngx_strncmp(s.data, "single", 6) == 0) {
            rcf->mode = NGX_HTTP_CIVICGATE_REDIS_SINGLE;

        } else if (s.len == 8 && ngx_strncmp(s.data, "sentinel", 8) == 0) {
            rcf->mode = NGX_HTTP_CIVICGATE_REDIS_SENTINEL;

        } else if (s.len == 7 && ngx_strncmp(s.data, "cluster", 7) == 0) {
            rcf->mode = NGX_HTTP_CIVICGATE_REDIS_CLUSTER;

        } else {
            goto invalid;
        }

        return NGX_CONF_OK;
    }

    if (ngx_strncmp(value->data, "master=", 7) == 0) {
        rcf->master = s;
        return NGX_CONF_OK;
    }

    if (ngx_strncmp(value->data, "user=", 5) == 0) {
        rcf->user = s;
        return NGX_CONF_OK;
    }

    if (ngx_strncmp(value->data, "sentinel_user=", 14) == 0) {
        rcf->sentinels->user = s;
        return NGX_CONF_OK;
    }

    if (ngx_strncmp(value->data, "sentinel_password_file=", 23) == 0) {
        return ngx_http_civicgate_redis_password(cf,
                                                 &rcf->sentinels->password, &s);
    }

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", value);
    return NGX_CONF_ERROR;
}


#if (NGX_HTTP_SSL)

/* tls_*= parameters; NGX_DECLINED: none, or not valid */

static ngx_int_t
ngx_http_civicgate_redis_tls_param(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *value,
    ngx_str_t *tls_files)
{
    if (ngx_strncmp(value->data, "tls_verify=", 11) == 0) {
        if (ngx_http_civicgate_flag_param(cf, value, 11, &rcf->tls_verify)
            != NGX_OK)
        {
            return NGX_DECLINED;
        }

        tls_files[3] = *value;     /* only to refuse it with redis:// */
        return NGX_OK;
    }

    if (ngx_strncmp(value->data, "tls_name=", 9) == 0 && value->len > 9) {
        rcf->tls_name.data = value->data + 9;
        rcf->tls_name.len = value->len - 9;
        tls_files[3] = *value;
        return NGX_OK;
    }

    if (ngx_strncmp(value->data, "tls_trusted_certificate=", 24) == 0) {
        tls_files[0].data = value->data + 24;
        tls_files[0].len = value->len - 24;
        return NGX_OK;
    }

    if (ngx_strncmp(value->data, "tls_certificate=", 16) == 0) {
        tls_files[1].data = value->data + 16;
        tls_files[1].len = value->len - 16;
        return NGX_OK;
    }

    if (ngx_strncmp(value->data, "tls_certificate_key=", 20) == 0) {
        tls_files[2].data = value->data + 20;
        tls_files[2].len = value->len - 20;
        return NGX_OK;
    }

    return NGX_DECLINED;
}

#endif


static char *
ngx_http_civicgate_redis_password(ngx_conf_t *cf, ngx_str_t *password,
    ngx_str_t *path)
{
    u_char     *p, *end;
    ngx_str_t   text;

    if (ngx_conf_full_name(cf->cycle, path, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_civicgate_read_file(cf, path, &text) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    /* the first line is the password */
    end = ngx_strlchr(text.data, text.data + text.len, '\n');
    if (end == NULL) {
        end = text.data + text.len;
    }

    while (end > text.data && (end[-1] == '\r' || end[-1] == ' ')) {
        end--;
    }

    if (end == text.data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "password file \"%V\" is empty", path);
        return NGX_CONF_ERROR;
    }

    p = ngx_pnalloc(cf->pool, end - text.data);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    password->len = end - text.data;
    password->data = ngx_cpymem(p, text.data, password->len) - password->len;

    ngx_explicit_memzero(text.data, text.len);

    return NGX_CONF_OK;
}


#if (NGX_HTTP_SSL)

static char *
ngx_http_civicgate_redis_ssl(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, ngx_str_t *tls_files)
{
    ngx_pool_cleanup_t  *cln;

    rcf->ssl = ngx_pcalloc(cf->pool, sizeof(ngx_ssl_t));
    if (rcf->ssl == NULL) {
        return NGX_CONF_ERROR;
    }

    rcf->ssl->log = cf->log;

    if (ngx_ssl_create(rcf->ssl, NGX_SSL_TLSv1_2|NGX_SSL_TLSv1_3, NULL)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        ngx_ssl_cleanup_ctx(rcf->ssl);
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_ssl_cleanup_ctx;
    cln->data = rcf->ssl;

    if (rcf->tls_name.len == 0) {
        /* NUL-terminated for OpenSSL */
        rcf->tls_name.len = rcf->host.len;
        rcf->tls_name.data = ngx_pnalloc(cf->pool, rcf->host.len + 1);
        if (rcf->tls_name.data == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_memcpy(rcf->tls_name.data, rcf->host.data, rcf->host.len);
        rcf->tls_name.data[rcf->host.len] = '\0';
    }

    rcf->tls_name_ip = (ngx_inet_addr(rcf->tls_name.data, rcf->tls_name.len)
                        != INADDR_NONE
#if (NGX_HAVE_INET6)
                        || ngx_strlchr(rcf->tls_name.data,
                                       rcf->tls_name.data + rcf->tls_name.len,
                                       ':') != NULL
#endif
                       );

    if (rcf->tls_verify) {
        if (tls_files[0].len == 0) {
            return "with rediss:// and tls_verify=on requires "
                   "\"tls_trusted_certificate=\"";
        }

        if (ngx_ssl_trusted_certificate(cf, rcf->ssl, &tls_files[0], 4)
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    if (tls_files[1].len) {
        if (tls_files[2].len == 0) {
            return "has \"tls_certificate=\" without \"tls_certificate_key=\"";
        }

        if (ngx_ssl_certificate(cf, rcf->ssl, &tls_files[1], &tls_files[2],
                                NULL)
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}

#endif


ngx_http_civicgate_redis_script_t *
ngx_http_civicgate_redis_add_script(ngx_conf_t *cf,
    ngx_http_civicgate_redis_conf_t *rcf, const char *body)
{
    u_char                              digest[SHA_DIGEST_LENGTH];
    ngx_http_civicgate_redis_script_t  *script, **sp;

    script = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_redis_script_t));
    if (script == NULL) {
        return NULL;
    }

    script->body.data = (u_char *) body;
    script->body.len = ngx_strlen(body);

    SHA1(script->body.data, script->body.len, digest);
    ngx_hex_dump(script->sha, digest, SHA_DIGEST_LENGTH);

    sp = ngx_array_push(&rcf->scripts);
    if (sp == NULL) {
        return NULL;
    }

    *sp = script;

    return script;
}


void
ngx_http_civicgate_redis_evalsha(ngx_http_civicgate_redis_args_t *a,
    ngx_http_civicgate_redis_script_t *script, const char *nkeys)
{
    a->argc = 0;
    ngx_http_civicgate_redis_arg_str(a, "EVALSHA");
    ngx_http_civicgate_redis_arg(a, script->sha, 40);
    ngx_http_civicgate_redis_arg(a, nkeys, ngx_strlen(nkeys));
}


/* the per-worker client */

ngx_http_civicgate_redis_t *
ngx_http_civicgate_redis_create(ngx_cycle_t *cycle,
    ngx_http_civicgate_redis_conf_t *conf)
{
    ngx_http_civicgate_redis_t  *rc;

    rc = ngx_calloc(sizeof(ngx_http_civicgate_redis_t), cycle->log);
    if (rc == NULL) {
        return NULL;
    }

    rc->out = ngx_alloc(NGX_HTTP_CIVICGATE_REDIS_BUF, cycle->log);
    if (rc->out == NULL) {
        ngx_free(rc);
        return NULL;
    }

    rc->out_size = NGX_HTTP_CIVICGATE_REDIS_BUF;
    rc->conf = conf;
    rc->log = cycle->log;

    ngx_queue_init(&rc->sent);
    ngx_queue_init(&rc->free);

    rc->timer.handler = ngx_http_civicgate_redis_timeout;
    rc->timer.data = rc;
    rc->timer.log = cycle->log;

    rc->reconnect.handler = ngx_http_civicgate_redis_reconnect;
    rc->reconnect.data = rc;
    rc->reconnect.log = cycle->log;
    rc->reconnect.cancelable = 1;

    rc->healthy.handler = ngx_http_civicgate_redis_healthy;
    rc->healthy.data = rc;
    rc->healthy.log = cycle->log;
    rc->healthy.cancelable = 1;

    if (conf->mode == NGX_HTTP_CIVICGATE_REDIS_SENTINEL
        && ngx_http_civicgate_redis_follow(cycle, rc) != NGX_OK)
    {
        ngx_free(rc->out);
        ngx_free(rc);
        return NULL;
    }

    return rc;
}


/*
 * mode=sentinel: the worker's data connections share the connections to
 * the Sentinels, made with the first of them: one asks a Sentinel for the
 * master and listens to it, the others listen to each Sentinel.
 */

static ngx_str_t  ngx_http_civicgate_redis_sentinel_channels[] = {
    ngx_string("+switch-master"),
    ngx_string("+try-failover"),
    ngx_string("-failover-abort-not-elected"),
    ngx_string("-failover-abort-no-good-slave"),
    ngx_string("-failover-abort-slave-timeout")
};


static ngx_int_t
ngx_http_civicgate_redis_follow(ngx_cycle_t *cycle,
    ngx_http_civicgate_redis_t *rc)
{
    ngx_http_civicgate_sentinel_t    *s;
    ngx_http_civicgate_redis_conf_t  *conf;

    conf = rc->conf;
    s = conf->sentinel;

    if (s == NULL) {
        s = ngx_http_civicgate_sentinel_create(cycle->log);
        if (s == NULL) {
            return NGX_ERROR;
        }

        s->fence.handler = ngx_http_civicgate_redis_unfence;
        conf->sentinel = s;

        if (ngx_http_civicgate_redis_listen(cycle, s, conf->sentinels)
            != NGX_OK)
        {
            ngx_http_civicgate_redis_unlisten(s);
            conf->sentinel = NULL;
            return NGX_ERROR;
        }
    }

    return ngx_http_civicgate_sentinel_add_client(s, rc);
}


/* the asking connection, and one listener per Sentinel's address */

static ngx_int_t
ngx_http_civicgate_redis_listen(ngx_cycle_t *cycle,
    ngx_http_civicgate_sentinel_t *s, ngx_http_civicgate_redis_conf_t *sc)
{
    ngx_uint_t                        i, n;
    ngx_http_civicgate_redis_t       *rc;
    ngx_http_civicgate_redis_conf_t  *confs;

    n = ngx_min(sc->naddrs, NGX_HTTP_CIVICGATE_SENTINEL_MAX - 1);

    confs = ngx_alloc(n * sizeof(ngx_http_civicgate_redis_conf_t),
                      cycle->log);
    if (confs == NULL) {
        return NGX_ERROR;
    }

    s->confs = confs;

    for (i = 0; i <= n; i++) {
        if (i == 0) {
            rc = ngx_http_civicgate_redis_create(cycle, sc);

        } else {
            confs[i - 1] = *sc;
            confs[i - 1].addrs = &sc->addrs[i - 1];
            confs[i - 1].naddrs = 1;

            rc = ngx_http_civicgate_redis_create(cycle, &confs[i - 1]);
        }

        if (rc == NULL) {
            return NGX_ERROR;
        }

        rc->on_message = ngx_http_civicgate_redis_announced;
        rc->channels = ngx_http_civicgate_redis_sentinel_channels;
        rc->nchannels = sizeof(ngx_http_civicgate_redis_sentinel_channels)
                        / sizeof(ngx_str_t);
        rc->data = s;
        rc->role = NGX_HTTP_CIVICGATE_REDIS_WATCHER;

        if (i == 0) {
            s->watch = rc;

        } else {
            s->listeners[s->nlisteners++] = rc;
        }
    }

    return NGX_OK;
}


static void
ngx_http_civicgate_redis_unlisten(ngx_http_civicgate_sentinel_t *s)
{
    ngx_uint_t  i;

    if (s->fence.timer_set) {
        ngx_del_timer(&s->fence);
    }

    if (s->watch) {
        ngx_http_civicgate_redis_destroy(s->watch);
    }

    for (i = 0; i < s->nlisteners; i++) {
        ngx_http_civicgate_redis_destroy(s->listeners[i]);
    }

    if (s->confs) {
        ngx_free(s->confs);
    }

    ngx_free(s);
}


static void
ngx_http_civicgate_redis_unfollow(ngx_http_civicgate_redis_t *rc)
{
    ngx_http_civicgate_sentinel_t  *s;

    s = rc->conf->sentinel;

    if (ngx_http_civicgate_sentinel_remove_client(s, rc) != 0) {
        return;
    }

    ngx_http_civicgate_redis_unlisten(s);
    rc->conf->sentinel = NULL;
}


/* the first data connection started starts the Sentinels' */

static void
ngx_http_civicgate_redis_start_sentinels(ngx_http_civicgate_redis_t *rc)
{
    ngx_uint_t                      i;
    ngx_http_civicgate_sentinel_t  *s;

    s = rc->conf->sentinel;

    if (s->watch->ping.handler != NULL) {
        return;
    }

    s->watch->metrics = rc->metrics;
    ngx_http_civicgate_redis_start(s->watch);

    for (i = 0; i < s->nlisteners; i++) {
        s->listeners[i]->metrics = rc->metrics;
        ngx_http_civicgate_redis_start(s->listeners[i]);
    }
}


/* after the caller set the handlers (and, for a subscriber, the channel) */

void
ngx_http_civicgate_redis_start(ngx_http_civicgate_redis_t *rc)
{
    if (rc->on_message) {
        rc->ping.handler = ngx_http_civicgate_redis_ping;
        rc->ping.data = rc;
        rc->ping.log = rc->log;
        rc->ping.cancelable = 1;

        ngx_add_timer(&rc->ping, NGX_HTTP_CIVICGATE_REDIS_PING);
    }

    if (rc->conf->sentinel) {
        ngx_http_civicgate_redis_start_sentinels(rc);
    }

    ngx_http_civicgate_redis_connect(rc);
}


/*
 * A subscriber only listens, so a Redis gone silent (a partition, a
 * stopped process) would go unnoticed: it is pinged, one PING at a time,
 * each held to timeout=; a connection with no whole reply for a ping
 * interval and a timeout, or whose PING is not answered in time, is made
 * again, which resubscribes (and so flushes what the subscription
 * guarded).  A trickle of bytes is not an answer.
 */

static void
ngx_http_civicgate_redis_ping(ngx_event_t *ev)
{
    ngx_msec_t                   elapsed;
    ngx_http_civicgate_redis_t  *rc;

    rc = ev->data;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    if (rc->state != NGX_HTTP_CIVICGATE_REDIS_READY) {
        ngx_add_timer(ev, NGX_HTTP_CIVICGATE_REDIS_PING);
        return;
    }

    elapsed = ngx_current_msec - rc->ping_sent;

    if (rc->pinging) {
        if (elapsed < rc->conf->timeout) {
            ngx_add_timer(ev, rc->conf->timeout - elapsed);
            return;
        }

        ngx_http_civicgate_redis_timedout(rc, "subscription silent");

    } else if (ngx_current_msec - rc->last_read
               > NGX_HTTP_CIVICGATE_REDIS_PING + rc->conf->timeout)
    {
        ngx_http_civicgate_redis_timedout(rc, "subscription silent");

    } else if (elapsed < NGX_HTTP_CIVICGATE_REDIS_PING) {
        ngx_add_timer(ev, NGX_HTTP_CIVICGATE_REDIS_PING - elapsed);
        return;

    } else if (ngx_http_civicgate_redis_send_ping(rc) == NGX_OK) {
        ngx_add_timer(ev, ngx_min(rc->conf->timeout,
                                  NGX_HTTP_CIVICGATE_REDIS_PING));
        return;
    }

    ngx_add_timer(ev, NGX_HTTP_CIVICGATE_REDIS_PING);
}


static ngx_int_t
ngx_http_civicgate_redis_send_ping(ngx_http_civicgate_redis_t *rc)
{
    int          n;
    char        *buf;
    size_t       len;
    ngx_int_t    rv;
    const char  *argv;

    argv = "PING";
    len = 4;
    n = redisFormatCommandArgv(&buf, 1, &argv, &len);

    if (n < 0) {
        return NGX_ERROR;
    }

    rv = ngx_http_civicgate_redis_append(rc, buf, n);
    redisFreeCommand(buf);

    if (rv != NGX_OK) {
        return NGX_ERROR;
    }

    rc->pinging = 1;
    rc->ping_sent = ngx_current_msec;

    ngx_http_civicgate_redis_post_write(rc);

    return NGX_OK;
}


/* a subscribed connection answers PING with ["pong", ""] */

static ngx_uint_t
ngx_http_civicgate_redis_pong(redisReply *reply)
{
    redisReply  *e;

    if (reply->type == REDIS_REPLY_STATUS) {
        e = reply;

    } else if (reply->type == REDIS_REPLY_ARRAY && reply->elements > 0) {
        e = reply->element[0];

    } else {
        return 0;
    }

    return (e->type == REDIS_REPLY_STRING || e->type == REDIS_REPLY_STATUS)
           && e->len == 4 && ngx_strncasecmp((u_char *) e->str,
                                             (u_char *) "pong", 4) == 0;
}


void
ngx_http_civicgate_redis_destroy(ngx_http_civicgate_redis_t *rc)
{
    ngx_queue_t                     *q;
    ngx_http_civicgate_redis_cmd_t  *cmd;

    rc->state = NGX_HTTP_CIVICGATE_REDIS_CLOSED;

    ngx_http_civicgate_redis_close(rc);

    if (rc->reconnect.timer_set) {
        ngx_del_timer(&rc->reconnect);
    }

    if (rc->ping.timer_set) {
        ngx_del_timer(&rc->ping);
    }

    while (!ngx_queue_empty(&rc->free)) {
        q = ngx_queue_head(&rc->free);
        ngx_queue_remove(q);
        cmd = ngx_queue_data(q, ngx_http_civicgate_redis_cmd_t, queue);
        ngx_free(cmd);
    }

    if (rc->conf->sentinel) {
        ngx_http_civicgate_redis_unfollow(rc);
    }

    ngx_free(rc->out);
    ngx_free(rc);
}


static void
ngx_http_civicgate_redis_peer_init(ngx_http_civicgate_redis_t *rc)
{
    ngx_addr_t  *addr;

    addr = rc->conf->sentinel ? &rc->conf->sentinel->addr
                              : &rc->conf->addrs[rc->addr];

    ngx_memzero(&rc->peer, sizeof(ngx_peer_connection_t));

    rc->peer.sockaddr = addr->sockaddr;
    rc->peer.socklen = addr->socklen;
    rc->peer.name = &addr->name;
    rc->peer.get = ngx_event_get_peer;
    rc->peer.log_error = rc->failures ? NGX_ERROR_INFO : NGX_ERROR_ERR;

    /*
     * nginx logs a connect() refused at once at "error" level: during an
     * outage that line is left out, and logged here at "info" instead
     */
    rc->connect_log = *rc->log;
    rc->peer.log = &rc->connect_log;

    if (rc->failures) {
        rc->connect_log.log_level = NGX_LOG_CRIT;
    }
}


static void
ngx_http_civicgate_redis_connect(ngx_http_civicgate_redis_t *rc)
{
    ngx_int_t          rv;
    ngx_connection_t  *c;

    /* no master known, or a failover under way: wait for the Sentinel */
    if (rc->conf->sentinel
        && (!rc->conf->sentinel->known || rc->conf->sentinel->fencers))
    {
        rc->state = NGX_HTTP_CIVICGATE_REDIS_IDLE;
        return;
    }

    ngx_http_civicgate_redis_peer_init(rc);

    rc->pool = ngx_create_pool(1024, rc->log);
    rc->reader = redisReaderCreate();

    if (rc->pool == NULL || rc->reader == NULL) {
        ngx_http_civicgate_redis_fail(rc, "out of memory");
        return;
    }

    rc->loading = ngx_pcalloc(rc->pool, rc->conf->scripts.nelts + 1);
    if (rc->loading == NULL) {
        ngx_http_civicgate_redis_fail(rc, "out of memory");
        return;
    }

    rc->state = NGX_HTTP_CIVICGATE_REDIS_CONNECTING;

    rv = ngx_event_connect_peer(&rc->peer);

    if (rv == NGX_DECLINED) {
        if (rc->failures) {
            ngx_log_error(NGX_LOG_INFO, rc->log, ngx_socket_errno,
                          "civicgate: redis %V connect() to %V failed",
                          &rc->conf->url, rc->peer.name);
        }

        ngx_http_civicgate_redis_connect_failed(rc,
                                      NGX_HTTP_CIVICGATE_REDIS_ERR_CONNECTION);
        return;
    }

    if (rv == NGX_ERROR || rv == NGX_BUSY) {
        ngx_http_civicgate_redis_fail(rc, "connect failed");
        return;
    }

    if (ngx_http_civicgate_redis_attach(rc) != NGX_OK) {
        return;
    }

    c = rc->peer.connection;

    if (rv == NGX_AGAIN) {
        ngx_add_timer(c->write, rc->conf->connect_timeout);
        return;
    }

    ngx_http_civicgate_redis_connected(c->write);
}


/* the new connection: this client's, its handlers and its queue */

static ngx_int_t
ngx_http_civicgate_redis_attach(ngx_http_civicgate_redis_t *rc)
{
    ngx_connection_t  *c;

    c = rc->peer.connection;
    c->data = rc;
    c->pool = rc->pool;
    c->log = rc->log;
    c->read->log = rc->log;
    c->write->log = rc->log;

    /*
     * Commands are pipelined: without TCP_NODELAY, one written while an
     * earlier one is unanswered waits for that answer (Nagle).
     */
    if (rc->peer.sockaddr->sa_family != AF_UNIX
        && ngx_tcp_nodelay(c) != NGX_OK)
    {
        ngx_http_civicgate_redis_fail(rc, "setsockopt(TCP_NODELAY) failed");
        return NGX_ERROR;
    }

    /* a refused connection may first show as readable */
    c->read->handler = ngx_http_civicgate_redis_connected;
    c->write->handler = ngx_http_civicgate_redis_connected;

    if (ngx_http_civicgate_redis_queue_setup(rc) != NGX_OK) {
        ngx_http_civicgate_redis_fail(rc, "out of memory");
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * An address did not answer: the next one at once, as nginx's upstream
 * does; after the last, the round ends and a reconnect is scheduled.
 */

static void
ngx_http_civicgate_redis_connect_failed(ngx_http_civicgate_redis_t *rc,
    ngx_uint_t kind)
{
    ngx_http_civicgate_redis_metric(rc, redis_errors, kind, 1);

    if (rc->tried + 1 >= rc->conf->naddrs
        || rc->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED
        || ngx_exiting || ngx_quit || ngx_terminate)
    {
        ngx_http_civicgate_redis_drop(rc, NULL);
        return;
    }

    rc->tried++;
    rc->addr = (rc->addr + 1) % rc->conf->naddrs;

    ngx_http_civicgate_redis_close(rc);
    ngx_http_civicgate_redis_connect(rc);
}


/* AUTH, SELECT, CLIENT SETNAME and SCRIPT EXISTS go first, pipelined */

static ngx_int_t
ngx_http_civicgate_redis_queue_setup(ngx_http_civicgate_redis_t *rc)
{
    const char                          *argv[3];
    size_t                               lens[3];
    u_char                               db[NGX_INT_T_LEN];
    u_char                               name[32];
    size_t                               name_len;
    ngx_uint_t                           i;
    ngx_http_civicgate_redis_conf_t     *conf;

    conf = rc->conf;
    rc->setup = 0;
    name_len = ngx_sprintf(name, "civicgate-%P", ngx_pid) - name;

#define ngx_http_civicgate_redis_setup(n)                                     \
    if (ngx_http_civicgate_redis_send(rc, n, argv, lens,                      \
                                      ngx_http_civicgate_redis_setup_handler, \
                                      rc)                                     \
        == NULL)                                                              \
    {                                                                         \
        return NGX_ERROR;                                                     \
    }                                                                         \
    rc->setup++

    if (conf->password.len) {
        argv[0] = "AUTH";
        lens[0] = 4;
        i = 1;

        if (conf->user.len) {
            argv[i] = (const char *) conf->user.data;
            lens[i++] = conf->user.len;
        }

        argv[i] = (const char *) conf->password.data;
        lens[i++] = conf->password.len;

        ngx_http_civicgate_redis_setup(i);
    }

    if (conf->db) {
        argv[0] = "SELECT";
        lens[0] = 6;
        argv[1] = (const char *) db;
        lens[1] = ngx_sprintf(db, "%ui", conf->db) - db;

        ngx_http_civicgate_redis_setup(2);
    }

    /* ops and tests tell the gateways' connections apart by name */
    argv[0] = "CLIENT";
    lens[0] = 6;
    argv[1] = "SETNAME";
    lens[1] = 7;
    argv[2] = (const char *) name;
    lens[2] = name_len;

    ngx_http_civicgate_redis_setup(3);

#undef ngx_http_civicgate_redis_setup

    if (ngx_http_civicgate_redis_queue_sentinel(rc) != NGX_OK) {
        return NGX_ERROR;
    }

    if (rc->on_message) {
        return ngx_http_civicgate_redis_subscribe(rc);
    }

    return ngx_http_civicgate_redis_scripts_exist(rc);
}


/*
 * A server named by the Sentinels is used only once it says "master"; the
 * Sentinel connection that watches asks for the master as it connects.
 */

static ngx_int_t
ngx_http_civicgate_redis_queue_sentinel(ngx_http_civicgate_redis_t *rc)
{
    const char  *argv[1];
    size_t       lens[1];

    if (rc->conf->sentinel) {
        argv[0] = "ROLE";
        lens[0] = 4;

        if (ngx_http_civicgate_redis_send(rc, 1, argv, lens,
                                          ngx_http_civicgate_redis_role, rc)
            == NULL)
        {
            return NGX_ERROR;
        }

        rc->setup++;
    }

    if (rc->role == NGX_HTTP_CIVICGATE_REDIS_WATCHER
        && ((ngx_http_civicgate_sentinel_t *) rc->data)->watch == rc
        && ngx_http_civicgate_redis_ask(rc) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * One SCRIPT EXISTS per connection; only the scripts Redis lacks are
 * loaded, so a reload or a reconnect does not send every script again.
 */

static ngx_int_t
ngx_http_civicgate_redis_scripts_exist(ngx_http_civicgate_redis_t *rc)
{
    size_t                              *lens;
    ngx_uint_t                           i, n;
    const char                         **argv;
    ngx_http_civicgate_redis_script_t  **script;

    n = rc->conf->scripts.nelts;
    script = rc->conf->scripts.elts;

    if (n == 0) {
        return NGX_OK;
    }

    argv = ngx_palloc(rc->pool, (n + 2) * sizeof(char *));
    lens = ngx_palloc(rc->pool, (n + 2) * sizeof(size_t));

    if (argv == NULL || lens == NULL) {
        return NGX_ERROR;
    }

    argv[0] = "SCRIPT";
    lens[0] = 6;
    argv[1] = "EXISTS";
    lens[1] = 6;

    for (i = 0; i < n; i++) {
        argv[i + 2] = (const char *) script[i]->sha;
        lens[i + 2] = 40;
    }

    if (ngx_http_civicgate_redis_send(rc, n + 2, argv, lens,
                                      ngx_http_civicgate_redis_exist_handler,
                                      rc)
        == NULL)
    {
        return NGX_ERROR;
    }

    rc->setup++;

    return NGX_OK;
}


/*
 * An ACL written before SCRIPT EXISTS was used may refuse it (NOPERM):
 * every script is then loaded, as it always was.
 */

static void
ngx_http_civicgate_redis_exist_handler(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_uint_t                   i;
    ngx_http_civicgate_redis_t  *rc = cmd->data;

    if (reply == NULL) {
        return;
    }

    for (i = 0; i < rc->conf->scripts.nelts; i++) {
        if (reply->type == REDIS_REPLY_ARRAY && i < reply->elements
            && reply->element[i]->type == REDIS_REPLY_INTEGER
            && reply->element[i]->integer == 1)
        {
            continue;
        }

        /* pipelined ahead of every command sent from now on */
        if (ngx_http_civicgate_redis_script_load(rc, i) != NGX_OK) {
            ngx_http_civicgate_redis_fail(rc, "out of memory");
            return;
        }
    }

    if (--rc->setup == 0) {
        ngx_http_civicgate_redis_start_io(rc);
    }
}


/*
 * SUBSCRIBE has no command record: its confirmations, like every message
 * after them, arrive when no command waits, and go to on_message.
 */

static ngx_int_t
ngx_http_civicgate_redis_subscribe(ngx_http_civicgate_redis_t *rc)
{
    size_t       lens[8];
    ngx_uint_t   i;
    const char  *argv[8];

    argv[0] = "SUBSCRIBE";
    lens[0] = 9;

    for (i = 0; i < rc->nchannels && i < 7; i++) {
        argv[i + 1] = (const char *) rc->channels[i].data;
        lens[i + 1] = rc->channels[i].len;
    }

    return ngx_http_civicgate_redis_push(rc, i + 1, argv, lens);
}


/* a command whose replies go to on_message: (UN)SUBSCRIBE */

ngx_int_t
ngx_http_civicgate_redis_push(ngx_http_civicgate_redis_t *rc, int argc,
    const char **argv, const size_t *argvlen)
{
    int    n;
    char  *buf;

    n = redisFormatCommandArgv(&buf, argc, argv, argvlen);
    if (n < 0) {
        return NGX_ERROR;
    }

    if (ngx_http_civicgate_redis_append(rc, buf, n) != NGX_OK) {
        redisFreeCommand(buf);
        return NGX_ERROR;
    }

    redisFreeCommand(buf);

    if (rc->state == NGX_HTTP_CIVICGATE_REDIS_READY) {
        ngx_http_civicgate_redis_post_write(rc);
    }

    return NGX_OK;
}


static void
ngx_http_civicgate_redis_setup_handler(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_http_civicgate_redis_t  *rc = cmd->data;

    if (reply == NULL) {
        return;
    }

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_log_error(ngx_http_civicgate_redis_level(rc), rc->log, 0,
                      "civicgate: redis %V refused setup: %*s",
                      &rc->conf->url, (size_t) reply->len, reply->str);
        ngx_http_civicgate_redis_fail(rc, NULL);
        return;
    }

    if (--rc->setup == 0) {
        ngx_http_civicgate_redis_start_io(rc);
    }
}


/* the Sentinel is asked for the master before it is subscribed to */

static ngx_int_t
ngx_http_civicgate_redis_ask(ngx_http_civicgate_redis_t *rc)
{
    size_t       lens[3];
    const char  *argv[3];

    argv[0] = "SENTINEL";
    lens[0] = 8;
    argv[1] = "get-master-addr-by-name";
    lens[1] = 23;
    argv[2] = (const char *) rc->conf->master.data;
    lens[2] = rc->conf->master.len;

    if (ngx_http_civicgate_redis_send(rc, 3, argv, lens,
                                      ngx_http_civicgate_redis_located, rc)
        == NULL)
    {
        return NGX_ERROR;
    }

    rc->setup++;

    return NGX_OK;
}


/*
 * A Sentinel that does not know the master, or answers nonsense, is left
 * for the next one.
 */

static void
ngx_http_civicgate_redis_located(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_int_t                       rv;
    ngx_http_civicgate_redis_t     *watch = cmd->data;
    ngx_http_civicgate_sentinel_t  *s;

    if (reply == NULL) {
        return;
    }

    s = watch->data;

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_log_error(ngx_http_civicgate_redis_level(watch), watch->log, 0,
                      "civicgate: redis Sentinel %V at %V refused the "
                      "question: %*s", &watch->conf->url, watch->peer.name,
                      (size_t) reply->len, reply->str);

        watch->good = (watch->addr + 1) % watch->conf->naddrs;
        ngx_http_civicgate_redis_fail(watch, NULL);
        return;
    }

    rv = ngx_http_civicgate_sentinel_master_reply(s, reply);

    if (rv == NGX_OK && ngx_http_civicgate_sentinel_stale(s)) {
        ngx_log_error(NGX_LOG_INFO, watch->log, 0,
                      "civicgate: redis Sentinel %V at %V still names %V, "
                      "replaced", &watch->conf->url, watch->peer.name,
                      &s->next.name);
        rv = NGX_ERROR;
    }

    if (rv != NGX_OK) {
        ngx_log_error(ngx_http_civicgate_redis_level(watch), watch->log, 0,
                      "civicgate: redis Sentinel %V at %V %s master \"%V\"",
                      &watch->conf->url, watch->peer.name,
                      rv == NGX_DECLINED ? "does not know"
                                         : "gave no usable address for",
                      &watch->conf->master);

        watch->good = (watch->addr + 1) % watch->conf->naddrs;
        ngx_http_civicgate_redis_fail(watch, NULL);
        return;
    }

    ngx_http_civicgate_redis_adopt(watch);

    s->asking = 0;

    if (--watch->setup == 0) {
        ngx_http_civicgate_redis_start_io(watch);
    }
}


/* what a Sentinel announces on the channels subscribed to */

static void
ngx_http_civicgate_redis_announced(ngx_http_civicgate_redis_t *from,
    redisReply *reply)
{
    uint32_t                        bit;
    ngx_http_civicgate_sentinel_t  *s;

    s = from->data;

    switch (ngx_http_civicgate_sentinel_message(s, &from->conf->master,
                                                reply))
    {
    case NGX_HTTP_CIVICGATE_SENTINEL_SWITCH:
        /* a switch is never announced for an older configuration */
        ngx_http_civicgate_redis_adopt(s->watch);
        break;

    case NGX_HTTP_CIVICGATE_SENTINEL_FENCE_ON:
        ngx_http_civicgate_redis_hold(from);
        break;

    case NGX_HTTP_CIVICGATE_SENTINEL_ABORT:
        bit = ngx_http_civicgate_redis_fencer(from);

        /* Sentinels not elected give up while the leader goes on */
        if (s->fencers & bit) {
            s->fencers &= ~bit;

            if (s->fencers == 0) {
                ngx_log_error(NGX_LOG_INFO, from->log, 0,
                              "civicgate: redis master \"%V\": failover "
                              "given up", &from->conf->master);
                ngx_http_civicgate_redis_unfence(&s->fence);
            }
        }

        break;

    default: /* NGX_HTTP_CIVICGATE_SENTINEL_NONE */
        break;
    }
}


/*
 * The address just read becomes the master's: a new one closes the data
 * connections (failing their commands in flight) and connects them to it
 * at once; those waiting for an address connect too.
 */

static void
ngx_http_civicgate_redis_adopt(ngx_http_civicgate_redis_t *watch)
{
    ngx_int_t                       rv;
    ngx_uint_t                      i;
    ngx_http_civicgate_redis_t     *rc;
    ngx_http_civicgate_sentinel_t  *s;

    s = watch->data;
    rv = ngx_http_civicgate_sentinel_adopt(s, &watch->conf->master,
                                           watch->log);

    if (rv == NGX_DONE && ngx_worker == 0 && watch->metrics) {
        ngx_http_civicgate_metrics_add(watch->metrics,
                                       watch->metrics->redis_failovers, 0, 1);
    }

    s->fencers = 0;

    if (s->fence.timer_set) {
        ngx_del_timer(&s->fence);
    }

    /* no question to the Sentinel from the loop below */
    s->asking = 1;

    for (i = 0; i < s->nclients; i++) {
        rc = s->clients[i];

        if (rc->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED) {
            continue;
        }

        if (rv == NGX_DECLINED
            && (rc->state != NGX_HTTP_CIVICGATE_REDIS_IDLE
                || rc->reconnect.timer_set))
        {
            continue;
        }

        if (rc->reconnect.timer_set) {
            ngx_del_timer(&rc->reconnect);
        }

        ngx_http_civicgate_redis_close(rc);
        ngx_http_civicgate_redis_connect(rc);
    }

    s->asking = 0;
}


/*
 * A failover of the master started (announced by the Sentinel leading
 * it): nothing more is written to the old master, whose late writes the
 * new one would not have, until the switch, its abort, or the fence's end.
 */

static void
ngx_http_civicgate_redis_hold(ngx_http_civicgate_redis_t *from)
{
    ngx_uint_t                      i, level;
    ngx_http_civicgate_redis_t     *rc;
    ngx_http_civicgate_sentinel_t  *s;

    s = from->data;

    if (s->fencers) {
        s->fencers |= ngx_http_civicgate_redis_fencer(from);
        return;
    }

    level = ngx_worker == 0 ? NGX_LOG_NOTICE : NGX_LOG_INFO;

    ngx_log_error(level, from->log, 0, "civicgate: redis master \"%V\": "
                  "failover started, writes held back", &from->conf->master);

    s->fencers = ngx_http_civicgate_redis_fencer(from);
    ngx_add_timer(&s->fence, NGX_HTTP_CIVICGATE_SENTINEL_FENCE);

    for (i = 0; i < s->nclients; i++) {
        rc = s->clients[i];

        if (rc->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED) {
            continue;
        }

        if (rc->reconnect.timer_set) {
            ngx_del_timer(&rc->reconnect);
        }

        ngx_http_civicgate_redis_close(rc);
    }
}


/* one bit per Sentinel connection: which of them announced a failover */

static uint32_t
ngx_http_civicgate_redis_fencer(ngx_http_civicgate_redis_t *rc)
{
    ngx_uint_t                      i;
    ngx_http_civicgate_sentinel_t  *s;

    s = rc->data;

    for (i = 0; i < s->nlisteners; i++) {
        if (s->listeners[i] == rc) {
            return (uint32_t) 1 << (i + 1);
        }
    }

    return 1;
}


/* the failover ended without a switch seen: the Sentinels say where */

static void
ngx_http_civicgate_redis_unfence(ngx_event_t *ev)
{
    ngx_http_civicgate_sentinel_t  *s;

    s = ev->data;

    if (ev->timer_set) {
        ngx_del_timer(ev);
    }

    s->fencers = 0;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    s->asking = 0;
    ngx_http_civicgate_redis_ask_again(s);
}


/*
 * The Sentinel is asked again by connecting to it anew (a subscribed
 * connection takes no other command); one question at a time.
 */

static void
ngx_http_civicgate_redis_ask_again(ngx_http_civicgate_sentinel_t *s)
{
    ngx_http_civicgate_redis_t  *watch;

    watch = s->watch;

    if (s->asking || watch->state != NGX_HTTP_CIVICGATE_REDIS_READY
        || ngx_exiting || ngx_quit || ngx_terminate)
    {
        return;
    }

    s->asking = 1;

    ngx_http_civicgate_redis_close(watch);
    ngx_http_civicgate_redis_connect(watch);
}


static void
ngx_http_civicgate_redis_role(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_str_t                    role;
    ngx_http_civicgate_redis_t  *rc = cmd->data;

    if (reply == NULL) {
        return;
    }

    if (!ngx_http_civicgate_sentinel_role(reply, &role)) {
        ngx_log_error(ngx_http_civicgate_redis_level(rc), rc->log, 0,
                      "civicgate: redis %V at %V is not the master "
                      "(role \"%V\")", &rc->conf->url, rc->peer.name, &role);
        ngx_http_civicgate_redis_fail(rc, NULL);
        return;
    }

    if (--rc->setup == 0) {
        ngx_http_civicgate_redis_start_io(rc);
    }
}


static void
ngx_http_civicgate_redis_connected(ngx_event_t *ev)
{
    int                          err;
    socklen_t                    len;
    ngx_connection_t            *c;
    ngx_http_civicgate_redis_t  *rc;

    c = ev->data;
    rc = c->data;

    if (ev->timedout) {
        ngx_log_error(ngx_http_civicgate_redis_level(rc), rc->log,
                      NGX_ETIMEDOUT, "civicgate: redis %V connect() to %V "
                      "timed out", &rc->conf->url, rc->peer.name);
        ngx_http_civicgate_redis_connect_failed(rc,
                                         NGX_HTTP_CIVICGATE_REDIS_ERR_TIMEOUT);
        return;
    }

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    err = 0;
    len = sizeof(int);

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len) == -1) {
        err = ngx_socket_errno;
    }

    if (err) {
        ngx_log_error(ngx_http_civicgate_redis_level(rc), rc->log, err,
                      "civicgate: redis %V connect() to %V failed",
                      &rc->conf->url, rc->peer.name);
        ngx_http_civicgate_redis_connect_failed(rc,
                                      NGX_HTTP_CIVICGATE_REDIS_ERR_CONNECTION);
        return;
    }

    c->read->handler = ngx_http_civicgate_redis_read;

#if (NGX_HTTP_SSL)
    if (rc->conf->ssl) {
        ngx_http_civicgate_redis_ssl_start(rc);
        return;
    }
#endif

    rc->connected = 1;
    rc->connected_at = ngx_current_msec;

    c->write->handler = ngx_http_civicgate_redis_write;
    ngx_http_civicgate_redis_write(c->write);

    if (rc->setup == 0 && rc->peer.connection) {
        ngx_http_civicgate_redis_start_io(rc);
    }
}


#if (NGX_HTTP_SSL)

static void
ngx_http_civicgate_redis_ssl_start(ngx_http_civicgate_redis_t *rc)
{
    ngx_int_t          rv;
    ngx_connection_t  *c;

    c = rc->peer.connection;

    if (ngx_ssl_create_connection(rc->conf->ssl, c, NGX_SSL_CLIENT)
        != NGX_OK)
    {
        ngx_http_civicgate_redis_fail(rc, "TLS setup failed");
        return;
    }

    /* RFC 6066: no server name indication for an address */
    if (rc->conf->tls_name.len && !rc->conf->tls_name_ip
        && SSL_set_tlsext_host_name(c->ssl->connection,
                                    (char *) rc->conf->tls_name.data)
           == 0)
    {
        ngx_http_civicgate_redis_fail(rc, "TLS server name failed");
        return;
    }

    rv = ngx_ssl_handshake(c);

    if (rv == NGX_AGAIN) {
        c->ssl->handler = ngx_http_civicgate_redis_ssl_handshake;
        ngx_add_timer(c->write, rc->conf->connect_timeout);
        return;
    }

    ngx_http_civicgate_redis_ssl_handshake(c);
}


static void
ngx_http_civicgate_redis_ssl_handshake(ngx_connection_t *c)
{
    long                         rv;
    ngx_http_civicgate_redis_t  *rc;

    rc = c->data;

    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }

    if (!c->ssl->handshaked) {
        ngx_http_civicgate_redis_fail(rc, "TLS handshake failed");
        return;
    }

    if (rc->conf->tls_verify) {
        rv = SSL_get_verify_result(c->ssl->connection);

        if (rv != X509_V_OK) {
            ngx_log_error(ngx_http_civicgate_redis_level(rc), rc->log, 0,
                          "civicgate: redis %V certificate verify error: "
                          "(%l:%s)", &rc->conf->url, rv,
                          X509_verify_cert_error_string(rv));
            ngx_http_civicgate_redis_fail(rc, NULL);
            return;
        }

        if (ngx_http_civicgate_redis_check_name(rc) != NGX_OK) {
            ngx_log_error(ngx_http_civicgate_redis_level(rc), rc->log, 0,
                          "civicgate: redis %V certificate does not match "
                          "\"%V\"", &rc->conf->url, &rc->conf->tls_name);
            ngx_http_civicgate_redis_fail(rc, NULL);
            return;
        }
    }

    rc->connected = 1;
    rc->connected_at = ngx_current_msec;

    c->read->handler = ngx_http_civicgate_redis_read;
    c->write->handler = ngx_http_civicgate_redis_write;

    ngx_http_civicgate_redis_write(c->write);

    if (rc->setup == 0 && rc->peer.connection) {
        ngx_http_civicgate_redis_start_io(rc);
    }
}


/* nginx's own check knows DNS names only: addresses are checked here */

static ngx_int_t
ngx_http_civicgate_redis_check_name(ngx_http_civicgate_redis_t *rc)
{
    int                rv;
    X509              *cert;
    ngx_connection_t  *c;

    c = rc->peer.connection;

    if (!rc->conf->tls_name_ip) {
        return ngx_ssl_check_host(c, &rc->conf->tls_name);
    }

    cert = SSL_get_peer_certificate(c->ssl->connection);
    if (cert == NULL) {
        return NGX_ERROR;
    }

    rv = X509_check_ip_asc(cert, (char *) rc->conf->tls_name.data, 0);

    X509_free(cert);

    return rv == 1 ? NGX_OK : NGX_ERROR;
}

#endif


static void
ngx_http_civicgate_redis_start_io(ngx_http_civicgate_redis_t *rc)
{
    ngx_uint_t  level;

    /* a connection that keeps dropping says so once */
    if (rc->failures) {
        level = rc->recovered ? NGX_LOG_INFO : NGX_LOG_NOTICE;
        rc->recovered = 1;

        ngx_log_error(level, rc->log, 0, "civicgate: redis %V connected again",
                      &rc->conf->url);
    }

    rc->state = NGX_HTTP_CIVICGATE_REDIS_READY;
    rc->last_read = ngx_current_msec;
    rc->good = rc->addr;

    ngx_add_timer(&rc->healthy, NGX_HTTP_CIVICGATE_REDIS_HEALTHY);

    if (rc->metrics && !rc->counted) {
        rc->counted = 1;
        ngx_http_civicgate_redis_metric(rc, redis_connections, rc->role, 1);
    }

    if (rc->on_ready) {
        rc->on_ready(rc);
    }
}


/* ready for the healthy period: an outage from now on is a new one */

static void
ngx_http_civicgate_redis_healthy(ngx_event_t *ev)
{
    ngx_http_civicgate_redis_t  *rc;

    rc = ev->data;

    rc->failures = 0;
    rc->recovered = 0;
}


ngx_http_civicgate_redis_cmd_t *
ngx_http_civicgate_redis_send(ngx_http_civicgate_redis_t *rc, int argc,
    const char **argv, const size_t *argvlen,
    ngx_http_civicgate_redis_handler_pt handler, void *data)
{
    ngx_http_civicgate_redis_cmd_t  *cmd;

    if (rc->route) {
        return rc->route(rc, argc, argv, argvlen, handler, data);
    }

    if (!ngx_http_civicgate_redis_accepting(rc)) {
        return NULL;
    }

    cmd = ngx_http_civicgate_redis_prepare(rc, argc, argv, argvlen, handler,
                                           data);
    if (cmd == NULL) {
        return NULL;
    }

    if (ngx_http_civicgate_redis_append(rc, cmd->retry, cmd->retry_len)
        != NGX_OK)
    {
        ngx_http_civicgate_redis_cmd_free(rc, cmd);
        return NULL;
    }

    /* a cluster node's command may have to be sent again elsewhere */
    if (!cmd->script && !rc->redirect) {
        redisFreeCommand(cmd->retry);
        cmd->retry = NULL;
    }

    ngx_http_civicgate_redis_enqueue(rc, cmd);

    return cmd;
}


/* a command formatted, kept in cmd->retry, and counted; not yet queued */

ngx_http_civicgate_redis_cmd_t *
ngx_http_civicgate_redis_prepare(ngx_http_civicgate_redis_t *rc, int argc,
    const char **argv, const size_t *argvlen,
    ngx_http_civicgate_redis_handler_pt handler, void *data)
{
    int                              n;
    char                            *buf;
    ngx_http_civicgate_redis_cmd_t  *cmd;

    n = redisFormatCommandArgv(&buf, argc, argv, argvlen);
    if (n < 0) {
        return NULL;
    }

    cmd = ngx_http_civicgate_redis_cmd_alloc(rc);
    if (cmd == NULL) {
        redisFreeCommand(buf);
        return NULL;
    }

    cmd->script = ngx_http_civicgate_redis_script_of(rc, argc, argv, argvlen);
    cmd->retried = 0;
    cmd->redirects = 0;
    cmd->slot = -1;
    cmd->retry = buf;
    cmd->retry_len = n;
    cmd->handler = handler;
    cmd->data = data;
    cmd->sent = ngx_current_msec;
    cmd->began = cmd->sent;
    cmd->redis = rc;

    if (rc->metrics) {
        cmd->queued_us = ngx_http_civicgate_redis_now_us();
        ngx_http_civicgate_redis_metric(rc, redis_commands, 0, 1);
    }

    return cmd;
}


/*
 * An error reply: a refusal repeats for every request, so it is logged at
 * most once per interval for each kind of command.  A NOSCRIPT gets here
 * only if the command already failed once with it and was sent again
 * after a SCRIPT LOAD.
 */

void
ngx_http_civicgate_redis_refused(ngx_http_civicgate_redis_t *rc,
    redisReply *reply, const char *what,
    ngx_http_civicgate_log_limit_t *logged)
{
    if (reply == NULL || reply->type != REDIS_REPLY_ERROR) {
        return;
    }

    if (ngx_http_civicgate_log_due(logged)) {
        ngx_log_error(NGX_LOG_ERR, rc->log, 0,
                      "civicgate: redis refused %s: %*s", what,
                      (size_t) reply->len, reply->str);
    }
}


/* the owner is gone (e.g. the client aborted): drop the reply when due */

void
ngx_http_civicgate_redis_detach(ngx_http_civicgate_redis_cmd_t *cmd)
{
    cmd->handler = NULL;
    cmd->data = NULL;
}


/*
 * mode=cluster: a command answered with a redirection goes to another
 * node's connection, as it was formatted, behind an ASKING if asked to;
 * a connection that takes no commands fails it at once.
 */

ngx_int_t
ngx_http_civicgate_redis_requeue(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd, ngx_uint_t asking)
{
    const char  *argv[1];
    size_t       lens[1];

    argv[0] = "ASKING";
    lens[0] = 6;

    if (!ngx_http_civicgate_redis_accepting(rc)
        || cmd->retry == NULL
        || (asking
            && ngx_http_civicgate_redis_send(rc, 1, argv, lens, NULL, NULL)
               == NULL)
        || ngx_http_civicgate_redis_append(rc, cmd->retry, cmd->retry_len)
           != NGX_OK)
    {
        ngx_http_civicgate_redis_abandon(cmd, rc);
        return NGX_ERROR;
    }

    cmd->redis = rc;
    cmd->sent = ngx_current_msec;

    ngx_http_civicgate_redis_enqueue(rc, cmd);

    return NGX_OK;
}


/* a command that is in no queue fails: its handler sees no reply */

void
ngx_http_civicgate_redis_abandon(ngx_http_civicgate_redis_cmd_t *cmd,
    ngx_http_civicgate_redis_t *owner)
{
    cmd->redis = owner;

    if (cmd->handler) {
        cmd->handler(cmd, NULL);
    }

    ngx_http_civicgate_redis_cmd_free(owner, cmd);
}


/* a command whose bytes are in the output: its reply is awaited */

static void
ngx_http_civicgate_redis_enqueue(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd)
{
    ngx_queue_insert_tail(&rc->sent, &cmd->queue);
    rc->nsent++;

    if (!rc->timer.timer_set) {
        ngx_add_timer(&rc->timer, rc->conf->timeout);
    }

    ngx_http_civicgate_redis_post_write(rc);
}


static ngx_int_t
ngx_http_civicgate_redis_append(ngx_http_civicgate_redis_t *rc,
    const char *buf, size_t len)
{
    u_char  *out;
    size_t   size;

    if (rc->out_len + len > rc->out_size) {
        if (rc->out_pos) {
            ngx_memmove(rc->out, rc->out + rc->out_pos,
                        rc->out_len - rc->out_pos);
            rc->out_len -= rc->out_pos;
            rc->out_pos = 0;
        }

        size = ngx_max(rc->out_size, NGX_HTTP_CIVICGATE_REDIS_BUF);

        while (rc->out_len + len > size) {
            size *= 2;
        }

        if (size > NGX_HTTP_CIVICGATE_REDIS_OUT_MAX) {
            return NGX_ERROR;
        }

        if (size != rc->out_size) {
            out = ngx_alloc(size, rc->log);
            if (out == NULL) {
                return NGX_ERROR;
            }

            ngx_memcpy(out, rc->out, rc->out_len);
            ngx_free(rc->out);
            rc->out = out;
            rc->out_size = size;
        }
    }

    ngx_memcpy(rc->out + rc->out_len, buf, len);
    rc->out_len += len;

    return NGX_OK;
}


/* writes are coalesced: one send per event loop iteration */

static void
ngx_http_civicgate_redis_post_write(ngx_http_civicgate_redis_t *rc)
{
    ngx_connection_t  *c;

    c = rc->peer.connection;

    if (c == NULL || c->write->handler != ngx_http_civicgate_redis_write) {
        return;
    }

    if (!c->write->posted) {
        ngx_post_event(c->write, &ngx_posted_events);
    }
}


static void
ngx_http_civicgate_redis_write(ngx_event_t *wev)
{
    u_char                      *out;
    ssize_t                      n;
    ngx_connection_t            *c;
    ngx_http_civicgate_redis_t  *rc;

    c = wev->data;
    rc = c->data;

    while (rc->out_pos < rc->out_len) {
        n = c->send(c, rc->out + rc->out_pos, rc->out_len - rc->out_pos);

        if (n == NGX_ERROR) {
            ngx_http_civicgate_redis_fail(rc, "send failed");
            return;
        }

        if (n == NGX_AGAIN) {
            if (ngx_handle_write_event(wev, 0) != NGX_OK) {
                ngx_http_civicgate_redis_fail(rc, "send failed");
            }

            return;
        }

        rc->out_pos += n;
    }

    rc->out_pos = 0;
    rc->out_len = 0;

    /*
     * give back what a burst made the buffer grow to; without memory for
     * the small one, the large one is kept (it works as well)
     */
    if (rc->out_size > 4 * NGX_HTTP_CIVICGATE_REDIS_BUF) {
        out = ngx_alloc(NGX_HTTP_CIVICGATE_REDIS_BUF, rc->log);

        if (out != NULL) {
            ngx_free(rc->out);
            rc->out = out;
            rc->out_size = NGX_HTTP_CIVICGATE_REDIS_BUF;
        }
    }
}


void
ngx_http_civicgate_redis_read(ngx_event_t *rev)
{
    u_char                       buf[NGX_HTTP_CIVICGATE_REDIS_BUF];
    ssize_t                      n;
    ngx_connection_t            *c;
    ngx_http_civicgate_redis_t  *rc;

    c = rev->data;
    rc = c->data;

    for ( ;; ) {
        n = c->recv(c, buf, sizeof(buf));

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == 0 || n == NGX_ERROR) {
            ngx_http_civicgate_redis_fail(rc, n == 0 ? "connection closed"
                                                     : "recv failed");
            return;
        }

        if (redisReaderFeed(rc->reader, (const char *) buf, n) != REDIS_OK) {
            ngx_http_civicgate_redis_fail(rc, "out of memory");
            return;
        }

        if (ngx_http_civicgate_redis_dispatch(rc) != NGX_OK) {
            return;
        }
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_http_civicgate_redis_fail(rc, "read event failed");
    }
}


/* replies arrive in the order commands were written */

static ngx_int_t
ngx_http_civicgate_redis_dispatch(ngx_http_civicgate_redis_t *rc)
{
    void                            *reply;
    uint64_t                         now;
    ngx_queue_t                     *q;
    ngx_connection_t                *c;
    ngx_http_civicgate_redis_cmd_t  *cmd;

    c = rc->peer.connection;
    now = 0;

    for ( ;; ) {
        if (redisReaderGetReply(rc->reader, &reply) != REDIS_OK) {
            ngx_log_error(ngx_http_civicgate_redis_level(rc), rc->log, 0,
                          "civicgate: redis %V protocol error: %s",
                          &rc->conf->url, rc->reader->errstr);
            ngx_http_civicgate_redis_fail(rc, NULL);
            return NGX_ERROR;
        }

        if (reply == NULL) {
            return NGX_OK;
        }

        /* a whole reply: bytes alone do not show that Redis keeps up */
        rc->last_read = ngx_current_msec;

        if (ngx_queue_empty(&rc->sent)) {
            if (ngx_http_civicgate_redis_pushed(rc, reply) != NGX_OK) {
                return NGX_ERROR;
            }

            continue;
        }

        if (ngx_http_civicgate_redis_demoted(rc, reply)) {
            return NGX_ERROR;
        }

        q = ngx_queue_head(&rc->sent);
        ngx_queue_remove(q);
        rc->nsent--;
        cmd = ngx_queue_data(q, ngx_http_civicgate_redis_cmd_t, queue);

        ngx_http_civicgate_redis_answer(rc, cmd, reply, &now);

        if (ngx_queue_empty(&rc->sent) && rc->timer.timer_set) {
            ngx_del_timer(&rc->timer);
        }

        /* a handler may have failed the connection */
        if (rc->peer.connection != c) {
            return NGX_ERROR;
        }
    }
}


/*
 * A command's reply: to the cluster if it redirects the command, to a
 * SCRIPT LOAD and a second try after NOSCRIPT, else to its handler.
 */

static void
ngx_http_civicgate_redis_answer(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply, uint64_t *now)
{
    /* a redirection is no error: the command goes on elsewhere */
    if (rc->redirect && reply->type == REDIS_REPLY_ERROR
        && rc->redirect(rc, cmd, reply) == NGX_OK)
    {
        freeReplyObject(reply);
        return;
    }

    if (rc->metrics) {
        ngx_http_civicgate_redis_observe(rc, cmd, reply, now);
    }

    if (cmd->script && !cmd->retried
        && ngx_http_civicgate_redis_noscript(reply)
        && ngx_http_civicgate_redis_resend(rc, cmd) == NGX_OK)
    {
        freeReplyObject(reply);
        return;
    }

    if (cmd->handler) {
        cmd->handler(cmd, reply);
    }

    freeReplyObject(reply);
    ngx_http_civicgate_redis_cmd_free(rc, cmd);
}


/*
 * A master turned replica (-READONLY): the command fails as on a lost
 * connection, with those behind it, and the Sentinels are asked again.
 */

static ngx_uint_t
ngx_http_civicgate_redis_demoted(ngx_http_civicgate_redis_t *rc,
    void *reply)
{
    if (!rc->conf->sentinel
        || !ngx_http_civicgate_sentinel_not_master(reply))
    {
        return 0;
    }

    ngx_log_error(ngx_http_civicgate_redis_level(rc), rc->log, 0,
                  "civicgate: redis %V at %V is no longer the master",
                  &rc->conf->url, rc->peer.name);
    freeReplyObject(reply);
    ngx_http_civicgate_redis_fail(rc, NULL);

    return 1;
}


/* a reply no command waits for: a pub/sub message or the answer to a PING */

static ngx_int_t
ngx_http_civicgate_redis_pushed(ngx_http_civicgate_redis_t *rc, void *reply)
{
    ngx_connection_t  *c;

    c = rc->peer.connection;

    if (rc->pinging && ngx_http_civicgate_redis_pong(reply)) {
        rc->pinging = 0;
    }

    if (rc->on_message == NULL) {
        freeReplyObject(reply);
        ngx_http_civicgate_redis_fail(rc, "unexpected reply");
        return NGX_ERROR;
    }

    rc->on_message(rc, reply);
    freeReplyObject(reply);

    /* the handler may have failed the connection */
    return rc->peer.connection == c ? NGX_OK : NGX_ERROR;
}


static void
ngx_http_civicgate_redis_observe(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply, uint64_t *now)
{
    /* one clock reading for the replies of one read */
    if (*now == 0) {
        *now = ngx_http_civicgate_redis_now_us();
    }

    ngx_http_civicgate_metrics_observe(rc->metrics,
                                       rc->metrics->redis_duration, 0,
                                       *now - cmd->queued_us);

    if (reply->type == REDIS_REPLY_ERROR) {
        ngx_http_civicgate_redis_metric(rc, redis_errors,
                                        NGX_HTTP_CIVICGATE_REDIS_ERR_REPLY, 1);
    }
}


/* one timer for the oldest command: a late reply stalls all behind it */

static void
ngx_http_civicgate_redis_timeout(ngx_event_t *ev)
{
    ngx_msec_t                       elapsed, start, limit;
    ngx_http_civicgate_redis_t      *rc;
    ngx_http_civicgate_redis_cmd_t  *cmd;

    rc = ev->data;

    if (ngx_queue_empty(&rc->sent)) {
        return;
    }

    cmd = ngx_queue_data(ngx_queue_head(&rc->sent),
                         ngx_http_civicgate_redis_cmd_t, queue);

    /* commands queued while connecting also wait for the connection */
    if (rc->connected) {
        start = (ngx_msec_int_t) (cmd->sent - rc->connected_at) > 0
                ? cmd->sent : rc->connected_at;
        limit = rc->conf->timeout;

    } else {
        start = cmd->sent;
        limit = rc->conf->connect_timeout + rc->conf->timeout;
    }

    elapsed = ngx_current_msec - start;

    if (elapsed < limit) {
        ngx_add_timer(ev, limit - elapsed);
        return;
    }

    ngx_http_civicgate_redis_timedout(rc, "timed out");
}


static void
ngx_http_civicgate_redis_reconnect(ngx_event_t *ev)
{
    ngx_http_civicgate_redis_t  *rc;

    rc = ev->data;

    if (ngx_exiting || ngx_quit || ngx_terminate
        || rc->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED)
    {
        return;
    }

    ngx_http_civicgate_redis_metric(rc, redis_reconnects, 0, 1);

    ngx_http_civicgate_redis_connect(rc);
}


static void
ngx_http_civicgate_redis_fail(ngx_http_civicgate_redis_t *rc,
    const char *reason)
{
    ngx_http_civicgate_redis_metric(rc, redis_errors,
                                    NGX_HTTP_CIVICGATE_REDIS_ERR_CONNECTION, 1);

    ngx_http_civicgate_redis_drop(rc, reason);
}


static void
ngx_http_civicgate_redis_timedout(ngx_http_civicgate_redis_t *rc,
    const char *what)
{
    ngx_log_error(ngx_http_civicgate_redis_level(rc), rc->log, NGX_ETIMEDOUT,
                  "civicgate: redis %V %s", &rc->conf->url, what);

    ngx_http_civicgate_redis_metric(rc, redis_errors,
                                    NGX_HTTP_CIVICGATE_REDIS_ERR_TIMEOUT, 1);

    ngx_http_civicgate_redis_drop(rc, NULL);
}


/*
 * Closes the connection, fails every command in flight, and schedules a
 * reconnect with capped exponential backoff and jitter.
 */

static void
ngx_http_civicgate_redis_drop(ngx_http_civicgate_redis_t *rc,
    const char *reason)
{
    if (reason != NULL) {
        ngx_log_error(ngx_http_civicgate_redis_level(rc), rc->log, 0,
                      "civicgate: redis %V: %s", &rc->conf->url, reason);
    }

    rc->failures++;

    if (rc->state != NGX_HTTP_CIVICGATE_REDIS_CLOSED) {
        rc->state = NGX_HTTP_CIVICGATE_REDIS_IDLE;
    }

    ngx_http_civicgate_redis_close(rc);

    if (rc->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED || ngx_exiting
        || ngx_quit || ngx_terminate)
    {
        return;
    }

    /* the next round starts with the address that worked last */
    rc->tried = 0;
    rc->addr = rc->good;

    /* a master lost may have been replaced */
    if (rc->conf->sentinel) {
        ngx_http_civicgate_redis_ask_again(rc->conf->sentinel);
    }

    if (!rc->reconnect.timer_set) {
        ngx_add_timer(&rc->reconnect, ngx_http_civicgate_redis_backoff(rc));
    }
}


static ngx_msec_t
ngx_http_civicgate_redis_backoff(ngx_http_civicgate_redis_t *rc)
{
    ngx_uint_t  n;
    ngx_msec_t  ceiling;

    n = ngx_min(rc->failures, 16);
    ceiling = NGX_HTTP_CIVICGATE_REDIS_BACKOFF_BASE << (n ? n - 1 : 0);
    ceiling = ngx_min(ceiling, NGX_HTTP_CIVICGATE_REDIS_BACKOFF_CAP);

    return NGX_HTTP_CIVICGATE_REDIS_BACKOFF_FLOOR
           + (ngx_msec_t) ngx_random()
             % (ceiling - NGX_HTTP_CIVICGATE_REDIS_BACKOFF_FLOOR + 1);
}


static void
ngx_http_civicgate_redis_close(ngx_http_civicgate_redis_t *rc)
{
    ngx_queue_t                     *q;
    ngx_connection_t                *c;
    ngx_http_civicgate_redis_cmd_t  *cmd;

    c = rc->peer.connection;

    if (c != NULL) {
#if (NGX_HTTP_SSL)
        if (c->ssl) {
            c->ssl->no_wait_shutdown = 1;
            (void) ngx_ssl_shutdown(c);
        }
#endif
        ngx_close_connection(c);
        rc->peer.connection = NULL;
    }

    if (rc->reader) {
        redisReaderFree(rc->reader);
        rc->reader = NULL;
    }

    if (rc->pool) {
        ngx_destroy_pool(rc->pool);
        rc->pool = NULL;
        rc->loading = NULL;
    }

    if (rc->timer.timer_set) {
        ngx_del_timer(&rc->timer);
    }

    if (rc->healthy.timer_set) {
        ngx_del_timer(&rc->healthy);
    }

    rc->out_pos = 0;
    rc->out_len = 0;
    rc->setup = 0;
    rc->connected = 0;
    rc->pinging = 0;

    if (rc->counted) {
        rc->counted = 0;
        ngx_http_civicgate_redis_metric(rc, redis_connections, rc->role, -1);
    }

    if (rc->state == NGX_HTTP_CIVICGATE_REDIS_READY
        || rc->state == NGX_HTTP_CIVICGATE_REDIS_CONNECTING)
    {
        rc->state = NGX_HTTP_CIVICGATE_REDIS_IDLE;
    }

    /* handlers may send again: the state already refuses them */
    while (!ngx_queue_empty(&rc->sent)) {
        q = ngx_queue_head(&rc->sent);
        ngx_queue_remove(q);
        rc->nsent--;
        cmd = ngx_queue_data(q, ngx_http_civicgate_redis_cmd_t, queue);

        if (cmd->handler) {
            cmd->handler(cmd, NULL);
        }

        ngx_http_civicgate_redis_cmd_free(rc, cmd);
    }
}


static ngx_http_civicgate_redis_cmd_t *
ngx_http_civicgate_redis_cmd_alloc(ngx_http_civicgate_redis_t *rc)
{
    ngx_queue_t                     *q;
    ngx_http_civicgate_redis_cmd_t  *cmd;

    if (!ngx_queue_empty(&rc->free)) {
        q = ngx_queue_head(&rc->free);
        ngx_queue_remove(q);
        rc->nfree--;
        return ngx_queue_data(q, ngx_http_civicgate_redis_cmd_t, queue);
    }

    cmd = ngx_alloc(sizeof(ngx_http_civicgate_redis_cmd_t), rc->log);

    /* spare commands have none: cmd_free() cleared it */
    if (cmd != NULL) {
        cmd->retry = NULL;
    }

    return cmd;
}


static void
ngx_http_civicgate_redis_cmd_free(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd)
{
    if (cmd->retry) {
        redisFreeCommand(cmd->retry);
        cmd->retry = NULL;
    }

    if (rc->nfree >= NGX_HTTP_CIVICGATE_REDIS_FREE_MAX) {
        ngx_free(cmd);
        return;
    }

    ngx_queue_insert_head(&rc->free, &cmd->queue);
    rc->nfree++;
}


/* the index + 1 of the script an EVALSHA runs, 0 for other commands */

static ngx_uint_t
ngx_http_civicgate_redis_script_of(ngx_http_civicgate_redis_t *rc, int argc,
    const char **argv, const size_t *argvlen)
{
    ngx_uint_t                           i;
    ngx_http_civicgate_redis_script_t  **script;

    if (argc < 2 || argvlen[0] != 7 || argvlen[1] != 40
        || ngx_strncasecmp((u_char *) argv[0], (u_char *) "EVALSHA", 7) != 0)
    {
        return 0;
    }

    script = rc->conf->scripts.elts;

    for (i = 0; i < rc->conf->scripts.nelts; i++) {
        if (ngx_strncmp(argv[1], script[i]->sha, 40) == 0) {
            return i + 1;
        }
    }

    return 0;
}


static ngx_uint_t
ngx_http_civicgate_redis_noscript(redisReply *reply)
{
    return reply->type == REDIS_REPLY_ERROR && reply->len >= 8
           && ngx_strncmp(reply->str, "NOSCRIPT", 8) == 0;
}


/*
 * After NOSCRIPT (SCRIPT FLUSH, or a failover to an empty replica): one
 * SCRIPT LOAD, however many commands were in flight, and each of them
 * once more behind it; replies come in order, so they find the script.
 */

static ngx_int_t
ngx_http_civicgate_redis_resend(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd)
{
    if (!rc->loading[cmd->script - 1]
        && ngx_http_civicgate_redis_script_load(rc, cmd->script - 1)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (ngx_http_civicgate_redis_append(rc, cmd->retry, cmd->retry_len)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    cmd->retried = 1;
    cmd->sent = ngx_current_msec;

    ngx_http_civicgate_redis_enqueue(rc, cmd);

    return NGX_OK;
}


/* loads the scripts not already being loaded on this connection */

void
ngx_http_civicgate_redis_load_scripts(ngx_http_civicgate_redis_t *rc)
{
    ngx_uint_t  i;

    if (!ngx_http_civicgate_redis_accepting(rc) || rc->loading == NULL) {
        return;
    }

    for (i = 0; i < rc->conf->scripts.nelts; i++) {
        if (!rc->loading[i]
            && ngx_http_civicgate_redis_script_load(rc, i) != NGX_OK)
        {
            return;
        }
    }
}


static ngx_int_t
ngx_http_civicgate_redis_script_load(ngx_http_civicgate_redis_t *rc,
    ngx_uint_t i)
{
    const char                          *argv[3];
    size_t                               lens[3];
    ngx_http_civicgate_redis_script_t  **script;

    script = rc->conf->scripts.elts;

    argv[0] = "SCRIPT";
    lens[0] = 6;
    argv[1] = "LOAD";
    lens[1] = 4;
    argv[2] = (const char *) script[i]->body.data;
    lens[2] = script[i]->body.len;

    if (ngx_http_civicgate_redis_send(rc, 3, argv, lens,
                                      ngx_http_civicgate_redis_script_loaded,
                                      &rc->loading[i])
        == NULL)
    {
        return NGX_ERROR;
    }

    rc->loading[i] = 1;

    return NGX_OK;
}


static void
ngx_http_civicgate_redis_script_loaded(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    static ngx_http_civicgate_log_limit_t  logged;

    u_char  *loading = cmd->data;

    /* without a reply the connection is gone, and its flags with it */
    if (reply == NULL) {
        return;
    }

    *loading = 0;

    ngx_http_civicgate_redis_refused(cmd->redis, reply, "a script load",
                                     &logged);
}


/* microseconds for command durations; the event loop's clock has ms */

static uint64_t
ngx_http_civicgate_redis_now_us(void)
{
    struct timespec  ts;

    (void) clock_gettime(CLOCK_MONOTONIC, &ts);

    return (uint64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}
