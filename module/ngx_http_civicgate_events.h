
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_EVENTS_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_EVENTS_H_INCLUDED_


#include "ngx_http_civicgate_module.h"
#include "ngx_http_civicgate_redis.h"


#define NGX_HTTP_CIVICGATE_METHOD_MAX   16

/* events of the spool in flight to Redis, all workers together */
#define NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT      1024
#define NGX_HTTP_CIVICGATE_DRAIN_INFLIGHT_MAX  16384

/* the spool's high-water mark for the health endpoints, in percent */
#define NGX_HTTP_CIVICGATE_SPOOL_HIGH   90


/* one journey event, fixed size so that the spool is a ring of slots */
typedef struct {
    uint64_t                        time;          /* ms since the epoch */
    int64_t                         latency;       /* ms; -1: no upstream */
    uint32_t                        ttl;
    uint16_t                        status;
    u_char                          channel_len;
    u_char                          service_len;
    u_char                          method_len;
    u_char                          citizen_len;
    u_char                          eid[16];
    u_char                          journey[NGX_HTTP_CIVICGATE_JID_LEN];
    u_char                          citizen[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN];
    u_char                          channel[NGX_HTTP_CIVICGATE_CHANNEL_MAX];
    u_char                          service[NGX_HTTP_CIVICGATE_SERVICE_MAX];
    u_char                          method[NGX_HTTP_CIVICGATE_METHOD_MAX];
} ngx_http_civicgate_event_t;


typedef struct ngx_http_civicgate_spool_sh_s  ngx_http_civicgate_spool_sh_t;


struct ngx_http_civicgate_events_conf_s {
    ngx_shm_zone_t                 *zone;
    ngx_http_civicgate_spool_sh_t  *sh;
    ngx_slab_pool_t                *shpool;
    ngx_uint_t                      maxlen;
    ngx_uint_t                      journey_maxlen;
    ngx_uint_t                      drain_limit;   /* all workers */
    ngx_msec_t                      claim_ttl;
    ngx_cycle_t                    *old_cycle;     /* at reload */

    ngx_http_civicgate_redis_script_t  *journey_script;
    ngx_http_civicgate_redis_script_t  *citizen_script;

    /* per worker */
    ngx_event_t                     flush_timer;
    ngx_uint_t                      drain_share;
    ngx_uint_t                      inflight;      /* claimed events */
    ngx_uint_t                      direct;        /* sent, not spooled */
    ngx_queue_t                     back;          /* those that failed */
    ngx_uint_t                      nback;
    ngx_msec_t                      refused;       /* last logged */
};


char *ngx_http_civicgate_event_buffer(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_civicgate_events_init_conf(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf);
ngx_int_t ngx_http_civicgate_events_init_worker(ngx_cycle_t *cycle,
    ngx_http_civicgate_main_conf_t *cgmcf);
void ngx_http_civicgate_events_exit_worker(
    ngx_http_civicgate_main_conf_t *cgmcf);
void ngx_http_civicgate_events_exit_master(
    ngx_http_civicgate_main_conf_t *cgmcf);
void ngx_http_civicgate_events_log(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx);
void ngx_http_civicgate_events_ready(ngx_http_civicgate_redis_t *rc);
ngx_uint_t ngx_http_civicgate_events_spool_high(
    ngx_http_civicgate_main_conf_t *cgmcf);


#endif /* _NGX_HTTP_CIVICGATE_EVENTS_H_INCLUDED_ */
