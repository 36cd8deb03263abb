
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_REDIS_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_REDIS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <hiredis/hiredis.h>

#include "ngx_http_civicgate_util.h"
#include "ngx_http_civicgate_redis_sentinel.h"


typedef struct ngx_http_civicgate_redis_s      ngx_http_civicgate_redis_t;
typedef struct ngx_http_civicgate_redis_cmd_s  ngx_http_civicgate_redis_cmd_t;
typedef struct ngx_http_civicgate_metrics_s    ngx_http_civicgate_metrics_t;
typedef struct ngx_http_civicgate_cluster_s    ngx_http_civicgate_cluster_t;

/*
 * Called exactly once per command that was not detached: with the reply,
 * or with NULL when the command failed (timeout, connection lost, worker
 * exiting).  The reply is freed after the handler returns.
 */
typedef void (*ngx_http_civicgate_redis_handler_pt)(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);

/* called when the connection is (again) ready for commands */
typedef void (*ngx_http_civicgate_redis_ready_pt)(
    ngx_http_civicgate_redis_t *rc);

/* a subscriber connection's pushes: subscribe confirmations, messages */
typedef void (*ngx_http_civicgate_redis_message_pt)(
    ngx_http_civicgate_redis_t *rc, redisReply *reply);

/* mode=cluster: a command sent to the router goes to a node's connection */
typedef ngx_http_civicgate_redis_cmd_t *(*ngx_http_civicgate_redis_route_pt)(
    ngx_http_civicgate_redis_t *rc, int argc, const char **argv,
    const size_t *argvlen, ngx_http_civicgate_redis_handler_pt handler,
    void *data);

/*
 * mode=cluster: an error reply (MOVED, ASK, TRYAGAIN, CLUSTERDOWN) that
 * the cluster takes: NGX_OK, the command is its own from then on.
 */
typedef ngx_int_t (*ngx_http_civicgate_redis_redirect_pt)(
    ngx_http_civicgate_redis_t *rc, ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply);


typedef struct {
    ngx_str_t                             body;
    u_char                                sha[40];
} ngx_http_civicgate_redis_script_t;


#define NGX_HTTP_CIVICGATE_REDIS_SINGLE      0
#define NGX_HTTP_CIVICGATE_REDIS_SENTINEL    1
#define NGX_HTTP_CIVICGATE_REDIS_CLUSTER     2


typedef struct ngx_http_civicgate_redis_conf_s
    ngx_http_civicgate_redis_conf_t;

struct ngx_http_civicgate_redis_conf_s {
    ngx_str_t                             url;
    ngx_addr_t                           *addrs;       /* every resolved */
    ngx_uint_t                            naddrs;
    ngx_str_t                             host;        /* TLS name */
    ngx_uint_t                            db;
    ngx_str_t                             user;
    ngx_str_t                             password;
    ngx_msec_t                            timeout;
    ngx_msec_t                            connect_timeout;

#if (NGX_HTTP_SSL)
    ngx_ssl_t                            *ssl;
    ngx_flag_t                            tls_verify;
    ngx_str_t                             tls_name;
    ngx_uint_t                            tls_name_ip;
#endif

    ngx_array_t                           scripts;
                                    /* of ngx_http_civicgate_redis_script_t * */

    /* mode=sentinel: the master's name, how to reach the Sentinels */
    ngx_uint_t                            mode;
    ngx_str_t                             master;
    ngx_http_civicgate_redis_conf_t      *sentinels;
    ngx_http_civicgate_sentinel_t        *sentinel;    /* per worker */

    /* mode=cluster: the seed nodes, as one connection that tries each */
    ngx_http_civicgate_redis_conf_t      *seeds;
};


struct ngx_http_civicgate_redis_cmd_s {
    ngx_queue_t                           queue;
    ngx_http_civicgate_redis_handler_pt   handler;     /* NULL: detached */
    void                                 *data;
    ngx_msec_t                            sent;
    ngx_msec_t                            began;       /* first sent */
    uint64_t                              queued_us;   /* monotonic */
    ngx_http_civicgate_redis_t           *redis;

    /* an EVALSHA, kept to be sent again after a NOSCRIPT */
    char                                 *retry;
    size_t                                retry_len;
    ngx_uint_t                            script;      /* index + 1 */
    ngx_int_t                             slot;        /* cluster; -1 */
    unsigned                              retried:1;
    unsigned                              redirects:3; /* cluster */
};


/* the connection's label in the connections gauge */
#define NGX_HTTP_CIVICGATE_REDIS_COMMAND     0
#define NGX_HTTP_CIVICGATE_REDIS_SUBSCRIBER  1
#define NGX_HTTP_CIVICGATE_REDIS_WATCHER     2


typedef enum {
    NGX_HTTP_CIVICGATE_REDIS_IDLE = 0,     /* waiting to (re)connect */
    NGX_HTTP_CIVICGATE_REDIS_CONNECTING,
    NGX_HTTP_CIVICGATE_REDIS_READY,
    NGX_HTTP_CIVICGATE_REDIS_CLOSED        /* worker exiting */
} ngx_http_civicgate_redis_state_e;


struct ngx_http_civicgate_redis_s {
    ngx_http_civicgate_redis_conf_t      *conf;
    ngx_log_t                            *log;
    ngx_peer_connection_t                 peer;
    ngx_pool_t                           *pool;        /* per connection */
    redisReader                          *reader;
    ngx_http_civicgate_redis_state_e      state;

    ngx_queue_t                           sent;        /* awaiting replies */
    ngx_uint_t                            nsent;
    ngx_queue_t                           free;        /* spare commands */
    ngx_uint_t                            nfree;
    ngx_uint_t                            setup;       /* setup replies due */

    u_char                               *out;
    size_t                                out_pos;
    size_t                                out_len;
    size_t                                out_size;

    ngx_event_t                           timer;       /* oldest command */
    ngx_event_t                           reconnect;
    ngx_event_t                           ping;        /* subscriber */
    ngx_msec_t                            last_read;   /* a whole reply */
    ngx_msec_t                            ping_sent;   /* subscriber */
    ngx_msec_t                            connected_at;
    ngx_event_t                           healthy;     /* resets failures */
    ngx_uint_t                            failures;    /* since healthy */

    ngx_uint_t                            addr;        /* being tried */
    ngx_uint_t                            good;        /* last that worked */
    ngx_uint_t                            tried;       /* in this round */
    ngx_log_t                             connect_log;

    u_char                               *loading;     /* per script */

    ngx_http_civicgate_redis_ready_pt     on_ready;
    ngx_http_civicgate_redis_message_pt   on_message;  /* subscriber */
    ngx_http_civicgate_redis_route_pt     route;       /* cluster router */
    ngx_http_civicgate_redis_redirect_pt  redirect;    /* cluster node */
    ngx_http_civicgate_cluster_t         *cluster;
    ngx_str_t                            *channels;    /* subscriber */
    ngx_uint_t                            nchannels;
    void                                 *data;

    ngx_http_civicgate_metrics_t         *metrics;     /* NULL: uncounted */
    ngx_uint_t                            role;

    unsigned                              connected:1;
    unsigned                              counted:1;   /* in the gauge */
    unsigned                              recovered:1; /* logged "again" */
    unsigned                              pinging:1;   /* PING unanswered */
};


char *ngx_http_civicgate_redis(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_http_civicgate_redis_script_t *ngx_http_civicgate_redis_add_script(
    ngx_conf_t *cf, ngx_http_civicgate_redis_conf_t *rcf, const char *body);

/* a command's arguments, built one by one; EVALSHA's three come first */
#define NGX_HTTP_CIVICGATE_REDIS_ARGS  16

typedef struct {
    const char                           *argv[NGX_HTTP_CIVICGATE_REDIS_ARGS];
    size_t                                lens[NGX_HTTP_CIVICGATE_REDIS_ARGS];
    int                                   argc;
} ngx_http_civicgate_redis_args_t;

#define ngx_http_civicgate_redis_arg(a, data, len)                            \
    (a)->argv[(a)->argc] = (const char *) (data);                             \
    (a)->lens[(a)->argc++] = (len)

#define ngx_http_civicgate_redis_arg_str(a, s)                                \
    ngx_http_civicgate_redis_arg(a, s, sizeof(s) - 1)

void ngx_http_civicgate_redis_evalsha(ngx_http_civicgate_redis_args_t *a,
    ngx_http_civicgate_redis_script_t *script, const char *nkeys);

ngx_http_civicgate_redis_t *ngx_http_civicgate_redis_create(
    ngx_cycle_t *cycle, ngx_http_civicgate_redis_conf_t *conf);
void ngx_http_civicgate_redis_start(ngx_http_civicgate_redis_t *rc);
void ngx_http_civicgate_redis_destroy(ngx_http_civicgate_redis_t *rc);

ngx_http_civicgate_redis_cmd_t *ngx_http_civicgate_redis_send(
    ngx_http_civicgate_redis_t *rc, int argc, const char **argv,
    const size_t *argvlen, ngx_http_civicgate_redis_handler_pt handler,
    void *data);
ngx_http_civicgate_redis_cmd_t *ngx_http_civicgate_redis_prepare(
    ngx_http_civicgate_redis_t *rc, int argc, const char **argv,
    const size_t *argvlen, ngx_http_civicgate_redis_handler_pt handler,
    void *data);
void ngx_http_civicgate_redis_detach(ngx_http_civicgate_redis_cmd_t *cmd);
ngx_int_t ngx_http_civicgate_redis_requeue(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd, ngx_uint_t asking);
void ngx_http_civicgate_redis_abandon(ngx_http_civicgate_redis_cmd_t *cmd,
    ngx_http_civicgate_redis_t *owner);
void ngx_http_civicgate_redis_refused(ngx_http_civicgate_redis_t *rc,
    redisReply *reply, const char *what,
    ngx_http_civicgate_log_limit_t *logged);
ngx_int_t ngx_http_civicgate_redis_push(ngx_http_civicgate_redis_t *rc,
    int argc, const char **argv, const size_t *argvlen);
void ngx_http_civicgate_redis_load_scripts(ngx_http_civicgate_redis_t *rc);
/* the connection's read handler; not static: fuzz/resp.c drives it */
void ngx_http_civicgate_redis_read(ngx_event_t *rev);

#define ngx_http_civicgate_redis_ready(rc)                                    \
    ((rc) != NULL && (rc)->state == NGX_HTTP_CIVICGATE_REDIS_READY)

#define ngx_http_civicgate_redis_accepting(rc)                                \
    ((rc) != NULL && ((rc)->state == NGX_HTTP_CIVICGATE_REDIS_READY           \
                      || (rc)->state == NGX_HTTP_CIVICGATE_REDIS_CONNECTING))


#endif /* _NGX_HTTP_CIVICGATE_REDIS_H_INCLUDED_ */
