
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_journey.h"
#include "ngx_http_civicgate_metrics.h"


static ngx_int_t ngx_http_civicgate_set_cookie(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx, ngx_http_civicgate_journey_conf_t *jcf);


ngx_int_t
ngx_http_civicgate_channel_resolve(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx)
{
    int                              n;
    ngx_str_t                        value;
    ngx_http_civicgate_loc_conf_t   *cglcf;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    if (ctx->channel_done) {
        return NGX_OK;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_module);

    ctx->channel = cgmcf->nchannels;

    if (cglcf->channel != NULL) {
        if (ngx_http_complex_value(r, cglcf->channel, &value) != NGX_OK) {
            return NGX_ERROR;
        }

        /* control bytes and over-long values match no configured name */
        n = ngx_http_civicgate_channel_match(value.data, value.len,
                                             cgmcf->channels,
                                             cgmcf->nchannels);
        if (n >= 0) {
            ctx->channel = n;
        }
    }

    ctx->channel_done = 1;

    return NGX_OK;
}


void
ngx_http_civicgate_channel_name(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx, ngx_str_t *name)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    if (ctx->channel < cgmcf->nchannels) {
        name->len = cgmcf->channels[ctx->channel].len;
        name->data = (u_char *) cgmcf->channels[ctx->channel].data;

    } else {
        ngx_str_set(name, "unknown");
    }
}


ngx_int_t
ngx_http_civicgate_journey_resolve(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx)
{
    u_char                              raw[NGX_HTTP_CIVICGATE_JID_RAW];
    ngx_str_t                           value;
    ngx_uint_t                          outcome;
    ngx_http_civicgate_loc_conf_t      *cglcf;
    ngx_http_civicgate_main_conf_t     *cgmcf;

    if (ctx->journey_done) {
        return NGX_OK;
    }

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_module);

    if (!cglcf->journey->enable) {
        return NGX_OK;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    outcome = NGX_HTTP_CIVICGATE_JOURNEY_MINTED;

    if (ngx_http_civicgate_journey_input(r, cglcf->journey, &value) == NGX_OK)
    {
        if (ngx_http_civicgate_jid_parse(value.data, value.len, raw) == 0
            && ngx_http_civicgate_jid_verify(cgmcf->keyring, raw) >= 0)
        {
            outcome = NGX_HTTP_CIVICGATE_JOURNEY_REUSED;

        } else {
            /* the presented value is never logged: it is client input */
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "civicgate: invalid journey ID replaced");
            ngx_http_civicgate_metrics_inc(cgmcf->metrics,
                                           cgmcf->metrics->journeys,
                                           NGX_HTTP_CIVICGATE_JOURNEY_FORGED);
        }
    }

    if (outcome == NGX_HTTP_CIVICGATE_JOURNEY_MINTED) {
        if (ngx_http_civicgate_jid_mint(cgmcf->keyring, raw) != 0) {
            ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                          "civicgate: journey ID minting failed");
            return NGX_ERROR;
        }

        ctx->journey_new = 1;
    }

    ngx_http_civicgate_metrics_inc(cgmcf->metrics, cgmcf->metrics->journeys,
                                   outcome);

    ngx_http_civicgate_jid_format(raw, ctx->journey_id);
    ctx->journey_on = 1;
    ctx->journey_done = 1;

    return NGX_OK;
}


/* the header wins over the cookie: apps and channel backends send it */

ngx_int_t
ngx_http_civicgate_journey_input(ngx_http_request_t *r,
    ngx_http_civicgate_journey_conf_t *jcf, ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_http_civicgate_find_header(r, &jcf->header);

    if (h != NULL && h->value.len) {
        *value = h->value;
        return NGX_OK;
    }

    if (jcf->cookie.len
        && ngx_http_civicgate_cookie(r, &jcf->cookie, value) == NGX_OK
        && value->len)
    {
        return NGX_OK;
    }

    return NGX_DECLINED;
}


ngx_table_elt_t *
ngx_http_civicgate_find_header(ngx_http_request_t *r, ngx_str_t *name)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == name->len
            && ngx_strncasecmp(h[i].key.data, name->data, name->len) == 0)
        {
            return &h[i];
        }
    }
}


ngx_int_t
ngx_http_civicgate_citizen_resolve(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx)
{
    ngx_str_t                        value;
    ngx_http_civicgate_loc_conf_t   *cglcf;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    if (ctx->citizen_done) {
        return NGX_OK;
    }

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_module);

    if (cglcf->citizen != NULL) {
        if (ngx_http_complex_value(r, cglcf->citizen, &value) != NGX_OK) {
            return NGX_ERROR;
        }

        if (value.len) {
            cgmcf = ngx_http_get_module_main_conf(r,
                                                  ngx_http_civicgate_module);

            if (ngx_http_civicgate_pseudonym(cgmcf->keyring, value.data,
                                             value.len, ctx->citizen)
                != 0)
            {
                return NGX_ERROR;
            }

            ctx->citizen_set = 1;

        } else {
            /*
             * Not known yet: an identity set by auth_request_set appears
             * in the access phase, after the limits asked; consent and
             * events ask again.
             */
            return NGX_OK;
        }
    }

    ctx->citizen_done = 1;

    return NGX_OK;
}


ngx_int_t
ngx_http_civicgate_journey_headers(ngx_http_request_t *r)
{
    ngx_table_elt_t                 *h;
    ngx_http_civicgate_ctx_t        *ctx;
    ngx_http_civicgate_loc_conf_t   *cglcf;

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_module);

    if (!cglcf->journey->enable || r != r->main) {
        return NGX_OK;
    }

    ctx = ngx_http_civicgate_get_ctx(r);
    if (ctx == NULL) {
        return NGX_ERROR;
    }

    if (ctx->headers_done) {
        return NGX_OK;
    }

    if (ngx_http_civicgate_journey_resolve(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    ctx->headers_done = 1;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key = cglcf->journey->header;
    h->value.data = ctx->journey_id;
    h->value.len = NGX_HTTP_CIVICGATE_JID_LEN;

    if (ctx->journey_new && cglcf->journey->cookie.len) {
        return ngx_http_civicgate_set_cookie(r, ctx, cglcf->journey);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_set_cookie(ngx_http_request_t *r,
    ngx_http_civicgate_ctx_t *ctx, ngx_http_civicgate_journey_conf_t *jcf)
{
    u_char           *p;
    size_t            len;
    ngx_table_elt_t  *h;

    len = jcf->cookie.len + 1 + NGX_HTTP_CIVICGATE_JID_LEN
          + jcf->cookie_attrs.len;

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Set-Cookie");
    h->value.data = p;
    h->value.len = len;

    p = ngx_cpymem(p, jcf->cookie.data, jcf->cookie.len);
    *p++ = '=';
    p = ngx_cpymem(p, ctx->journey_id, NGX_HTTP_CIVICGATE_JID_LEN);
    ngx_memcpy(p, jcf->cookie_attrs.data, jcf->cookie_attrs.len);

    return NGX_OK;
}
