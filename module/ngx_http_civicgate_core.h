
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_CORE_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_CORE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_compat.h"
#include "ngx_http_civicgate_util.h"
#include "ngx_http_civicgate_crypto.h"
#include "ngx_http_civicgate_codec.h"
#include "ngx_http_civicgate_redis.h"
#include "ngx_http_civicgate_json.h"
#include "ngx_http_civicgate_sign.h"


/*
 * The core: what every concern shares, and calls nothing above it.  The
 * shared configuration (keys, channels, services, Redis, metrics), the
 * request context with a state slot per concern module, the re-entrant
 * step of a phase handler waiting on Redis, and the registries through
 * which concerns hook into the Redis connections and the admin endpoint.
 */


#define NGX_HTTP_CIVICGATE_CHANNEL_MAX   32
#define NGX_HTTP_CIVICGATE_CHANNELS_MAX  32
#define NGX_HTTP_CIVICGATE_SERVICE_MAX   64


/* ngx_http_civicgate_metrics_t: in ngx_http_civicgate_redis.h */


typedef struct {
    ngx_http_civicgate_keyring_t  *keyring;      /* NULL: no secret file */
    ngx_str_t                      secret_file;

    ngx_http_civicgate_keyset_t   *signing;      /* NULL: no signing key */
    u_char                        *jwks_file;    /* the first civicgate_jwks */
    ngx_uint_t                     jwks_line;

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
    ngx_http_civicgate_redis_t        *subscriber;   /* per worker */

    u_char                        *slots;        /* by ctx_index: slot + 1 */
    ngx_uint_t                     nstates;

    ngx_array_t                    ready;        /* of redis_ready_pt */
    ngx_array_t                    subscriptions;  /* of subscription_t */
    ngx_array_t                    admin_routes; /* of admin_route_t */
    u_char                        *admin_file;   /* the first civicgate_admin */
    ngx_uint_t                     admin_line;
} ngx_http_civicgate_main_conf_t;


typedef struct {
    ngx_str_t                           service;
    ngx_uint_t                          service_index;  /* unset: none */
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
 * internal redirects; a subrequest has its own.  Each concern module that
 * keeps state for the request has a slot, taken at preconfiguration.
 */
typedef struct {
    ngx_http_request_t            *request;
    ngx_http_civicgate_redis_cmd_t *cmd;           /* awaiting a reply */
    void                         **state;          /* by slot */
} ngx_http_civicgate_ctx_t;


/* a push on the subscriber connection for a channel, and its reconnects */
typedef struct {
    ngx_str_t                            channel;  /* empty: any other */
    ngx_http_civicgate_redis_message_pt  handler;
    ngx_http_civicgate_redis_ready_pt    ready;
} ngx_http_civicgate_subscription_t;


typedef ngx_int_t (*ngx_http_civicgate_admin_pt)(ngx_http_request_t *r,
    ngx_str_t *rest);

typedef struct {
    ngx_str_t                      path;     /* "x/": a prefix; "x": exact */
    ngx_http_civicgate_admin_pt    handler;
} ngx_http_civicgate_admin_route_t;


ngx_int_t ngx_http_civicgate_add_state(ngx_conf_t *cf, ngx_module_t *module);
ngx_http_civicgate_ctx_t *ngx_http_civicgate_get_ctx(ngx_http_request_t *r);
void *ngx_http_civicgate_get_state(ngx_http_request_t *r,
    ngx_module_t *module);
ngx_int_t ngx_http_civicgate_set_state(ngx_http_request_t *r,
    ngx_module_t *module, void *state);
void ngx_http_civicgate_wait(ngx_http_request_t *r);
ngx_int_t ngx_http_civicgate_step(ngx_http_request_t *r,
    ngx_http_civicgate_step_t *step, ngx_http_civicgate_step_pt start,
    ngx_http_civicgate_step_pt verdict, void *data);
ngx_http_request_t *ngx_http_civicgate_answered(
    ngx_http_civicgate_redis_cmd_t *cmd, ngx_http_civicgate_ctx_t **ctx);
void ngx_http_civicgate_resume(ngx_http_request_t *r);
ngx_int_t ngx_http_civicgate_finalize(ngx_http_request_t *r, ngx_int_t rc);

ngx_int_t ngx_http_civicgate_on_ready(ngx_conf_t *cf,
    ngx_http_civicgate_redis_ready_pt handler);
ngx_int_t ngx_http_civicgate_subscribe(ngx_conf_t *cf, char *channel,
    ngx_http_civicgate_redis_message_pt handler,
    ngx_http_civicgate_redis_ready_pt ready);
void ngx_http_civicgate_client_ready(ngx_http_civicgate_redis_t *rc);
void ngx_http_civicgate_subscriber_ready(ngx_http_civicgate_redis_t *rc);
void ngx_http_civicgate_pubsub_message(ngx_http_civicgate_redis_t *rc,
    redisReply *reply);

ngx_int_t ngx_http_civicgate_admin_route(ngx_conf_t *cf, char *path,
    ngx_http_civicgate_admin_pt handler);
char *ngx_http_civicgate_admin(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

ngx_int_t ngx_http_civicgate_add_variables(ngx_conf_t *cf,
    ngx_http_variable_t *vars);
void ngx_http_civicgate_variable_set(ngx_http_variable_value_t *v,
    u_char *data, size_t len);


extern ngx_module_t  ngx_http_civicgate_module;


#endif /* _NGX_HTTP_CIVICGATE_CORE_H_INCLUDED_ */
