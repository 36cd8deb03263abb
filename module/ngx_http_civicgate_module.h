
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_MODULE_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_compat.h"
#include "ngx_http_civicgate_crypto.h"
#include "ngx_http_civicgate_codec.h"
#include "ngx_http_civicgate_redis.h"


#define NGX_HTTP_CIVICGATE_CHANNEL_MAX   32
#define NGX_HTTP_CIVICGATE_CHANNELS_MAX  32
#define NGX_HTTP_CIVICGATE_SERVICE_MAX   64


/* ngx_http_civicgate_metrics_t: in ngx_http_civicgate_redis.h */
typedef struct ngx_http_civicgate_events_conf_s
    ngx_http_civicgate_events_conf_t;
typedef struct ngx_http_civicgate_limit_ctx_s
    ngx_http_civicgate_limit_ctx_t;
typedef struct ngx_http_civicgate_consent_conf_s
    ngx_http_civicgate_consent_conf_t;
typedef struct ngx_http_civicgate_consent_ctx_s
    ngx_http_civicgate_consent_ctx_t;
typedef struct ngx_http_civicgate_status_conf_s
    ngx_http_civicgate_status_conf_t;
typedef struct ngx_http_civicgate_health_s
    ngx_http_civicgate_health_t;


typedef struct {
    ngx_flag_t                     enable;
    ngx_str_t                      header;
    ngx_str_t                      cookie;       /* len 0: no cookie */
    ngx_str_t                      cookie_attrs; /* "; Path=/; ..." */
    time_t                         ttl;
} ngx_http_civicgate_journey_conf_t;


typedef struct {
    ngx_http_civicgate_keyring_t  *keyring;      /* NULL: no secret file */
    ngx_str_t                      secret_file;

    /* the first directive that needs the keys, for a late error */
    const char                    *needs_keys;
    u_char                        *needs_keys_file;
    ngx_uint_t                     needs_keys_line;

    ngx_http_civicgate_bytes_t    *channels;
    ngx_uint_t                     nchannels;

    ngx_array_t                    services;     /* of ngx_str_t */

    ngx_http_civicgate_metrics_t  *metrics;

    ngx_http_civicgate_redis_conf_t   *redis;    /* NULL: standalone */
    ngx_http_civicgate_redis_t        *client;   /* per worker */

    ngx_http_civicgate_events_conf_t  *events;
    ngx_array_t                        limit_zones;  /* of zone_t * */

    ngx_http_civicgate_consent_conf_t *consent;
    ngx_str_t                          consent_grant_url;
    ngx_http_civicgate_redis_t        *subscriber;   /* per worker */
    ngx_http_civicgate_status_conf_t  *status;
    ngx_http_civicgate_health_t       *health;   /* NULL: no endpoint */
    size_t                         event_buffer;
    ngx_uint_t                     event_stream_maxlen;
    ngx_uint_t                     event_drain_inflight;
} ngx_http_civicgate_main_conf_t;


typedef struct {
    ngx_http_complex_value_t           *channel;
    ngx_http_complex_value_t           *citizen;
    ngx_str_t                           citizen_challenge;
    ngx_str_t                           service;
    ngx_uint_t                          service_index;  /* unset: none */
    ngx_http_civicgate_journey_conf_t  *journey;
    ngx_flag_t                          events;

    ngx_array_t                        *limits;  /* of limit_t */
    ngx_flag_t                          limit_dry_run;
    ngx_uint_t                          limit_status;
    ngx_uint_t                          limit_log_level;
    ngx_flag_t                          limit_headers;

    ngx_array_t                        *consent_names;  /* of ngx_str_t */
    ngx_array_t                        *consents;  /* of purpose_t * */
    ngx_uint_t                          consent_on_error;
    ngx_uint_t                          consent_endpoint;
    u_char                             *consent_file;  /* for late errors */
    ngx_uint_t                          consent_line;

    ngx_uint_t                          status_language;
    ngx_msec_t                          status_max_wait;
    ngx_msec_t                          status_heartbeat;
    ngx_msec_t                          health_interval;
} ngx_http_civicgate_loc_conf_t;


/* a check that may wait on Redis (limits, consent), re-entered by phase */
typedef struct {
    unsigned                       waiting:1;
    unsigned                       replied:1;
    unsigned                       failed:1;
    unsigned                       done:1;
} ngx_http_civicgate_step_t;

typedef ngx_int_t (*ngx_http_civicgate_step_pt)(ngx_http_request_t *r,
    void *data);


/*
 * One per request: the main request's lives as long as it does, through
 * internal redirects; a subrequest has its own, its identity copied.
 */
typedef struct {
    ngx_http_request_t            *request;
    ngx_uint_t                     channel;      /* index; nchannels: unknown */
    u_char                         journey_id[NGX_HTTP_CIVICGATE_JID_LEN];
    u_char                         citizen[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN];
    ngx_http_civicgate_limit_ctx_t *limit;
    ngx_http_civicgate_consent_ctx_t *consent;
    ngx_http_civicgate_redis_cmd_t *cmd;           /* awaiting a reply */
    void                          *api;            /* consent API state */

    unsigned                       channel_done:1;
    unsigned                       journey_done:1;
    unsigned                       journey_on:1;
    unsigned                       journey_new:1;
    unsigned                       citizen_done:1;
    unsigned                       citizen_set:1;
    unsigned                       headers_done:1;
} ngx_http_civicgate_ctx_t;


ngx_http_civicgate_ctx_t *ngx_http_civicgate_get_ctx(ngx_http_request_t *r);
void ngx_http_civicgate_wait(ngx_http_request_t *r);
ngx_int_t ngx_http_civicgate_step(ngx_http_request_t *r,
    ngx_http_civicgate_step_t *step, ngx_http_civicgate_step_pt start,
    ngx_http_civicgate_step_pt verdict, void *data);
ngx_http_request_t *ngx_http_civicgate_answered(
    ngx_http_civicgate_redis_cmd_t *cmd, ngx_http_civicgate_ctx_t **ctx);
void ngx_http_civicgate_resume(ngx_http_request_t *r);
ngx_int_t ngx_http_civicgate_finalize(ngx_http_request_t *r, ngx_int_t rc);
ngx_int_t ngx_http_civicgate_add_variables(ngx_conf_t *cf);
/* the subscriber's messages; not static: fuzz/resp.c drives it */
void ngx_http_civicgate_pubsub_message(ngx_http_civicgate_redis_t *rc,
    redisReply *reply);


extern ngx_module_t  ngx_http_civicgate_module;


#endif /* _NGX_HTTP_CIVICGATE_MODULE_H_INCLUDED_ */
