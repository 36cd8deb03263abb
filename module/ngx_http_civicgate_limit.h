
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_LIMIT_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_LIMIT_H_INCLUDED_


#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_gcra.h"
#include "ngx_http_civicgate_table.h"
#include "ngx_http_civicgate_metrics.h"


#define NGX_HTTP_CIVICGATE_LIMIT_LOCAL      0
#define NGX_HTTP_CIVICGATE_LIMIT_REDIS      1

#define NGX_HTTP_CIVICGATE_ON_ERROR_LOCAL   0
#define NGX_HTTP_CIVICGATE_ON_ERROR_ALLOW   1
#define NGX_HTTP_CIVICGATE_ON_ERROR_DENY    2

#define NGX_HTTP_CIVICGATE_LIMIT_MAX        8
#define NGX_HTTP_CIVICGATE_KEY_DIGEST       16


typedef struct {
    ngx_str_t                          name;
    ngx_shm_zone_t                    *shm_zone;
    ngx_http_civicgate_table_t         table;
    ngx_http_complex_value_t           key;
    uint64_t                           interval;     /* us per request */
    ngx_uint_t                         quota;        /* per window */
    ngx_uint_t                         window;       /* s: 1 or 60 */
    ngx_uint_t                         store;        /* NGX_CONF_UNSET_UINT */
    ngx_uint_t                         on_error;
    ngx_uint_t                         index;        /* metrics label */
    u_char                            *file;         /* for late errors */
    ngx_uint_t                         line;

    ngx_msec_t                         sync;         /* 0: exact */
    ngx_uint_t                         sync_index;   /* metrics label */
    ngx_event_t                        sync_event;   /* the syncing worker */
    ngx_uint_t                         sync_out;     /* calls awaiting */
    unsigned                           sync_failed:1;  /* since a success */
} ngx_http_civicgate_limit_zone_t;


typedef struct {
    ngx_http_civicgate_limit_zone_t   *zone;
    ngx_shm_zone_t                    *shm_zone;     /* until resolved */
    u_char                            *file;         /* for late errors */
    ngx_uint_t                         line;
    ngx_uint_t                         burst;
    ngx_uint_t                         delay;
} ngx_http_civicgate_limit_t;


typedef struct {
    ngx_http_civicgate_limit_t        *limit;
    /* KEY_DIGEST bytes, zero-padded to a table key */
    u_char                             digest[NGX_HTTP_CIVICGATE_TABLE_KEY];
    ngx_http_civicgate_gcra_result_t   result;
    /* what the check found, valid while the zone's lock is held */
    ngx_http_civicgate_table_node_t   *node;
    uint64_t                           tat_before;  /* to give a charge back */
    uint64_t                           tat_after;
    ngx_uint_t                         slot;        /* cluster: of its key */
    unsigned                           remote:1;
    unsigned                           failed:1;    /* Redis did not answer */
    unsigned                           skipped:1;   /* on_error allow/deny */
    unsigned                           looked_up:1; /* local excess known */
    unsigned                           charged:1;   /* locally, tat_after */
} ngx_http_civicgate_limit_state_t;


/* the exact checks of the requests of one event-loop iteration */
typedef struct {
    ngx_pool_t                        *pool;
    ngx_array_t                        waiters;      /* of waiter_t * */
    ngx_uint_t                         nkeys;
    ngx_uint_t                         out;          /* calls, + 1 sending */
} ngx_http_civicgate_limit_batch_t;


typedef struct {
    ngx_array_t                        zones;        /* of zone_t * */
    ngx_uint_t                         nsync;        /* zones with sync= */

    ngx_http_civicgate_redis_script_t *script;       /* exact checks */
    ngx_http_civicgate_redis_script_t *sync_script;
    ngx_http_civicgate_redis_script_t *refund_script;  /* cluster */
    ngx_uint_t                         cluster;      /* calls per slot */

    /* per worker: the batch being collected, flushed from a posted event */
    ngx_http_civicgate_limit_batch_t  *batch;
    ngx_event_t                        flush;
    ngx_uint_t                         out;          /* batches awaiting */

    ngx_http_civicgate_family_t       *syncs;        /* metrics */
    ngx_http_civicgate_family_t       *synced_keys;
} ngx_http_civicgate_limit_main_conf_t;


typedef struct {
    ngx_array_t                       *limits;       /* of limit_t */
    ngx_flag_t                         limit_dry_run;
    ngx_uint_t                         limit_status;
    ngx_uint_t                         limit_log_level;
    ngx_flag_t                         limit_headers;
} ngx_http_civicgate_limit_loc_conf_t;


typedef struct ngx_http_civicgate_limit_waiter_s
    ngx_http_civicgate_limit_waiter_t;


/* per request, in the core's ctx: a rejection is not charged twice */
typedef struct {
    ngx_http_civicgate_step_t          step;
    ngx_http_civicgate_limit_waiter_t *waiter;      /* in a batch */
    ngx_http_civicgate_limit_state_t   states[NGX_HTTP_CIVICGATE_LIMIT_MAX];
    ngx_uint_t                         nstates;
    ngx_str_t                          status;
    uint64_t                           delay_us;
    unsigned                           rejected:1;
} ngx_http_civicgate_limit_ctx_t;


/* a request in a batch; NULL once it is gone */
struct ngx_http_civicgate_limit_waiter_s {
    ngx_http_request_t                *request;
    ngx_http_civicgate_limit_ctx_t    *lctx;       /* the request's pool */
    ngx_uint_t                         pending;     /* calls awaiting */
};


extern ngx_module_t  ngx_http_civicgate_limit_module;


#endif /* _NGX_HTTP_CIVICGATE_LIMIT_H_INCLUDED_ */
