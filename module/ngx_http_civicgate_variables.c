
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_module.h"
#include "ngx_http_civicgate_journey.h"
#include "ngx_http_civicgate_limit.h"
#include "ngx_http_civicgate_consent.h"


static ngx_int_t ngx_http_civicgate_channel_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_journey_id_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_journey_new_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_citizen_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_service_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_limit_status_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_consent_status_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static void ngx_http_civicgate_variable_set(ngx_http_variable_value_t *v,
    u_char *data, size_t len);


static ngx_http_variable_t  ngx_http_civicgate_vars[] = {

    { ngx_string("civicgate_channel"), NULL,
      ngx_http_civicgate_channel_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("civicgate_journey_id"), NULL,
      ngx_http_civicgate_journey_id_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("civicgate_journey_new"), NULL,
      ngx_http_civicgate_journey_new_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("civicgate_citizen"), NULL,
      ngx_http_civicgate_citizen_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("civicgate_service"), NULL,
      ngx_http_civicgate_service_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("civicgate_limit_status"), NULL,
      ngx_http_civicgate_limit_status_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("civicgate_consent_status"), NULL,
      ngx_http_civicgate_consent_status_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


ngx_int_t
ngx_http_civicgate_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_civicgate_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_channel_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                  name;
    ngx_http_civicgate_ctx_t  *ctx;

    ctx = ngx_http_civicgate_get_ctx(r);
    if (ctx == NULL || ngx_http_civicgate_channel_resolve(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_http_civicgate_channel_name(r, ctx, &name);
    ngx_http_civicgate_variable_set(v, name.data, name.len);

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_journey_id_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_civicgate_ctx_t  *ctx;

    ctx = ngx_http_civicgate_get_ctx(r);
    if (ctx == NULL || ngx_http_civicgate_journey_resolve(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_http_civicgate_variable_set(v, ctx->journey_id,
                                    ctx->journey_on
                                    ? NGX_HTTP_CIVICGATE_JID_LEN : 0);
    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_journey_new_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_civicgate_ctx_t  *ctx;

    ctx = ngx_http_civicgate_get_ctx(r);
    if (ctx == NULL || ngx_http_civicgate_journey_resolve(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    if (!ctx->journey_on) {
        ngx_http_civicgate_variable_set(v, NULL, 0);

    } else {
        ngx_http_civicgate_variable_set(v, (u_char *) (ctx->journey_new
                                                       ? "1" : "0"), 1);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_citizen_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_civicgate_ctx_t  *ctx;

    ctx = ngx_http_civicgate_get_ctx(r);
    if (ctx == NULL || ngx_http_civicgate_citizen_resolve(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_http_civicgate_variable_set(v, ctx->citizen,
                                    ctx->citizen_set
                                    ? NGX_HTTP_CIVICGATE_PSEUDONYM_LEN : 0);
    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_service_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_civicgate_loc_conf_t  *cglcf;

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_module);

    ngx_http_civicgate_variable_set(v, cglcf->service.data,
                                    cglcf->service.len);
    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_limit_status_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_civicgate_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_civicgate_module);

    if (ctx == NULL || ctx->limit == NULL || ctx->limit->status.len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    ngx_http_civicgate_variable_set(v, ctx->limit->status.data,
                                    ctx->limit->status.len);
    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_consent_status_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                 *name;
    ngx_http_civicgate_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_civicgate_module);

    if (ctx == NULL || ctx->consent == NULL || !ctx->consent->step.done) {
        v->not_found = 1;
        return NGX_OK;
    }

    name = ngx_http_civicgate_consent_status_name(ctx->consent->status);
    ngx_http_civicgate_variable_set(v, name->data, name->len);

    return NGX_OK;
}


static void
ngx_http_civicgate_variable_set(ngx_http_variable_value_t *v, u_char *data,
    size_t len)
{
    v->len = len;
    v->valid = 1;
    v->no_cacheable = 1;
    v->not_found = 0;
    v->data = len ? data : (u_char *) "";
}
