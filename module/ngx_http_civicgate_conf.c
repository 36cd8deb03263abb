
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_conf.h"


#define NGX_HTTP_CIVICGATE_SECRET_FILE_MAX  65536




static char  *ngx_http_civicgate_default_channel_names[] = {
    "web", "app", "sms", "email", "phone", "social", "counter", NULL
};


char *
ngx_http_civicgate_secret_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_main_conf_t *cgmcf = conf;

    char        err[256];
    u_char     *pid;
    size_t      pid_len;
    ngx_str_t  *value, text;
    ngx_uint_t  i;

    if (cgmcf->keyring != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;

    pid = NULL;
    pid_len = 0;

    for (i = 2; i < cf->args->nelts; i++) {
        if (ngx_strncmp(value[i].data, "pseudonym_key=", 14) == 0
            && value[i].len > 14)
        {
            pid = value[i].data + 14;
            pid_len = value[i].len - 14;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (ngx_conf_full_name(cf->cycle, &value[1], 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_civicgate_read_file(cf, &value[1], &text) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    cgmcf->keyring = ngx_pcalloc(cf->pool,
                                 sizeof(ngx_http_civicgate_keyring_t));
    if (cgmcf->keyring == NULL) {
        return NGX_CONF_ERROR;
    }

    if (ngx_http_civicgate_keyring_parse(cgmcf->keyring, text.data, text.len,
                                         pid, pid_len, err, sizeof(err))
        != 0)
    {
        ngx_explicit_memzero(text.data, text.len);
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "secret file \"%V\": %s",
                           &value[1], err);
        return NGX_CONF_ERROR;
    }

    ngx_explicit_memzero(text.data, text.len);
    cgmcf->secret_file = value[1];

    return NGX_CONF_OK;
}


ngx_int_t
ngx_http_civicgate_read_file(ngx_conf_t *cf, ngx_str_t *name, ngx_str_t *text)
{
    ssize_t          n;
    ngx_file_t       file;
    ngx_file_info_t  fi;

    ngx_memzero(&file, sizeof(ngx_file_t));
    file.name = *name;
    file.log = cf->log;

    file.fd = ngx_open_file(name->data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (file.fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_open_file_n " \"%V\" failed", name);
        return NGX_ERROR;
    }

    n = NGX_ERROR;

    if (ngx_fd_info(file.fd, &fi) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_fd_info_n " \"%V\" failed", name);
        goto done;
    }

    if (!ngx_is_file(&fi)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"%V\" is not a regular file", name);
        goto done;
    }

    if (ngx_file_size(&fi) > NGX_HTTP_CIVICGATE_SECRET_FILE_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "secret file \"%V\" is too large", name);
        goto done;
    }

    text->len = (size_t) ngx_file_size(&fi);
    text->data = ngx_pnalloc(cf->temp_pool, text->len + 1);
    if (text->data == NULL) {
        goto done;
    }

    n = ngx_read_file(&file, text->data, text->len, 0);

    if (n == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "cannot read \"%V\"", name);

    } else if ((size_t) n != text->len) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           ngx_read_file_n " \"%V\" returned only %z bytes",
                           name, n);
        n = NGX_ERROR;
    }

done:

    if (ngx_close_file(file.fd) == NGX_FILE_ERROR) {
        ngx_log_error(NGX_LOG_ALERT, cf->log, ngx_errno,
                      ngx_close_file_n " \"%V\" failed", name);
    }

    return n == NGX_ERROR ? NGX_ERROR : NGX_OK;
}


char *
ngx_http_civicgate_channels(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_main_conf_t *cgmcf = conf;

    ngx_str_t   *value;
    ngx_uint_t   i, n;

    if (cgmcf->channels != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;
    n = cf->args->nelts - 1;

    if (n > NGX_HTTP_CIVICGATE_CHANNELS_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "more than %d channels",
                           NGX_HTTP_CIVICGATE_CHANNELS_MAX);
        return NGX_CONF_ERROR;
    }

    cgmcf->channels = ngx_palloc(cf->pool,
                                 n * sizeof(ngx_http_civicgate_bytes_t));
    if (cgmcf->channels == NULL) {
        return NGX_CONF_ERROR;
    }

    for (i = 0; i < n; i++) {
        if (!ngx_http_civicgate_name_valid(value[i + 1].data, value[i + 1].len,
                                           NGX_HTTP_CIVICGATE_CHANNEL_MAX)
            || ngx_strcmp(value[i + 1].data, "unknown") == 0
            || ngx_http_civicgate_channel_match(value[i + 1].data,
                                                value[i + 1].len,
                                                cgmcf->channels, i)
               >= 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid or duplicate channel \"%V\"",
                               &value[i + 1]);
            return NGX_CONF_ERROR;
        }

        cgmcf->channels[i].data = value[i + 1].data;
        cgmcf->channels[i].len = value[i + 1].len;
    }

    cgmcf->nchannels = n;

    return NGX_CONF_OK;
}


ngx_int_t
ngx_http_civicgate_default_channels(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf)
{
    ngx_uint_t  n;

    for (n = 0; ngx_http_civicgate_default_channel_names[n]; n++) {
        /* void */
    }

    cgmcf->channels = ngx_palloc(cf->pool,
                                 n * sizeof(ngx_http_civicgate_bytes_t));
    if (cgmcf->channels == NULL) {
        return NGX_ERROR;
    }

    for (n = 0; ngx_http_civicgate_default_channel_names[n]; n++) {
        cgmcf->channels[n].data =
                      (u_char *) ngx_http_civicgate_default_channel_names[n];
        cgmcf->channels[n].len =
                      ngx_strlen(ngx_http_civicgate_default_channel_names[n]);
    }

    cgmcf->nchannels = n;

    return NGX_OK;
}


ngx_int_t
ngx_http_civicgate_flag_param(ngx_conf_t *cf, ngx_str_t *value,
    size_t prefix, ngx_flag_t *flag)
{
    u_char  *p;

    p = value->data + prefix;

    if (ngx_strcmp(p, "on") == 0) {
        *flag = 1;
        return NGX_OK;
    }

    if (ngx_strcmp(p, "off") == 0) {
        *flag = 0;
        return NGX_OK;
    }

    return NGX_ERROR;
}


/* the secret file may come later in the http block: checked at its end */

void
ngx_http_civicgate_needs_keys(ngx_conf_t *cf, const char *directive)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    if (cgmcf->needs_keys == NULL) {
        cgmcf->needs_keys = directive;
        cgmcf->needs_keys_file = cf->conf_file->file.name.data;
        cgmcf->needs_keys_line = cf->conf_file->line;
    }
}


char *
ngx_http_civicgate_service(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_loc_conf_t *cglcf = conf;

    ngx_str_t                       *value, *name;
    ngx_uint_t                       i;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    if (cglcf->service.data != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (!ngx_http_civicgate_name_valid(value[1].data, value[1].len,
                                       NGX_HTTP_CIVICGATE_SERVICE_MAX))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid service name \"%V\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    cglcf->service = value[1];

    /* every configured service becomes a bounded metrics label */

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    name = cgmcf->services.elts;
    for (i = 0; i < cgmcf->services.nelts; i++) {
        if (name[i].len == value[1].len
            && ngx_strncmp(name[i].data, value[1].data, value[1].len) == 0)
        {
            cglcf->service_index = i;
            return NGX_CONF_OK;
        }
    }

    cglcf->service_index = cgmcf->services.nelts;

    name = ngx_array_push(&cgmcf->services);
    if (name == NULL) {
        return NGX_CONF_ERROR;
    }

    *name = value[1];

    return NGX_CONF_OK;
}


/*
 * zone=name:size of a shared-memory zone directive: NGX_DECLINED if it is
 * not valid, NGX_ERROR (logged) if the zone is too small.
 */

ngx_int_t
ngx_http_civicgate_zone_param(ngx_conf_t *cf, ngx_str_t *value,
    ngx_str_t *name, ssize_t *size)
{
    u_char     *p;
    ngx_str_t   s;

    name->data = value->data + 5;
    p = (u_char *) ngx_strchr(name->data, ':');

    if (p == NULL) {
        return NGX_DECLINED;
    }

    name->len = p - name->data;
    s.data = p + 1;
    s.len = value->data + value->len - s.data;
    *size = ngx_parse_size(&s);

    if (name->len == 0 || *size == NGX_ERROR) {
        return NGX_DECLINED;
    }

    if (*size < (ssize_t) (8 * ngx_pagesize)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "zone \"%V\" is too small", value);
        return NGX_ERROR;
    }

    return NGX_OK;
}
