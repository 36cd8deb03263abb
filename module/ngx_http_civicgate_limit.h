
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_LIMIT_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_LIMIT_H_INCLUDED_


#include "ngx_http_civicgate_module.h"
#include "ngx_http_civicgate_gcra.h"
#include "ngx_http_civicgate_table.h"


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
    uint64_t                           tat_before;  /* to give a charge back */
    uint64_t                           tat_after;
    unsigned                           remote:1;
    unsigned                           skipped:1;   /* on_error allow/deny */
    unsigned                           looked_up:1; /* local excess known */
    unsigned                           charged:1;   /* locally, tat_after */
} ngx_http_civicgate_limit_state_t;


/* per request, hung off the module ctx */
struct ngx_http_civicgate_limit_ctx_s {
    ngx_http_civicgate_step_t          step;
    ngx_http_civicgate_limit_state_t   states[NGX_HTTP_CIVICGATE_LIMIT_MAX];
    ngx_uint_t                         nstates;
    ngx_str_t                          status;
    uint64_t                           delay_us;
    unsigned                           rejected:1;
};


char *ngx_http_civicgate_limit_zone(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_civicgate_limit(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_civicgate_limit_init_conf(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf);
char *ngx_http_civicgate_limit_merge(ngx_conf_t *cf,
    ngx_http_civicgate_loc_conf_t *prev, ngx_http_civicgate_loc_conf_t *conf);
ngx_int_t ngx_http_civicgate_limit_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_civicgate_limit_headers(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx);


#endif /* _NGX_HTTP_CIVICGATE_LIMIT_H_INCLUDED_ */
