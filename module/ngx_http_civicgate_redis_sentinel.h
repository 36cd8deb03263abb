
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_REDIS_SENTINEL_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_REDIS_SENTINEL_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <hiredis/hiredis.h>


/* a worker's data connections that follow the master */
#define NGX_HTTP_CIVICGATE_SENTINEL_CLIENTS  4

/* the Sentinels listened to, each for the failovers it leads */
#define NGX_HTTP_CIVICGATE_SENTINEL_MAX      16

/* how long a failover announced by a Sentinel may hold writes back */
#define NGX_HTTP_CIVICGATE_SENTINEL_FENCE    5000

/* how long a Sentinel naming the master just replaced is not believed */
#define NGX_HTTP_CIVICGATE_SENTINEL_STALE    10000

/* what a Sentinel's message means for the master followed */
#define NGX_HTTP_CIVICGATE_SENTINEL_NONE     0
#define NGX_HTTP_CIVICGATE_SENTINEL_SWITCH   1    /* a new master */
#define NGX_HTTP_CIVICGATE_SENTINEL_FENCE_ON 2    /* a failover started */
#define NGX_HTTP_CIVICGATE_SENTINEL_ABORT    3    /* it was given up */


typedef struct {
    ngx_sockaddr_t                  sockaddr;
    socklen_t                       socklen;
    ngx_str_t                       name;
    u_char                          text[NGX_SOCKADDR_STRLEN];
} ngx_http_civicgate_sentinel_addr_t;


/*
 * Per worker and per civicgate_redis: the master the Sentinels name, the
 * data connections that follow it, the connection that asks a Sentinel
 * for it, and one listening to each Sentinel: a failover is announced
 * early only by the Sentinel that leads it.
 */

typedef struct ngx_http_civicgate_sentinel_s {
    struct ngx_http_civicgate_redis_s   *watch;       /* asks and listens */
    struct ngx_http_civicgate_redis_s   *listeners[
                                           NGX_HTTP_CIVICGATE_SENTINEL_MAX];
    ngx_uint_t                          nlisteners;
    void                               *confs;        /* the listeners' */

    struct ngx_http_civicgate_redis_s   *clients[
                                           NGX_HTTP_CIVICGATE_SENTINEL_CLIENTS];
    ngx_uint_t                          nclients;

    ngx_addr_t                          addr;        /* of the master */
    ngx_http_civicgate_sentinel_addr_t  master;
    ngx_http_civicgate_sentinel_addr_t  next;        /* as just read */
    ngx_http_civicgate_sentinel_addr_t  replaced;    /* by the last switch */
    ngx_msec_t                          switched_at;

    ngx_event_t                         fence;       /* bounds a failover */
    uint32_t                            fencers;     /* who announced one */

    unsigned                            known:1;     /* master known */
    unsigned                            switched:1;  /* "replaced" is set */
    unsigned                            asking:1;    /* a query under way */
} ngx_http_civicgate_sentinel_t;


ngx_http_civicgate_sentinel_t *ngx_http_civicgate_sentinel_create(
    ngx_log_t *log);
ngx_int_t ngx_http_civicgate_sentinel_add_client(
    ngx_http_civicgate_sentinel_t *s, struct ngx_http_civicgate_redis_s *rc);
ngx_uint_t ngx_http_civicgate_sentinel_remove_client(
    ngx_http_civicgate_sentinel_t *s, struct ngx_http_civicgate_redis_s *rc);
ngx_int_t ngx_http_civicgate_sentinel_master_reply(
    ngx_http_civicgate_sentinel_t *s, redisReply *reply);
ngx_uint_t ngx_http_civicgate_sentinel_message(
    ngx_http_civicgate_sentinel_t *s, ngx_str_t *name, redisReply *reply);
ngx_uint_t ngx_http_civicgate_sentinel_stale(ngx_http_civicgate_sentinel_t *s);
ngx_int_t ngx_http_civicgate_sentinel_adopt(ngx_http_civicgate_sentinel_t *s,
    ngx_str_t *name, ngx_log_t *log);
ngx_uint_t ngx_http_civicgate_sentinel_role(redisReply *reply,
    ngx_str_t *role);
ngx_uint_t ngx_http_civicgate_sentinel_not_master(redisReply *reply);


#endif /* _NGX_HTTP_CIVICGATE_REDIS_SENTINEL_H_INCLUDED_ */
