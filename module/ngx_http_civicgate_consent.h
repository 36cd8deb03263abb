
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_CONSENT_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_CONSENT_H_INCLUDED_


#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_table.h"
#include <jansson.h>


#define NGX_HTTP_CIVICGATE_PURPOSES_MAX       8      /* per location */
#define NGX_HTTP_CIVICGATE_PURPOSES_ALL       255    /* in the list */

#define NGX_HTTP_CIVICGATE_CONSENT_GRANTED    0
#define NGX_HTTP_CIVICGATE_CONSENT_DENIED     1
#define NGX_HTTP_CIVICGATE_CONSENT_MISSING    2
#define NGX_HTTP_CIVICGATE_CONSENT_ERROR      3

/* the data-use log: kept a year by default, at most ten */
#define NGX_HTTP_CIVICGATE_USES_RETENTION      (365 * 86400)
#define NGX_HTTP_CIVICGATE_USES_RETENTION_MAX  (3653 * 86400)

#define NGX_HTTP_CIVICGATE_ON_ERROR_CONSENT_DENY   0
#define NGX_HTTP_CIVICGATE_ON_ERROR_CONSENT_ALLOW  1



typedef struct {
    ngx_str_t                            name;
    ngx_str_t                            label_id;
    ngx_str_t                            label_en;
    ngx_uint_t                           index;
} ngx_http_civicgate_purpose_t;


typedef struct {
    ngx_array_t                          purposes;  /* of purpose_t */
    ngx_shm_zone_t                      *cache;
    ngx_http_civicgate_table_t           table;   /* sh NULL: no cache */
    ngx_msec_t                           ttl;
    ngx_msec_t                           negative_ttl;
    ngx_str_t                            grant_url;
    ngx_http_civicgate_redis_script_t   *script;
    ngx_uint_t                           used;
    time_t                               uses_retention;  /* 0: off */
    ngx_http_civicgate_redis_script_t   *uses_script;
} ngx_http_civicgate_consent_conf_t;


typedef struct {
    ngx_array_t                         *consent_names;  /* of ngx_str_t */
    ngx_array_t                         *consents;  /* of purpose_t * */
    ngx_uint_t                           consent_on_error;
    u_char                              *consent_file;  /* for late errors */
    ngx_uint_t                           consent_line;
} ngx_http_civicgate_consent_loc_conf_t;


typedef struct {
    ngx_http_civicgate_purpose_t        *purpose;
    unsigned                             known:1;
    unsigned                             granted:1;
} ngx_http_civicgate_consent_state_t;


/* one request's checks; the step is that of the location being passed */
typedef struct {
    ngx_http_civicgate_consent_loc_conf_t *loc;
    ngx_uint_t                           pass;     /* r->uri_changes */
    uint8_t                              granted[
                                    (NGX_HTTP_CIVICGATE_PURPOSES_ALL + 8) / 8];
    ngx_http_civicgate_step_t            step;
    ngx_http_civicgate_consent_state_t
                                      states[NGX_HTTP_CIVICGATE_PURPOSES_MAX];
    ngx_uint_t                           nstates;
    ngx_uint_t                           status;
    u_char                              *citizen;  /* the journey's */
    uint64_t                             generation;
} ngx_http_civicgate_consent_ctx_t;


void ngx_http_civicgate_consent_message(ngx_http_civicgate_redis_t *rc,
    redisReply *reply);
ngx_str_t *ngx_http_civicgate_consent_status_name(ngx_uint_t status);

ngx_http_civicgate_purpose_t *ngx_http_civicgate_purpose_find(
    ngx_http_civicgate_consent_conf_t *ccf, u_char *name, size_t len);
ngx_int_t ngx_http_civicgate_consent_record_valid(json_t *record,
    int64_t now);
void ngx_http_civicgate_consent_evict(ngx_http_civicgate_consent_conf_t *ccf,
    u_char *citizen);
ngx_uint_t ngx_http_civicgate_lang_id(ngx_http_request_t *r);
ngx_int_t ngx_http_civicgate_consent_problem(ngx_http_request_t *r,
    ngx_uint_t status, ngx_http_civicgate_purpose_t *purpose);

ngx_int_t ngx_http_civicgate_consent_requires(ngx_conf_t *cf,
    const char *directive, u_char *file, ngx_uint_t line);

/* GET <consent API>uses: the citizen's data-use log */
ngx_int_t ngx_http_civicgate_uses_init(ngx_conf_t *cf,
    ngx_http_civicgate_consent_conf_t *ccf,
    ngx_http_civicgate_redis_conf_t *redis);
ngx_int_t ngx_http_civicgate_uses_read(ngx_http_request_t *r,
    u_char *citizen);

/* the consent API's body check; not static: fuzz/read_json.c calls it */
ngx_int_t ngx_http_civicgate_consent_options(json_t *body, ngx_uint_t grant,
    json_t *record, const char **error);


extern ngx_module_t  ngx_http_civicgate_consent_module;


#endif /* _NGX_HTTP_CIVICGATE_CONSENT_H_INCLUDED_ */
