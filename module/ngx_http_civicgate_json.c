
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_compat.h"
#include "ngx_http_civicgate_json.h"


static ngx_str_t  ngx_http_civicgate_problem_type =
    ngx_string("application/problem+json");


/* RFC 9457: type, title, status, detail; callers add extension members */

json_t *
ngx_http_civicgate_problem_new(ngx_uint_t status, const char *type,
    const char *title, const char *detail)
{
    json_t  *problem;

    problem = json_pack("{s:s, s:s, s:i, s:s}",
                        "type", type, "title", title,
                        "status", (json_int_t) status, "detail", detail);

    return problem;
}


/*
 * Sends a complete JSON response and consumes the json reference; the
 * caller finalizes the request with what this returns.
 */

ngx_int_t
ngx_http_civicgate_json_send(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *content_type, json_t *json)
{
    ngx_str_t  body;

    if (ngx_http_civicgate_json_dump(r->pool, json, 0, &body) != NGX_OK) {
        json_decref(json);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    json_decref(json);

    return ngx_http_civicgate_send(r, status, content_type, &body);
}


/* compact JSON and a newline, in the pool; sorted keys for signing */

ngx_int_t
ngx_http_civicgate_json_dump(ngx_pool_t *pool, json_t *json,
    ngx_uint_t sorted, ngx_str_t *out)
{
    size_t  len, flags;

    if (json == NULL) {
        return NGX_ERROR;
    }

    flags = JSON_COMPACT | (sorted ? JSON_SORT_KEYS : 0);
    len = json_dumpb(json, NULL, 0, flags);

    out->data = ngx_pnalloc(pool, len + 1);
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    out->len = json_dumpb(json, (char *) out->data, len, flags);

    if (!sorted) {
        out->data[out->len++] = '\n';
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_civicgate_send(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *content_type, ngx_str_t *body)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->pos = body->data;
    b->last = body->data + body->len;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = status;
    r->headers_out.content_type = *content_type;
    r->headers_out.content_type_len = content_type->len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n = b->last - b->pos;

    if (r->headers_out.content_length) {
        r->headers_out.content_length->hash = 0;
        r->headers_out.content_length = NULL;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


ngx_int_t
ngx_http_civicgate_problem_send(ngx_http_request_t *r, ngx_uint_t status,
    json_t *problem)
{
    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    return ngx_http_civicgate_json_send(r, status,
                                        &ngx_http_civicgate_problem_type,
                                        problem);
}


/* a problem whose type is civicgate's own: "urn:civicgate:problem:TYPE" */

ngx_int_t
ngx_http_civicgate_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *type, const char *detail)
{
    u_char       uri[64];
    const char  *title;

    ngx_snprintf(uri, sizeof(uri) - 1, NGX_HTTP_CIVICGATE_PROBLEM "%s%Z",
                 type);
    uri[sizeof(uri) - 1] = '\0';

    switch (status) {
    case NGX_HTTP_BAD_REQUEST:
        title = "Bad request";
        break;
    case NGX_HTTP_NOT_FOUND:
        title = "Not found";
        break;
    case NGX_HTTP_NOT_ALLOWED:
        title = "Method not allowed";
        break;
    case NGX_HTTP_REQUEST_ENTITY_TOO_LARGE:
        title = "Body too large";
        break;
    case NGX_HTTP_CIVICGATE_NOT_ACCEPTABLE:
        title = "Not acceptable";
        break;
    case NGX_HTTP_TOO_MANY_REQUESTS:
        title = "Too many requests";
        break;
    default:
        title = "Service unavailable";
    }

    return ngx_http_civicgate_problem_send(r, status,
               ngx_http_civicgate_problem_new(status, (char *) uri, title,
                                              detail));
}


ngx_int_t
ngx_http_civicgate_method_not_allowed(ngx_http_request_t *r,
    const char *allow)
{
    ngx_table_elt_t  *h;

    (void) ngx_http_discard_request_body(r);

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Allow");
    h->value.data = (u_char *) allow;
    h->value.len = ngx_strlen(allow);

    return ngx_http_civicgate_error(r, NGX_HTTP_NOT_ALLOWED,
                                    "method-not-allowed",
                                    "This method is not allowed here.");
}


/*
 * The request body as a JSON object: NGX_DECLINED with the object (NULL
 * for an empty body), or the code of the answer already sent: 413 for a
 * body that went to a temporary file (larger than client_body_buffer_size),
 * 400 for anything but a JSON object.  Bodies are read in memory only, and
 * may arrive in two buffers (what came with the headers, then the rest).
 */

ngx_int_t
ngx_http_civicgate_read_json(ngx_http_request_t *r, json_t **json)
{
    u_char        *p;
    size_t         len;
    ngx_buf_t     *b;
    ngx_chain_t   *cl;
    json_error_t   error;

    *json = NULL;

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return NGX_DECLINED;
    }

    if (r->request_body->temp_file) {
        return ngx_http_civicgate_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                   "body-too-large",
                   "The request body is larger than this endpoint accepts.");
    }

    len = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        len += ngx_buf_size(cl->buf);
    }

    if (len == 0) {
        return NGX_DECLINED;
    }

    b = r->request_body->bufs->buf;
    p = b->pos;

    if (r->request_body->bufs->next) {
        p = ngx_pnalloc(r->pool, len);
        if (p == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        len = 0;

        for (cl = r->request_body->bufs; cl; cl = cl->next) {
            ngx_memcpy(p + len, cl->buf->pos, ngx_buf_size(cl->buf));
            len += ngx_buf_size(cl->buf);
        }
    }

    *json = json_loadb((char *) p, len, JSON_REJECT_DUPLICATES, &error);

    if (!json_is_object(*json)) {
        json_decref(*json);
        *json = NULL;
        return ngx_http_civicgate_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid-body",
                                        "The body must be a JSON object.");
    }

    return NGX_DECLINED;
}
