
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_limit.h"


static ngx_int_t ngx_http_civicgate_service_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_limit_status_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);


static ngx_http_variable_t  ngx_http_civicgate_vars[] = {

    { ngx_string("civicgate_service"), NULL,
      ngx_http_civicgate_service_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("civicgate_limit_status"), NULL,
      ngx_http_civicgate_limit_status_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


ngx_int_t
ngx_http_civicgate_hub_variables(ngx_conf_t *cf)
{
    return ngx_http_civicgate_add_variables(cf, ngx_http_civicgate_vars);
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
