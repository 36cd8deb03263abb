
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include "ngx_http_civicgate_redis_sentinel.h"


static ngx_int_t ngx_http_civicgate_sentinel_parse(
    ngx_http_civicgate_sentinel_addr_t *a, u_char *host, size_t host_len,
    u_char *port, size_t port_len);
static ngx_uint_t ngx_http_civicgate_sentinel_words(ngx_str_t *text,
    ngx_str_t *words, ngx_uint_t max);
static ngx_uint_t ngx_http_civicgate_sentinel_is(redisReply *reply,
    const char *s);


ngx_http_civicgate_sentinel_t *
ngx_http_civicgate_sentinel_create(ngx_log_t *log)
{
    ngx_http_civicgate_sentinel_t  *s;

    s = ngx_calloc(sizeof(ngx_http_civicgate_sentinel_t), log);
    if (s == NULL) {
        return NULL;
    }

    s->fence.log = log;
    s->fence.data = s;
    s->fence.cancelable = 1;

    return s;
}


ngx_int_t
ngx_http_civicgate_sentinel_add_client(ngx_http_civicgate_sentinel_t *s,
    struct ngx_http_civicgate_redis_s *rc)
{
    if (s->nclients == NGX_HTTP_CIVICGATE_SENTINEL_CLIENTS) {
        return NGX_ERROR;
    }

    s->clients[s->nclients++] = rc;

    return NGX_OK;
}


/* the number of data connections left */

ngx_uint_t
ngx_http_civicgate_sentinel_remove_client(ngx_http_civicgate_sentinel_t *s,
    struct ngx_http_civicgate_redis_s *rc)
{
    ngx_uint_t  i;

    for (i = 0; i < s->nclients; i++) {
        if (s->clients[i] == rc) {
            s->clients[i] = s->clients[--s->nclients];
            break;
        }
    }

    return s->nclients;
}


/*
 * The reply to SENTINEL GET-MASTER-ADDR-BY-NAME: [ip, port] into s->next;
 * NGX_DECLINED: this Sentinel does not know the master.
 */

ngx_int_t
ngx_http_civicgate_sentinel_master_reply(ngx_http_civicgate_sentinel_t *s,
    redisReply *reply)
{
    redisReply  *host, *port;

    if (reply->type == REDIS_REPLY_NIL) {
        return NGX_DECLINED;
    }

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2) {
        return NGX_ERROR;
    }

    host = reply->element[0];
    port = reply->element[1];

    if (host->type != REDIS_REPLY_STRING || port->type != REDIS_REPLY_STRING) {
        return NGX_ERROR;
    }

    return ngx_http_civicgate_sentinel_parse(&s->next, (u_char *) host->str,
                                             host->len, (u_char *) port->str,
                                             port->len);
}


/*
 * Sentinels announce addresses, not names (resolve-hostnames is off by
 * default): a name would need a resolver on the event loop, and is refused.
 */

static ngx_int_t
ngx_http_civicgate_sentinel_parse(ngx_http_civicgate_sentinel_addr_t *a,
    u_char *host, size_t host_len, u_char *port, size_t port_len)
{
    ngx_int_t             n;
    in_addr_t             inaddr;
    struct sockaddr_in   *sin;
#if (NGX_HAVE_INET6)
    struct sockaddr_in6  *sin6;
#endif

    n = ngx_atoi(port, port_len);
    if (n < 1 || n > 65535) {
        return NGX_ERROR;
    }

    ngx_memzero(&a->sockaddr, sizeof(ngx_sockaddr_t));

    inaddr = ngx_inet_addr(host, host_len);

    if (inaddr != INADDR_NONE) {
        sin = &a->sockaddr.sockaddr_in;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((in_port_t) n);
        sin->sin_addr.s_addr = inaddr;
        a->socklen = sizeof(struct sockaddr_in);

#if (NGX_HAVE_INET6)
    } else if (ngx_inet6_addr(host, host_len,
                              a->sockaddr.sockaddr_in6.sin6_addr.s6_addr)
               == NGX_OK)
    {
        sin6 = &a->sockaddr.sockaddr_in6;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((in_port_t) n);
        a->socklen = sizeof(struct sockaddr_in6);
#endif

    } else {
        return NGX_ERROR;
    }

    a->name.data = a->text;
    a->name.len = ngx_sock_ntop(&a->sockaddr.sockaddr, a->socklen, a->text,
                                NGX_SOCKADDR_STRLEN, 1);

    return NGX_OK;
}


/*
 * A message of the Sentinel's channels, ["message", channel, text]:
 *
 *     +switch-master  NAME old-ip old-port new-ip new-port
 *     +try-failover   master NAME ip port
 *     -failover-abort-...  master NAME ip port
 *
 * Only those naming the master followed count.
 */

ngx_uint_t
ngx_http_civicgate_sentinel_message(ngx_http_civicgate_sentinel_t *s,
    ngx_str_t *name, redisReply *reply)
{
    ngx_str_t    text, w[6];
    ngx_uint_t   n;
    redisReply  *channel, *payload;

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 3
        || !ngx_http_civicgate_sentinel_is(reply->element[0], "message"))
    {
        return NGX_HTTP_CIVICGATE_SENTINEL_NONE;
    }

    channel = reply->element[1];
    payload = reply->element[2];

    if (channel->type != REDIS_REPLY_STRING
        || payload->type != REDIS_REPLY_STRING)
    {
        return NGX_HTTP_CIVICGATE_SENTINEL_NONE;
    }

    text.data = (u_char *) payload->str;
    text.len = payload->len;

    n = ngx_http_civicgate_sentinel_words(&text, w, 6);

    if (ngx_http_civicgate_sentinel_is(channel, "+switch-master")) {
        if (n != 5 || w[0].len != name->len
            || ngx_strncmp(w[0].data, name->data, name->len) != 0
            || ngx_http_civicgate_sentinel_parse(&s->next, w[3].data,
                                                 w[3].len, w[4].data,
                                                 w[4].len)
               != NGX_OK)
        {
            return NGX_HTTP_CIVICGATE_SENTINEL_NONE;
        }

        return NGX_HTTP_CIVICGATE_SENTINEL_SWITCH;
    }

    if (n != 4 || w[1].len != name->len
        || ngx_strncmp(w[1].data, name->data, name->len) != 0)
    {
        return NGX_HTTP_CIVICGATE_SENTINEL_NONE;
    }

    if (ngx_http_civicgate_sentinel_is(channel, "+try-failover")) {
        return NGX_HTTP_CIVICGATE_SENTINEL_FENCE_ON;
    }

    if (channel->len > 16
        && ngx_strncmp(channel->str, "-failover-abort-", 16) == 0)
    {
        return NGX_HTTP_CIVICGATE_SENTINEL_ABORT;
    }

    return NGX_HTTP_CIVICGATE_SENTINEL_NONE;
}


static ngx_uint_t
ngx_http_civicgate_sentinel_words(ngx_str_t *text, ngx_str_t *words,
    ngx_uint_t max)
{
    u_char      *p, *last, *start;
    ngx_uint_t   n;

    p = text->data;
    last = text->data + text->len;
    n = 0;

    while (p < last) {
        while (p < last && *p == ' ') {
            p++;
        }

        if (p == last) {
            break;
        }

        start = p;

        while (p < last && *p != ' ') {
            p++;
        }

        /* more words than expected: not a message of the form known */
        if (n == max) {
            return max + 1;
        }

        words[n].data = start;
        words[n++].len = p - start;
    }

    return n;
}


/*
 * An answer naming the master a switch just replaced comes from a Sentinel
 * that has not learnt of the switch yet: the old master still accepts
 * writes (until the Sentinels make it a replica), which would be lost.
 */

ngx_uint_t
ngx_http_civicgate_sentinel_stale(ngx_http_civicgate_sentinel_t *s)
{
    return s->switched
           && ngx_current_msec - s->switched_at
              < NGX_HTTP_CIVICGATE_SENTINEL_STALE
           && ngx_cmp_sockaddr(&s->replaced.sockaddr.sockaddr,
                               s->replaced.socklen,
                               &s->next.sockaddr.sockaddr, s->next.socklen, 1)
              == NGX_OK;
}


/*
 * s->next becomes the master: NGX_DECLINED if it already was, NGX_OK the
 * first time, NGX_DONE for a switch (logged once per switch, by the first
 * worker process; the others log it at "info").
 */

ngx_int_t
ngx_http_civicgate_sentinel_adopt(ngx_http_civicgate_sentinel_t *s,
    ngx_str_t *name, ngx_log_t *log)
{
    ngx_int_t   rc;
    ngx_uint_t  level;

    if (s->known
        && ngx_cmp_sockaddr(&s->master.sockaddr.sockaddr, s->master.socklen,
                            &s->next.sockaddr.sockaddr, s->next.socklen, 1)
           == NGX_OK)
    {
        return NGX_DECLINED;
    }

    if (s->known) {
        level = ngx_worker == 0 ? NGX_LOG_WARN : NGX_LOG_INFO;

        ngx_log_error(level, log, 0,
                      "civicgate: redis master \"%V\" switched from %V to %V",
                      name, &s->master.name, &s->next.name);

        s->replaced = s->master;
        s->replaced.name.data = s->replaced.text;
        s->switched_at = ngx_current_msec;
        s->switched = 1;

        rc = NGX_DONE;

    } else {
        ngx_log_error(NGX_LOG_INFO, log, 0,
                      "civicgate: redis master \"%V\" is at %V",
                      name, &s->next.name);
        rc = NGX_OK;
    }

    s->master = s->next;
    s->master.name.data = s->master.text;

    s->addr.sockaddr = &s->master.sockaddr.sockaddr;
    s->addr.socklen = s->master.socklen;
    s->addr.name = s->master.name;

    s->known = 1;

    return rc;
}


/* ROLE: ["master", offset, replicas] on a master */

ngx_uint_t
ngx_http_civicgate_sentinel_role(redisReply *reply, ngx_str_t *role)
{
    redisReply  *e;

    ngx_str_set(role, "unknown");

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements == 0) {
        return 0;
    }

    e = reply->element[0];

    if (e->type != REDIS_REPLY_STRING) {
        return 0;
    }

    role->data = (u_char *) e->str;
    role->len = e->len;

    return ngx_http_civicgate_sentinel_is(e, "master");
}


/* a write refused by a server that is no longer the master */

ngx_uint_t
ngx_http_civicgate_sentinel_not_master(redisReply *reply)
{
    return reply->type == REDIS_REPLY_ERROR && reply->len >= 8
           && ngx_strncmp(reply->str, "READONLY", 8) == 0;
}


static ngx_uint_t
ngx_http_civicgate_sentinel_is(redisReply *reply, const char *s)
{
    size_t  len;

    len = ngx_strlen(s);

    return (reply->type == REDIS_REPLY_STRING
            || reply->type == REDIS_REPLY_STATUS)
           && reply->len == len
           && ngx_strncasecmp((u_char *) reply->str, (u_char *) s, len) == 0;
}
