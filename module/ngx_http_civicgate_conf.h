
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_CONF_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_CONF_H_INCLUDED_


#include "ngx_http_civicgate_core.h"


char *ngx_http_civicgate_secret_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_civicgate_channels(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
void ngx_http_civicgate_needs_keys(ngx_conf_t *cf, const char *directive);
char *ngx_http_civicgate_service(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

ngx_int_t ngx_http_civicgate_default_channels(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf);
ngx_int_t ngx_http_civicgate_read_file(ngx_conf_t *cf, ngx_str_t *name,
    ngx_str_t *text);
ngx_int_t ngx_http_civicgate_flag_param(ngx_conf_t *cf, ngx_str_t *value,
    size_t prefix, ngx_flag_t *flag);
ngx_int_t ngx_http_civicgate_zone_param(ngx_conf_t *cf, ngx_str_t *value,
    ngx_str_t *name, ssize_t *size);


#endif /* _NGX_HTTP_CIVICGATE_CONF_H_INCLUDED_ */
