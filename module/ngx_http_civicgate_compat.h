
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_COMPAT_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_COMPAT_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


/*
 * The one place that knows which nginx it is built against: Debian 12
 * ships 1.22, Debian 13 ships 1.26.
 *
 * nginx 1.23.0 chains repeated headers through ngx_table_elt_t.next
 * instead of collecting them in arrays: the request's Cookie headers are
 * r->headers_in.cookie (was the array r->headers_in.cookies), and
 * ngx_http_parse_multi_header_lines() takes the request and the first
 * header of the chain, and returns the header found (was NGX_DECLINED or
 * its index).  A header added to a list must end its chain.
 */


#if (nginx_version >= 1023000)

static ngx_inline ngx_int_t
ngx_http_civicgate_cookie(ngx_http_request_t *r, ngx_str_t *name,
    ngx_str_t *value)
{
    if (ngx_http_parse_multi_header_lines(r, r->headers_in.cookie, name,
                                          value)
        == NULL)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}

#else

static ngx_inline ngx_int_t
ngx_http_civicgate_cookie(ngx_http_request_t *r, ngx_str_t *name,
    ngx_str_t *value)
{
    if (ngx_http_parse_multi_header_lines(&r->headers_in.cookies, name, value)
        == NGX_DECLINED)
    {
        return NGX_DECLINED;
    }

    return NGX_OK;
}

#endif


/* ngx_list_push() for a header list: the new header is not chained */

static ngx_inline ngx_table_elt_t *
ngx_http_civicgate_push_header(ngx_list_t *headers)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(headers);

#if (nginx_version >= 1023000)
    if (h != NULL) {
        h->next = NULL;
    }
#endif

    return h;
}


#endif /* _NGX_HTTP_CIVICGATE_COMPAT_H_INCLUDED_ */
