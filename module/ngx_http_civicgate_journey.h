
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_JOURNEY_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_JOURNEY_H_INCLUDED_


#include "ngx_http_civicgate_module.h"


ngx_int_t ngx_http_civicgate_channel_resolve(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx);
void ngx_http_civicgate_channel_name(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx, ngx_str_t *name);
ngx_int_t ngx_http_civicgate_journey_resolve(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx);
/* not static: fuzz/journey_id.c calls it */
ngx_int_t ngx_http_civicgate_journey_input(ngx_http_request_t *r,
    ngx_http_civicgate_journey_conf_t *jcf, ngx_str_t *value);
ngx_int_t ngx_http_civicgate_citizen_resolve(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx);
ngx_int_t ngx_http_civicgate_journey_headers(ngx_http_request_t *r);
ngx_table_elt_t *ngx_http_civicgate_find_header(ngx_http_request_t *r,
    ngx_str_t *name);


#endif /* _NGX_HTTP_CIVICGATE_JOURNEY_H_INCLUDED_ */
