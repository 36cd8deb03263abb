
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_STATUS_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_STATUS_H_INCLUDED_


#include <jansson.h>

#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_gcra.h"
#include "ngx_http_civicgate_table.h"


#define NGX_HTTP_CIVICGATE_LANG_ID      0
#define NGX_HTTP_CIVICGATE_LANG_EN      1
#define NGX_HTTP_CIVICGATE_LANG_ALL     2
#define NGX_HTTP_CIVICGATE_LANGS        3


/* a change: what subscribers of a topic are sent, in order */
#define NGX_HTTP_CIVICGATE_RING         64
#define NGX_HTTP_CIVICGATE_SID_LEN      (2 * NGX_INT64_LEN + 1)

/* Retry-After of a client refused for the cap, seconds */
#define NGX_HTTP_CIVICGATE_CLIENTS_RETRY  "5"


/* a Redis stream entry ID, "ms-seq" */
typedef struct {
    uint64_t                            ms;
    uint64_t                            seq;
} ngx_http_civicgate_sid_t;


typedef struct {
    ngx_http_civicgate_main_conf_t     *core;
    ngx_uint_t                          used;
    u_char                             *file;     /* for late errors */
    ngx_uint_t                          line;
    ngx_uint_t                          history;
    ngx_uint_t                          max_clients;  /* per worker */
    ngx_http_civicgate_redis_script_t  *change_script;
    ngx_http_civicgate_redis_script_t  *since_script;
    ngx_http_civicgate_redis_script_t  *journey_script;

    /* notice lookups: a GCRA limit per client address, in shared memory */
    ngx_shm_zone_t                     *notice_zone;
    ngx_http_civicgate_table_t          notice_table;
    ngx_http_civicgate_gcra_limit_t     notice_limit;  /* interval 0: off */
    ngx_uint_t                          notice_limit_set;
} ngx_http_civicgate_status_conf_t;


typedef struct {
    ngx_uint_t                          status_language;
    ngx_msec_t                          status_max_wait;
    ngx_msec_t                          status_heartbeat;
} ngx_http_civicgate_status_loc_conf_t;


/* in a worker, after configuration */
#define ngx_http_civicgate_status_conf()                                      \
    ((ngx_http_civicgate_status_conf_t *)                                     \
         ngx_http_cycle_get_module_main_conf(ngx_cycle,                       \
                                           ngx_http_civicgate_status_module))


typedef struct {
    ngx_uint_t                          seq;      /* worker-local order */
    ngx_http_civicgate_sid_t            sid;
    ngx_str_t                           text[NGX_HTTP_CIVICGATE_LANGS];
    ngx_uint_t                          force;    /* a snapshot: always sent */
} ngx_http_civicgate_change_t;


/* what a set of streaming clients follows: services, or one journey */
typedef struct ngx_http_civicgate_topic_s  ngx_http_civicgate_topic_t;

typedef void (*ngx_http_civicgate_topic_pt)(ngx_http_civicgate_topic_t *t);

struct ngx_http_civicgate_topic_s {
    ngx_str_node_t                      node;     /* journeys, by ID */
    ngx_queue_t                         clients;
    ngx_queue_t                         pending;  /* before the subscription */
    ngx_http_civicgate_sid_t            version;  /* newest change pushed */
    ngx_http_civicgate_sid_t            from;     /* journeys: of a catch-up */
    ngx_uint_t                          seq;      /* of the newest change */
    ngx_uint_t                          nchanges;
    ngx_http_civicgate_change_t        *ring;
    ngx_uint_t                          ring_size;
    u_char                             *channel;  /* NUL-terminated */
    size_t                              channel_len;

    ngx_http_civicgate_redis_cmd_t     *cmd;      /* catch-up */
    ngx_uint_t                          gaps;     /* steps the ring missed */
    ngx_uint_t                          busy;     /* clients being walked */
    ngx_uint_t                          refs;     /* clients bound to it */

    unsigned                            subscribed:1;
    unsigned                            resubscribing:1;
    unsigned                            again:1;  /* catch up once more */
    ngx_http_civicgate_topic_pt         release;  /* when nothing holds it */
    unsigned                            journey:1;
};


typedef struct ngx_http_civicgate_client_s  ngx_http_civicgate_client_t;

typedef void (*ngx_http_civicgate_client_pt)(ngx_http_civicgate_client_t *cl);

/* one waiting or streaming request; fixed size, in the request pool */
struct ngx_http_civicgate_client_s {
    ngx_queue_t                         queue;
    ngx_http_request_t                 *request;
    ngx_http_civicgate_topic_t         *topic;
    ngx_http_civicgate_redis_cmd_t     *cmd;
    ngx_http_civicgate_client_pt        notify;   /* the topic changed */
    ngx_http_civicgate_client_pt        gone;     /* the request ends */
    ngx_http_civicgate_client_pt        deadline; /* timer, before waiting */
    ngx_event_handler_pt                read_handler;

    ngx_http_civicgate_sid_t            last;     /* last event ID sent */
    ngx_uint_t                          seq;      /* last change sent */
    ngx_uint_t                          gaps;     /* the topic's, at a read */
    ngx_uint_t                          lang;
    ngx_str_t                           etag;     /* long-poll: as given */
    u_char                              jid[NGX_HTTP_CIVICGATE_JID_LEN];

    ngx_buf_t                           buf;
    ngx_chain_t                         out;
    size_t                              size;     /* of buf's memory */
    ngx_event_t                         timer;    /* heartbeat, deadline */
    ngx_msec_t                          wait;

    unsigned                            sse:1;
    unsigned                            resume:1;
    unsigned                            queued:1;
    unsigned                            done:1;
    unsigned                            counted:1;
    unsigned                            again:1;  /* changed while asking */
    unsigned                            held:1;   /* counted against the cap */
};


ngx_int_t ngx_http_civicgate_status_apply(ngx_http_civicgate_sid_t *sid,
    ngx_str_t *name, ngx_str_t *record);

/* the admin body's check; not static: fuzz/status_body.c calls it */
json_t *ngx_http_civicgate_status_body(json_t *body, u_char *detail,
    size_t size, const char **error);

/* for the status page: the language asked for, the current document */
ngx_uint_t ngx_http_civicgate_status_lang(ngx_http_request_t *r);
ngx_int_t ngx_http_civicgate_status_document(ngx_uint_t lang,
    ngx_str_t *body);

/* shared by the services and the journey parts */
ngx_int_t ngx_http_civicgate_sid_parse(const u_char *p, size_t len,
    ngx_http_civicgate_sid_t *sid);
u_char *ngx_http_civicgate_sid_format(u_char *p,
    ngx_http_civicgate_sid_t *sid);
ngx_int_t ngx_http_civicgate_sid_cmp(ngx_http_civicgate_sid_t *a,
    ngx_http_civicgate_sid_t *b);
u_char *ngx_http_civicgate_time_ms(u_char *p, uint64_t ms);

ngx_http_civicgate_change_t *ngx_http_civicgate_topic_push(
    ngx_http_civicgate_topic_t *t, ngx_http_civicgate_sid_t *sid);
ngx_int_t ngx_http_civicgate_change_text(ngx_http_civicgate_change_t *ch,
    ngx_uint_t lang, const char *event, json_t *data, ngx_str_t *raw);
void ngx_http_civicgate_topic_notify(ngx_http_civicgate_topic_t *t);

void ngx_http_civicgate_clients_init(ngx_uint_t max);
ngx_uint_t ngx_http_civicgate_clients_full(void);
ngx_int_t ngx_http_civicgate_client_refuse(ngx_http_request_t *r);
ngx_http_civicgate_client_t *ngx_http_civicgate_client_create(
    ngx_http_request_t *r, ngx_http_civicgate_topic_t *t, ngx_uint_t hold);
ngx_int_t ngx_http_civicgate_sse_start(ngx_http_civicgate_client_t *cl);
ngx_int_t ngx_http_civicgate_sse_event(ngx_http_civicgate_client_t *cl,
    const char *event, ngx_http_civicgate_sid_t *sid, json_t *data,
    ngx_str_t *raw);
void ngx_http_civicgate_sse_flush(ngx_http_civicgate_client_t *cl);
ngx_int_t ngx_http_civicgate_sse_append(ngx_http_civicgate_client_t *cl,
    u_char *data, size_t len, ngx_uint_t grow);
void ngx_http_civicgate_sse_notify(ngx_http_civicgate_client_t *cl);
void ngx_http_civicgate_status_count(ngx_http_civicgate_client_t *cl,
    ngx_int_t n);
void ngx_http_civicgate_client_wait(ngx_http_civicgate_client_t *cl,
    ngx_msec_t wait);
void ngx_http_civicgate_client_finish(ngx_http_civicgate_client_t *cl,
    ngx_int_t rc);
ngx_int_t ngx_http_civicgate_last_event_id(ngx_http_request_t *r,
    ngx_http_civicgate_sid_t *sid);
ngx_msec_t ngx_http_civicgate_heartbeat(ngx_http_civicgate_client_t *cl);
ngx_int_t ngx_http_civicgate_status_park(ngx_http_request_t *r,
    ngx_uint_t lang, ngx_msec_t wait, ngx_str_t *etag,
    ngx_http_civicgate_topic_t *t, ngx_http_civicgate_client_pt notify);
ngx_int_t ngx_http_civicgate_set_stale(ngx_http_request_t *r);
ngx_uint_t ngx_http_civicgate_qvalue(u_char *p, u_char *end);
ngx_int_t ngx_http_civicgate_etag_matches(ngx_http_request_t *r,
    ngx_str_t *etag);
ngx_int_t ngx_http_civicgate_send_etag(ngx_http_request_t *r,
    ngx_str_t *body, ngx_str_t *etag, ngx_uint_t lang);
ngx_int_t ngx_http_civicgate_send_typed(ngx_http_request_t *r,
    ngx_str_t *body, ngx_str_t *etag, ngx_uint_t lang, ngx_str_t *type);

/* the notices part */
char *ngx_http_civicgate_notice_limit(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_civicgate_notice_init_conf(ngx_conf_t *cf,
    ngx_http_civicgate_status_conf_t *scf);
ngx_int_t ngx_http_civicgate_notice_lookup(ngx_http_request_t *r,
    ngx_str_t *code);

/* the journey part */
ngx_int_t ngx_http_civicgate_journey_status_init_conf(ngx_conf_t *cf,
    ngx_http_civicgate_status_conf_t *scf);
ngx_int_t ngx_http_civicgate_journey_status_init_worker(ngx_cycle_t *cycle,
    ngx_http_civicgate_main_conf_t *cgmcf);
json_t *ngx_http_civicgate_step_parse(u_char *p, size_t len,
    ngx_http_civicgate_sid_t *sid);
ngx_int_t ngx_http_civicgate_journey_status(ngx_http_request_t *r,
    ngx_str_t *id, ngx_uint_t sse, ngx_msec_t wait);
void ngx_http_civicgate_journey_message(ngx_str_t *channel,
    redisReply *payload);
void ngx_http_civicgate_journey_subscribed(ngx_str_t *channel);
void ngx_http_civicgate_journeys_resubscribe(void);
void ngx_http_civicgate_topic_release(ngx_http_civicgate_topic_t *t);


extern ngx_module_t  ngx_http_civicgate_status_module;


#endif /* _NGX_HTTP_CIVICGATE_STATUS_H_INCLUDED_ */
