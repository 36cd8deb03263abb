
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_core.h"


/*
 * The admin endpoint: each path below it belongs to the concern that
 * registered it (consents/, services/, maintenance); a path ending in "/"
 * is a prefix with something after it, any other is exact.
 */


static ngx_int_t ngx_http_civicgate_admin_handler(ngx_http_request_t *r);


char *
ngx_http_civicgate_admin(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t        *clcf;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_civicgate_admin_handler;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    /* the requirements are checked at the end, pointing back at this line */
    if (cgmcf->admin_file == NULL) {
        cgmcf->admin_file = cf->conf_file->file.name.data;
        cgmcf->admin_line = cf->conf_file->line;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_civicgate_admin_handler(ngx_http_request_t *r)
{
    ngx_str_t                          rest, tail;
    ngx_uint_t                         i;
    ngx_http_civicgate_main_conf_t    *cgmcf;
    ngx_http_civicgate_admin_route_t  *route;

    if (ngx_http_civicgate_location_rest(r, &rest) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    route = cgmcf->admin_routes.elts;

    for (i = 0; i < cgmcf->admin_routes.nelts; i++) {

        if (route[i].path.data[route[i].path.len - 1] == '/') {
            if (rest.len <= route[i].path.len) {
                continue;
            }

        } else if (rest.len != route[i].path.len) {
            continue;
        }

        if (ngx_strncmp(rest.data, route[i].path.data, route[i].path.len)
            != 0)
        {
            continue;
        }

        tail.data = rest.data + route[i].path.len;
        tail.len = rest.len - route[i].path.len;

        return route[i].handler(r, &tail);
    }

    (void) ngx_http_discard_request_body(r);

    return ngx_http_civicgate_error(r, NGX_HTTP_NOT_FOUND, "not-found",
                                    "No such endpoint.");
}
