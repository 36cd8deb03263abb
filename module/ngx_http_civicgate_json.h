
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_JSON_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_JSON_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <jansson.h>


#define NGX_HTTP_CIVICGATE_PROBLEM      "urn:civicgate:problem:"

/* nginx has no name for it */
#define NGX_HTTP_CIVICGATE_NOT_ACCEPTABLE  406


json_t *ngx_http_civicgate_problem_new(ngx_uint_t status, const char *type,
    const char *title, const char *detail);
ngx_int_t ngx_http_civicgate_json_send(ngx_http_request_t *r,
    ngx_uint_t status, ngx_str_t *content_type, json_t *json);
ngx_int_t ngx_http_civicgate_problem_send(ngx_http_request_t *r,
    ngx_uint_t status, json_t *problem);
ngx_int_t ngx_http_civicgate_json_dump(ngx_pool_t *pool, json_t *json,
    ngx_uint_t sorted, ngx_str_t *out);
ngx_int_t ngx_http_civicgate_send(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *content_type, ngx_str_t *body);
ngx_int_t ngx_http_civicgate_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *detail);
ngx_int_t ngx_http_civicgate_read_json(ngx_http_request_t *r, json_t **json);
ngx_int_t ngx_http_civicgate_method_not_allowed(ngx_http_request_t *r,
    const char *allow);


#endif /* _NGX_HTTP_CIVICGATE_JSON_H_INCLUDED_ */
