
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <openssl/sha.h>

#include "ngx_http_civicgate_consent.h"
#include "ngx_http_civicgate_conf.h"
#include "ngx_http_civicgate_journey.h"
#include "ngx_http_civicgate_json.h"
#include "ngx_http_civicgate_metrics.h"


static ngx_http_civicgate_log_limit_t  ngx_http_civicgate_consent_refused;


#define NGX_HTTP_CIVICGATE_CONSENT_PROBLEM  "urn:civicgate:problem:"

#if (NGX_HTTP_CIVICGATE_TABLE_KEY < SHA256_DIGEST_LENGTH + 1)
#error "the consent cache key is a SHA-256 digest and a byte"
#endif


static char *ngx_http_civicgate_consent_purposes(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_civicgate_consent(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_civicgate_consent_cache(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_civicgate_consent_ttl(
    ngx_http_civicgate_consent_conf_t *ccf, ngx_str_t *value);
static ngx_int_t ngx_http_civicgate_consent_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_consent_postconfiguration(
    ngx_conf_t *cf);
static void *ngx_http_civicgate_consent_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_uses_retention(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static void ngx_http_civicgate_consent_uses(ngx_http_request_t *r,
    ngx_http_civicgate_consent_ctx_t *cctx);
static void *ngx_http_civicgate_consent_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_consent_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_int_t ngx_http_civicgate_consent_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_consent_status_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static char *ngx_http_civicgate_purpose_line(ngx_conf_t *cf,
    ngx_command_t *dummy, void *conf);
static ngx_int_t ngx_http_civicgate_consent_resolve(ngx_conf_t *cf,
    ngx_http_civicgate_consent_loc_conf_t *conf);
static ngx_uint_t ngx_http_civicgate_consent_returns(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_consent_labels(ngx_conf_t *cf,
    ngx_http_civicgate_consent_conf_t *ccf, ngx_http_civicgate_metrics_t *m);
static ngx_int_t ngx_http_civicgate_consent_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static void ngx_http_civicgate_consent_enter(ngx_http_request_t *r,
    ngx_http_civicgate_consent_ctx_t *cctx,
    ngx_http_civicgate_consent_loc_conf_t *cglcf);
static ngx_int_t ngx_http_civicgate_consent_start(ngx_http_request_t *r,
    void *data);
static ngx_int_t ngx_http_civicgate_consent_send(ngx_http_request_t *r,
    ngx_http_civicgate_consent_ctx_t *cctx);
static void ngx_http_civicgate_consent_reply(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static ngx_int_t ngx_http_civicgate_consent_verdict(ngx_http_request_t *r,
    void *data);
static ngx_int_t ngx_http_civicgate_consent_deny(ngx_http_request_t *r,
    ngx_uint_t status, ngx_http_civicgate_purpose_t *purpose);
static ngx_int_t ngx_http_civicgate_challenge(ngx_http_request_t *r);
static uint64_t ngx_http_civicgate_cache_generation(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_cache_get(
    ngx_http_civicgate_consent_conf_t *ccf, u_char *citizen,
    ngx_http_civicgate_consent_state_t *st);
static void ngx_http_civicgate_cache_put(
    ngx_http_civicgate_consent_conf_t *ccf, u_char *citizen,
    ngx_http_civicgate_consent_state_t *st, ngx_msec_t ttl);
static void ngx_http_civicgate_cache_key(u_char *key, u_char *citizen,
    ngx_http_civicgate_purpose_t *purpose);
static void ngx_http_civicgate_cache_flush(
    ngx_http_civicgate_consent_conf_t *ccf);
static void ngx_http_civicgate_cache_count(ngx_http_request_t *r,
    ngx_uint_t hits, ngx_uint_t misses);


/*
 * KEYS: the citizen's consents hash.  ARGV: purpose, record, channel,
 * message: stored and announced in one step, so no gateway can miss it
 * while connected.
 */
static const char  ngx_http_civicgate_consent_lua[] =
    "redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])\n"
    "redis.call('PUBLISH', ARGV[3], ARGV[4])\n"
    "return 1\n";


static ngx_command_t  ngx_http_civicgate_consent_commands[] = {

    { ngx_string("civicgate_consent_purposes"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_BLOCK|NGX_CONF_NOARGS,
      ngx_http_civicgate_consent_purposes,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_consent"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_civicgate_consent,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_consent_cache"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_civicgate_consent_cache,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_data_use_retention"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_civicgate_uses_retention,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("civicgate_consent_grant_url"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_civicgate_consent_conf_t, grant_url),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_civicgate_consent_module_ctx = {
    ngx_http_civicgate_consent_preconfiguration, /* preconfiguration */
    ngx_http_civicgate_consent_postconfiguration, /* postconfiguration */

    ngx_http_civicgate_consent_create_main_conf, /* create main conf */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_civicgate_consent_create_loc_conf, /* create location conf */
    ngx_http_civicgate_consent_merge_loc_conf   /* merge location conf */
};


ngx_module_t  ngx_http_civicgate_consent_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_consent_module_ctx, /* module context */
    ngx_http_civicgate_consent_commands,   /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_variable_t  ngx_http_civicgate_consent_vars[] = {

    { ngx_string("civicgate_consent_status"), NULL,
      ngx_http_civicgate_consent_status_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_str_t  ngx_http_civicgate_consent_statuses[] = {
    ngx_string("GRANTED"),
    ngx_string("DENIED"),
    ngx_string("MISSING_CITIZEN"),
    ngx_string("ERROR")
};


/* configuration */

static char *
ngx_http_civicgate_consent_purposes(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_civicgate_consent_conf_t *ccf = conf;

    char        *rv;
    ngx_conf_t   save;

    if (ccf->purposes.nelts) {
        return "is duplicate";
    }

    save = *cf;
    cf->handler = ngx_http_civicgate_purpose_line;
    cf->handler_conf = (void *) ccf;

    rv = ngx_conf_parse(cf, NULL);

    *cf = save;

    if (rv == NGX_CONF_OK && ccf->purposes.nelts == 0) {
        return "has no purposes";
    }

    return rv;
}


/* name "label in Indonesian" "label in English"; */

static char *
ngx_http_civicgate_purpose_line(ngx_conf_t *cf, ngx_command_t *dummy,
    void *conf)
{
    ngx_http_civicgate_consent_conf_t *ccf = conf;

    ngx_str_t                     *value;
    ngx_http_civicgate_purpose_t  *p;

    value = cf->args->elts;

    if (cf->args->nelts != 3) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "a purpose takes a name and two labels "
                           "(Indonesian, English)");
        return NGX_CONF_ERROR;
    }

    if (!ngx_http_civicgate_name_valid(value[0].data, value[0].len,
                                       NGX_HTTP_CIVICGATE_SERVICE_MAX)
        || ngx_http_civicgate_purpose_find(ccf, value[0].data, value[0].len))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid or duplicate purpose \"%V\"", &value[0]);
        return NGX_CONF_ERROR;
    }

    /* the consent API's path for the data-use log */
    if (value[0].len == 4 && ngx_strncmp(value[0].data, "uses", 4) == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "the purpose name \"uses\" is reserved");
        return NGX_CONF_ERROR;
    }

    if (ccf->purposes.nelts == NGX_HTTP_CIVICGATE_PURPOSES_ALL) {
        return "too many purposes";
    }

    p = ngx_array_push(&ccf->purposes);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    p->name = value[0];
    p->label_id = value[1];
    p->label_en = value[2];
    p->index = ccf->purposes.nelts - 1;

    return NGX_CONF_OK;
}


static char *
ngx_http_civicgate_consent(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_consent_loc_conf_t *cglcf = conf;

    ngx_str_t   *value, *name;
    ngx_uint_t   i;

    if (cglcf->consent_names != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    cglcf->consent_file = cf->conf_file->file.name.data;
    cglcf->consent_line = cf->conf_file->line;

    if (ngx_strcmp(value[1].data, "off") == 0 && cf->args->nelts == 2) {
        cglcf->consent_names = NULL;
        return NGX_CONF_OK;
    }

    cglcf->consent_names = ngx_array_create(cf->pool, 2, sizeof(ngx_str_t));
    if (cglcf->consent_names == NULL) {
        return NGX_CONF_ERROR;
    }

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strcmp(value[i].data, "on_error=deny") == 0) {
            cglcf->consent_on_error = NGX_HTTP_CIVICGATE_ON_ERROR_CONSENT_DENY;
            continue;
        }

        if (ngx_strcmp(value[i].data, "on_error=allow") == 0) {
            cglcf->consent_on_error = NGX_HTTP_CIVICGATE_ON_ERROR_CONSENT_ALLOW;
            continue;
        }

        if (ngx_strchr(value[i].data, '=') != NULL
            || cglcf->consent_names->nelts
               == NGX_HTTP_CIVICGATE_PURPOSES_MAX)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }

        name = ngx_array_push(cglcf->consent_names);
        if (name == NULL) {
            return NGX_CONF_ERROR;
        }

        *name = value[i];
    }

    if (cglcf->consent_names->nelts == 0) {
        return "needs a purpose";
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_civicgate_consent_cache(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_civicgate_consent_conf_t *ccf = conf;

    ssize_t      size;
    ngx_int_t    rc;
    ngx_str_t   *value, name;
    ngx_uint_t   i;

    if (ccf->cache != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;
    size = 0;
    ngx_str_null(&name);

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "zone=", 5) == 0) {
            rc = ngx_http_civicgate_zone_param(cf, &value[i], &name, &size);

        } else {
            rc = ngx_http_civicgate_consent_ttl(ccf, &value[i]);
        }

        if (rc == NGX_ERROR) {
            return NGX_CONF_ERROR;
        }

        if (rc == NGX_DECLINED) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\"", &value[i]);
            return NGX_CONF_ERROR;
        }
    }

    if (name.len == 0) {
        return "must have \"zone\" parameter";
    }

    ccf->cache = ngx_shared_memory_add(cf, &name, size,
                                       &ngx_http_civicgate_module);
    if (ccf->cache == NULL) {
        return NGX_CONF_ERROR;
    }

    if (ccf->cache->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "duplicate zone \"%V\"", &name);
        return NGX_CONF_ERROR;
    }

    ccf->cache->init = ngx_http_civicgate_consent_init_zone;
    ccf->cache->data = ccf;

    return NGX_CONF_OK;
}


/* ttl=time, negative_ttl=time; NGX_DECLINED: neither, or not valid */

static ngx_int_t
ngx_http_civicgate_consent_ttl(ngx_http_civicgate_consent_conf_t *ccf,
    ngx_str_t *value)
{
    ngx_str_t    s;
    ngx_msec_t  *ttl;

    if (ngx_strncmp(value->data, "ttl=", 4) == 0) {
        ttl = &ccf->ttl;
        s.data = value->data + 4;

    } else if (ngx_strncmp(value->data, "negative_ttl=", 13) == 0) {
        ttl = &ccf->negative_ttl;
        s.data = value->data + 13;

    } else {
        return NGX_DECLINED;
    }

    s.len = value->data + value->len - s.data;
    *ttl = ngx_parse_time(&s, 0);

    return (*ttl == (ngx_msec_t) NGX_ERROR) ? NGX_DECLINED : NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_consent_preconfiguration(ngx_conf_t *cf)
{
    if (ngx_http_civicgate_add_state(cf, &ngx_http_civicgate_consent_module)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_civicgate_add_variables(cf,
                                            ngx_http_civicgate_consent_vars);
}


/* civicgate_data_use_retention off | time */

static char *
ngx_http_civicgate_uses_retention(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_civicgate_consent_conf_t *ccf = conf;

    ngx_str_t  *value;

    if (ccf->uses_retention != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        ccf->uses_retention = 0;
        return NGX_CONF_OK;
    }

    ccf->uses_retention = ngx_parse_time(&value[1], 1);

    if (ccf->uses_retention == (time_t) NGX_ERROR
        || ccf->uses_retention < 86400)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid retention \"%V\": \"off\" or a time "
                           "of at least one day", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (ccf->uses_retention > NGX_HTTP_CIVICGATE_USES_RETENTION_MAX) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "retention \"%V\" is longer than 10 years",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_civicgate_consent_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_consent_conf_t));
    if (ccf == NULL) {
        return NULL;
    }

    if (ngx_array_init(&ccf->purposes, cf->pool, 8,
                       sizeof(ngx_http_civicgate_purpose_t))
        != NGX_OK)
    {
        return NULL;
    }

    ccf->ttl = NGX_CONF_UNSET_MSEC;
    ccf->uses_retention = NGX_CONF_UNSET;
    ccf->negative_ttl = NGX_CONF_UNSET_MSEC;

    return ccf;
}


static void *
ngx_http_civicgate_consent_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_consent_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool,
                       sizeof(ngx_http_civicgate_consent_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->consents = NULL;
     *     conf->consent_file = NULL;
     */

    conf->consent_names = NGX_CONF_UNSET_PTR;
    conf->consent_on_error = NGX_CONF_UNSET_UINT;

    return conf;
}


static char *
ngx_http_civicgate_consent_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_civicgate_consent_loc_conf_t *prev = parent;
    ngx_http_civicgate_consent_loc_conf_t *conf = child;

    ngx_http_civicgate_consent_conf_t  *ccf;

    if (conf->consent_file == NULL) {
        conf->consent_file = prev->consent_file;
        conf->consent_line = prev->consent_line;
    }

    ngx_conf_merge_ptr_value(conf->consent_names, prev->consent_names, NULL);
    ngx_conf_merge_uint_value(conf->consent_on_error, prev->consent_on_error,
                              NGX_HTTP_CIVICGATE_ON_ERROR_CONSENT_DENY);

    if (conf->consent_names == NULL) {
        return NGX_CONF_OK;
    }

    if (ngx_http_civicgate_consent_requires(cf, "civicgate_consent",
                                            conf->consent_file,
                                            conf->consent_line)
        != NGX_OK
        || ngx_http_civicgate_consent_resolve(cf, conf) != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    ccf = ngx_http_conf_get_module_main_conf(cf,
                                           ngx_http_civicgate_consent_module);
    ccf->used = 1;

    return NGX_CONF_OK;
}


/* the location's purposes by name, and no "return" that would skip them */

static ngx_int_t
ngx_http_civicgate_consent_resolve(ngx_conf_t *cf,
    ngx_http_civicgate_consent_loc_conf_t *conf)
{
    ngx_str_t                           *name;
    ngx_uint_t                           i;
    ngx_http_core_loc_conf_t            *clcf;
    ngx_http_civicgate_purpose_t       **pp;
    ngx_http_civicgate_consent_conf_t   *ccf;

    ccf = ngx_http_conf_get_module_main_conf(cf,
                                           ngx_http_civicgate_consent_module);

    conf->consents = ngx_array_create(cf->pool, conf->consent_names->nelts,
                                  sizeof(ngx_http_civicgate_purpose_t *));
    if (conf->consents == NULL) {
        return NGX_ERROR;
    }

    name = conf->consent_names->elts;

    for (i = 0; i < conf->consent_names->nelts; i++) {
        pp = ngx_array_push(conf->consents);
        if (pp == NULL) {
            return NGX_ERROR;
        }

        *pp = ngx_http_civicgate_purpose_find(ccf, name[i].data, name[i].len);
        if (*pp == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "unknown consent purpose \"%V\": list it in "
                          "\"civicgate_consent_purposes\" in %s:%ui",
                          &name[i], conf->consent_file, conf->consent_line);
            return NGX_ERROR;
        }
    }

    if (ngx_http_civicgate_consent_returns(cf)) {
        clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"return\" in %s \"%V\" answers before the "
                      "\"civicgate_consent\" of %s:%ui is checked: "
                      "set \"civicgate_consent off\" there or move the "
                      "\"return\"",
                      clcf->name.len ? "location" : "server", &clcf->name,
                      conf->consent_file, conf->consent_line);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * "return" answers in the rewrite phase, long before the precontent phase
 * checks consent: where both apply, the location would look protected and
 * not be.  The rewrite module's location conf starts with its array of
 * codes, each code starting with its handler; a location has its own.
 */

static ngx_uint_t
ngx_http_civicgate_consent_returns(ngx_conf_t *cf)
{
    uintptr_t             *word;
    ngx_uint_t             i, n;
    ngx_array_t          **codes;
    ngx_module_t          *rewrite;
    ngx_http_conf_ctx_t   *ctx;

    rewrite = NULL;

    for (i = 0; cf->cycle->modules[i]; i++) {
        if (ngx_strcmp(cf->cycle->modules[i]->name,
                       "ngx_http_rewrite_module") == 0)
        {
            rewrite = cf->cycle->modules[i];
            break;
        }
    }

    if (rewrite == NULL) {
        return 0;
    }

    ctx = cf->ctx;
    codes = ctx->loc_conf[rewrite->ctx_index];

    if (codes == NULL || *codes == NULL) {
        return 0;
    }

    word = (*codes)->elts;
    n = (*codes)->nelts * (*codes)->size / sizeof(uintptr_t);

    for (i = 0; i < n; i++) {
        if (word[i] == (uintptr_t) ngx_http_script_return_code) {
            return 1;
        }
    }

    return 0;
}


/* what a consent check or the consent API needs, named at its line */

ngx_int_t
ngx_http_civicgate_consent_requires(ngx_conf_t *cf, const char *directive,
    u_char *file, ngx_uint_t line)
{
    const char                         *missing;
    ngx_http_civicgate_main_conf_t     *cgmcf;
    ngx_http_civicgate_consent_conf_t  *ccf;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);
    ccf = ngx_http_conf_get_module_main_conf(cf,
                                           ngx_http_civicgate_consent_module);
    missing = NULL;

    if (cgmcf->redis == NULL) {
        missing = "civicgate_redis";

    } else if (cgmcf->keyring == NULL) {
        missing = "civicgate_secret_file";

    } else if (ccf->purposes.nelts == 0) {
        missing = "civicgate_consent_purposes";

    } else if (!ngx_http_civicgate_journey_has_citizen(cf)) {
        missing = "civicgate_citizen";
    }

    if (missing) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"%s\" requires \"%s\" in %s:%ui", directive, missing,
                      file, line);
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_http_civicgate_purpose_t *
ngx_http_civicgate_purpose_find(ngx_http_civicgate_consent_conf_t *ccf,
    u_char *name, size_t len)
{
    ngx_uint_t                     i;
    ngx_http_civicgate_purpose_t  *p;

    p = ccf->purposes.elts;

    for (i = 0; i < ccf->purposes.nelts; i++) {
        if (p[i].name.len == len && ngx_strncmp(p[i].name.data, name, len)
                                    == 0)
        {
            return &p[i];
        }
    }

    return NULL;
}


/* after the http block: the script and metrics labels */

static ngx_int_t
ngx_http_civicgate_consent_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_handler_pt                *h;
    ngx_http_core_main_conf_t          *cmcf;
    ngx_http_civicgate_main_conf_t     *cgmcf;
    ngx_http_civicgate_consent_conf_t  *ccf;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);
    ccf = ngx_http_conf_get_module_main_conf(cf,
                                           ngx_http_civicgate_consent_module);

    /* counter staff grant and withdraw through the admin endpoint */
    if (cgmcf->admin_file != NULL) {
        ccf->used = 1;
    }

    if (ccf->used && ccf->cache != NULL
        && ngx_http_civicgate_subscribe(cf,
                                        NGX_HTTP_CIVICGATE_KEY_CONSENT_CHANNEL,
                                        ngx_http_civicgate_consent_message,
                                        NULL)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_conf_init_msec_value(ccf->ttl, 5000);
    ngx_conf_init_msec_value(ccf->negative_ttl, 1000);

    if (ccf->used) {
        cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

        h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        *h = ngx_http_civicgate_consent_handler;
    }

    if (ngx_http_civicgate_consent_labels(cf, ccf, cgmcf->metrics) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_conf_init_value(ccf->uses_retention,
                        NGX_HTTP_CIVICGATE_USES_RETENTION);

    if (cgmcf->redis && ccf->purposes.nelts) {
        ccf->script = ngx_http_civicgate_redis_add_script(cf, cgmcf->redis,
                                               ngx_http_civicgate_consent_lua);
        if (ccf->script == NULL) {
            return NGX_ERROR;
        }

        if (ngx_http_civicgate_uses_init(cf, ccf, cgmcf->redis) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


/* checks and changes by purpose: every series exists from the start */

static ngx_int_t
ngx_http_civicgate_consent_labels(ngx_conf_t *cf,
    ngx_http_civicgate_consent_conf_t *ccf, ngx_http_civicgate_metrics_t *m)
{
    ngx_uint_t                     i;
    ngx_http_civicgate_purpose_t  *p;

    m->consent = ngx_http_civicgate_metrics_family(cf, m,
                     "civicgate_consent_checks_total",
                     "Consent decisions by purpose: granted, denied, or "
                     "unavailable (Redis could not be asked).",
                     NGX_HTTP_CIVICGATE_COUNTER);
    m->consent_changes = ngx_http_civicgate_metrics_family(cf, m,
                     "civicgate_consent_changes_total",
                     "Consents granted and withdrawn through the consent API "
                     "and the admin endpoints, by purpose.",
                     NGX_HTTP_CIVICGATE_COUNTER);

    m->consent_cache = ngx_http_civicgate_metrics_family(cf, m,
                     "civicgate_consent_cache_total",
                     "Consent cache lookups: a decision found (hit) or to be "
                     "asked of Redis (miss).",
                     NGX_HTTP_CIVICGATE_COUNTER);

    if (m->consent == NULL || m->consent_changes == NULL
        || m->consent_cache == NULL
        || ngx_http_civicgate_metrics_label(cf, m->consent_cache,
                                            "{result=\"hit\"}") != NGX_OK
        || ngx_http_civicgate_metrics_label(cf, m->consent_cache,
                                            "{result=\"miss\"}") != NGX_OK)
    {
        return NGX_ERROR;
    }

    p = ccf->purposes.elts;

    for (i = 0; i < ccf->purposes.nelts; i++) {
        if (ngx_http_civicgate_metrics_label(cf, m->consent,
                              "{purpose=\"%V\",result=\"granted\"}", &p[i].name)
            != NGX_OK
            || ngx_http_civicgate_metrics_label(cf, m->consent,
                              "{purpose=\"%V\",result=\"denied\"}", &p[i].name)
               != NGX_OK
            || ngx_http_civicgate_metrics_label(cf, m->consent,
                       "{purpose=\"%V\",result=\"unavailable\"}", &p[i].name)
               != NGX_OK
            || ngx_http_civicgate_metrics_label(cf, m->consent_changes,
                       "{purpose=\"%V\",change=\"granted\"}", &p[i].name)
               != NGX_OK
            || ngx_http_civicgate_metrics_label(cf, m->consent_changes,
                       "{purpose=\"%V\",change=\"withdrawn\"}", &p[i].name)
               != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_consent_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_civicgate_consent_conf_t  *occf = data;

    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = shm_zone->data;

    return ngx_http_civicgate_table_init(shm_zone, &ccf->table,
                                         occf ? &occf->table : NULL,
                                         &shm_zone->shm.name);
}


/*
 * "subscribe" confirms a (re)subscription: what was published while the
 * subscription was down is unknown, so the whole cache goes.
 */

void
ngx_http_civicgate_consent_message(ngx_http_civicgate_redis_t *rc,
    redisReply *reply)
{
    redisReply                         *kind, *payload;
    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                            ngx_http_civicgate_consent_module);

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 3
        || reply->element[0]->type != REDIS_REPLY_STRING)
    {
        return;
    }

    kind = reply->element[0];
    payload = reply->element[2];

    if (kind->len == 9 && ngx_strncmp(kind->str, "subscribe", 9) == 0) {
        ngx_http_civicgate_cache_flush(ccf);
        return;
    }

    if (kind->len != 7 || ngx_strncmp(kind->str, "message", 7) != 0
        || payload->type != REDIS_REPLY_STRING)
    {
        return;
    }

    if (payload->len == NGX_HTTP_CIVICGATE_PSEUDONYM_LEN) {
        ngx_http_civicgate_consent_evict(ccf, (u_char *) payload->str);

    } else {
        ngx_http_civicgate_cache_flush(ccf);
    }
}


/*
 * The precontent phase handler: after access control set the identity.
 * Subrequests are checked too: a mirror or an SSI include reaches a
 * backend as surely as the main request does.
 */

static ngx_int_t
ngx_http_civicgate_consent_handler(ngx_http_request_t *r)
{
    ngx_http_civicgate_consent_loc_conf_t  *cglcf;
    ngx_http_civicgate_consent_ctx_t       *cctx;

    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_consent_module);

    if (cglcf->consents == NULL) {
        return NGX_DECLINED;
    }

    cctx = ngx_http_civicgate_get_state(r, &ngx_http_civicgate_consent_module);

    if (cctx == NULL) {
        cctx = ngx_pcalloc(r->pool, sizeof(ngx_http_civicgate_consent_ctx_t));
        if (cctx == NULL
            || ngx_http_civicgate_set_state(r,
                                            &ngx_http_civicgate_consent_module,
                                            cctx)
               != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    if (cctx->loc != cglcf || cctx->pass != r->uri_changes) {
        ngx_http_civicgate_consent_enter(r, cctx, cglcf);
    }

    return ngx_http_civicgate_step(r, &cctx->step,
                                   ngx_http_civicgate_consent_start,
                                   ngx_http_civicgate_consent_verdict, cctx);
}


/*
 * Every internal redirect, named location and "rewrite ... last" counts
 * r->uri_changes down: a location reached so is checked for its own
 * purposes; what this request was already granted needs no second look.
 */

static void
ngx_http_civicgate_consent_enter(ngx_http_request_t *r,
    ngx_http_civicgate_consent_ctx_t *cctx,
    ngx_http_civicgate_consent_loc_conf_t *cglcf)
{
    ngx_uint_t                      i, k;
    ngx_http_civicgate_purpose_t  **purpose;

    cctx->loc = cglcf;
    cctx->pass = r->uri_changes;
    cctx->nstates = 0;
    ngx_memzero(&cctx->step, sizeof(ngx_http_civicgate_step_t));
    ngx_memzero(cctx->states, sizeof(cctx->states));

    purpose = cglcf->consents->elts;

    for (i = 0; i < cglcf->consents->nelts; i++) {
        k = purpose[i]->index;

        if (!(cctx->granted[k / 8] & (1 << (k % 8)))) {
            return;
        }
    }

    cctx->step.done = 1;
    cctx->status = NGX_HTTP_CIVICGATE_CONSENT_GRANTED;
    ngx_http_civicgate_consent_uses(r, cctx);
}


static ngx_int_t
ngx_http_civicgate_consent_start(ngx_http_request_t *r, void *data)
{
    ngx_http_civicgate_consent_ctx_t  *cctx = data;

    ngx_uint_t                              i, missing;
    ngx_http_civicgate_journey_t           *j;
    ngx_http_civicgate_purpose_t          **purpose;
    ngx_http_civicgate_consent_conf_t      *ccf;
    ngx_http_civicgate_consent_state_t     *st;
    ngx_http_civicgate_consent_loc_conf_t  *cglcf;

    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);
    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_consent_module);
    j = ngx_http_civicgate_journey_citizen(r);
    if (j == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (!j->citizen_set) {
        cctx->step.done = 1;
        cctx->status = NGX_HTTP_CIVICGATE_CONSENT_MISSING;
        return ngx_http_civicgate_consent_deny(r, NGX_HTTP_UNAUTHORIZED, NULL);
    }

    purpose = cglcf->consents->elts;
    missing = 0;

    for (i = 0; i < cglcf->consents->nelts; i++) {
        st = &cctx->states[i];
        st->purpose = purpose[i];

        if (ngx_http_civicgate_cache_get(ccf, j->citizen, st)
            != NGX_OK)
        {
            missing++;
        }
    }

    if (ccf->table.sh) {
        ngx_http_civicgate_cache_count(r, cglcf->consents->nelts - missing,
                                       missing);
    }

    cctx->nstates = cglcf->consents->nelts;
    cctx->citizen = j->citizen;
    cctx->step.replied = 1;

    if (missing == 0) {
        return NGX_OK;
    }

    if (ngx_http_civicgate_consent_send(r, cctx) != NGX_OK) {
        cctx->step.failed = 1;
        return NGX_OK;
    }

    cctx->step.replied = 0;
    cctx->step.waiting = 1;
    ngx_http_civicgate_wait(r);

    return NGX_AGAIN;
}


/* one HMGET for every purpose the cache did not know */

static ngx_int_t
ngx_http_civicgate_consent_send(ngx_http_request_t *r,
    ngx_http_civicgate_consent_ctx_t *cctx)
{
    u_char                           *p, key[64];
    size_t                            lens[2 + NGX_HTTP_CIVICGATE_PURPOSES_MAX];
    ngx_uint_t                        i, n;
    const char                       *argv[2 + NGX_HTTP_CIVICGATE_PURPOSES_MAX];
    ngx_http_civicgate_ctx_t         *ctx;
    ngx_http_civicgate_main_conf_t   *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    if (!ngx_http_civicgate_redis_accepting(cgmcf->client)) {
        return NGX_DECLINED;
    }

    p = ngx_http_civicgate_key_citizen(key, cctx->citizen,
                                       NGX_HTTP_CIVICGATE_PSEUDONYM_LEN,
                                       NGX_HTTP_CIVICGATE_KEY_CONSENTS);

    argv[0] = "HMGET";
    lens[0] = 5;
    argv[1] = (const char *) key;
    lens[1] = p - key;
    n = 2;

    for (i = 0; i < cctx->nstates; i++) {
        if (!cctx->states[i].known) {
            argv[n] = (const char *) cctx->states[i].purpose->name.data;
            lens[n++] = cctx->states[i].purpose->name.len;
        }
    }

    /* an invalidation racing this read must win over its answer */
    cctx->generation = ngx_http_civicgate_cache_generation(r);

    ctx = ngx_http_civicgate_get_ctx(r);

    ctx->cmd = ngx_http_civicgate_redis_send(cgmcf->client, n, argv, lens,
                                             ngx_http_civicgate_consent_reply,
                                             r);

    return ctx->cmd ? NGX_OK : NGX_DECLINED;
}


static void
ngx_http_civicgate_consent_reply(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    json_t                              *record;
    int64_t                              now, now_ms, expires;
    ngx_time_t                          *tp;
    ngx_msec_t                           ttl;
    ngx_uint_t                           i, k, cache;
    redisReply                          *field;
    ngx_http_civicgate_ctx_t            *ctx;
    ngx_http_civicgate_consent_ctx_t    *cctx;
    ngx_http_civicgate_consent_conf_t   *ccf;
    ngx_http_civicgate_consent_state_t  *st;
    ngx_http_request_t                  *r;

    r = ngx_http_civicgate_answered(cmd, &ctx);
    if (r == NULL) {
        return;
    }

    cctx = ngx_http_civicgate_get_state(r, &ngx_http_civicgate_consent_module);
    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);

    cctx->step.waiting = 0;
    cctx->step.replied = 1;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY) {
        ngx_http_civicgate_redis_refused(cmd->redis, reply,
                                         "a consent check",
                                         &ngx_http_civicgate_consent_refused);
        cctx->step.failed = 1;
        ngx_http_civicgate_resume(r);
        return;
    }

    tp = ngx_timeofday();
    now = tp->sec;
    now_ms = (int64_t) tp->sec * 1000 + tp->msec;
    cache = (ccf->table.sh
             && ccf->table.sh->generation == cctx->generation);
    k = 0;

    for (i = 0; i < cctx->nstates && k < reply->elements; i++) {
        st = &cctx->states[i];

        if (st->known) {
            continue;
        }

        field = reply->element[k++];
        record = NULL;

        if (field->type == REDIS_REPLY_STRING) {
            record = json_loadb(field->str, field->len, 0, NULL);
        }

        expires = ngx_http_civicgate_consent_record_valid(record, now);
        json_decref(record);

        st->known = 1;
        st->granted = (expires >= 0);

        if (cache) {
            ttl = st->granted ? ccf->ttl : ccf->negative_ttl;

            /* a grant is cached no longer than it lasts, to the ms */
            if (expires > 0 && expires * 1000 - now_ms < (int64_t) ttl) {
                ttl = (ngx_msec_t) (expires * 1000 - now_ms);
            }

            ngx_http_civicgate_cache_put(ccf, cctx->citizen, st, ttl);
        }
    }

    if (k != reply->elements || i != cctx->nstates) {
        cctx->step.failed = 1;
    }

    ngx_http_civicgate_resume(r);
}


/*
 * A granted, unexpired record: returns its expiry (seconds since the epoch,
 * 0 for none); anything else: -1.
 */

ngx_int_t
ngx_http_civicgate_consent_record_valid(json_t *record, int64_t now)
{
    int64_t      t;
    json_t      *expires;
    const char  *status, *s;

    if (!json_is_object(record)) {
        return -1;
    }

    status = json_string_value(json_object_get(record, "status"));

    if (status == NULL || ngx_strcmp(status, "granted") != 0) {
        return -1;
    }

    expires = json_object_get(record, "expires_at");

    if (expires == NULL || json_is_null(expires)) {
        return 0;
    }

    s = json_string_value(expires);

    if (s == NULL
        || ngx_http_civicgate_rfc3339_parse((u_char *) s, ngx_strlen(s), &t)
           != 0
        || t <= now)
    {
        return -1;
    }

    return (ngx_int_t) t;
}


static ngx_int_t
ngx_http_civicgate_consent_verdict(ngx_http_request_t *r, void *data)
{
    ngx_http_civicgate_consent_ctx_t  *cctx = data;

    ngx_uint_t                           i, k, result;
    ngx_http_civicgate_consent_loc_conf_t       *cglcf;
    ngx_http_civicgate_main_conf_t      *cgmcf;
    ngx_http_civicgate_consent_state_t  *st;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    cglcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_consent_module);

    cctx->step.done = 1;

    for (i = 0; i < cctx->nstates; i++) {
        st = &cctx->states[i];

        result = !st->known ? NGX_HTTP_CIVICGATE_CHECK_UNAVAILABLE
                 : st->granted ? NGX_HTTP_CIVICGATE_CHECK_GRANTED
                 : NGX_HTTP_CIVICGATE_CHECK_DENIED;

        ngx_http_civicgate_metrics_inc(cgmcf->metrics, cgmcf->metrics->consent,
                                       st->purpose->index
                                       * NGX_HTTP_CIVICGATE_CHECK_RESULTS
                                       + result);

        if (!st->known) {
            continue;
        }

        if (!st->granted) {
            cctx->status = NGX_HTTP_CIVICGATE_CONSENT_DENIED;
            return ngx_http_civicgate_consent_deny(r, NGX_HTTP_FORBIDDEN,
                                                   st->purpose);
        }
    }

    if (cctx->step.failed) {
        cctx->status = NGX_HTTP_CIVICGATE_CONSENT_ERROR;

        /* consent fails closed unless ops chose otherwise */
        if (cglcf->consent_on_error
            == NGX_HTTP_CIVICGATE_ON_ERROR_CONSENT_DENY)
        {
            return ngx_http_civicgate_consent_deny(r,
                                                   NGX_HTTP_SERVICE_UNAVAILABLE,
                                                   NULL);
        }

        return NGX_DECLINED;
    }

    cctx->status = NGX_HTTP_CIVICGATE_CONSENT_GRANTED;

    for (i = 0; i < cctx->nstates; i++) {
        k = cctx->states[i].purpose->index;
        cctx->granted[k / 8] |= (uint8_t) (1 << (k % 8));
    }

    ngx_http_civicgate_consent_uses(r, cctx);

    return NGX_DECLINED;
}


/*
 * The purposes a request passed go with its journey event into the
 * citizen's data-use log; a later refusal (after an internal redirect)
 * leaves none, as nothing reached a service then.
 */

static void
ngx_http_civicgate_consent_uses(ngx_http_request_t *r,
    ngx_http_civicgate_consent_ctx_t *cctx)
{
    ngx_uint_t                          i, k;
    ngx_http_civicgate_journey_t       *j;
    ngx_http_civicgate_purpose_t       *p;
    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);
    j = ngx_http_civicgate_journey_get(r);

    if (j == NULL || ccf->uses_retention == 0) {
        return;
    }

    j->nuses = 0;
    j->uses_retention = ccf->uses_retention;

    if (cctx == NULL || cctx->status != NGX_HTTP_CIVICGATE_CONSENT_GRANTED) {
        return;
    }

    p = ccf->purposes.elts;

    for (i = 0; i < ccf->purposes.nelts; i++) {
        k = p[i].index;

        if ((cctx->granted[k / 8] & (1 << (k % 8)))
            && j->nuses < NGX_HTTP_CIVICGATE_USES_MAX)
        {
            j->uses[j->nuses++] = &p[i].name;
        }
    }
}


/* the labels of civicgate_consent_cache_total, in their order */
#define NGX_HTTP_CIVICGATE_CACHE_HIT   0
#define NGX_HTTP_CIVICGATE_CACHE_MISS  1


static void
ngx_http_civicgate_cache_count(ngx_http_request_t *r, ngx_uint_t hits,
    ngx_uint_t misses)
{
    ngx_http_civicgate_metrics_t    *m;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    m = cgmcf->metrics;

    if (hits) {
        ngx_http_civicgate_metrics_add(m, m->consent_cache,
                                       NGX_HTTP_CIVICGATE_CACHE_HIT, hits);
    }

    if (misses) {
        ngx_http_civicgate_metrics_add(m, m->consent_cache,
                                       NGX_HTTP_CIVICGATE_CACHE_MISS, misses);
    }
}


static ngx_int_t
ngx_http_civicgate_consent_deny(ngx_http_request_t *r, ngx_uint_t status,
    ngx_http_civicgate_purpose_t *purpose)
{
    ngx_http_civicgate_consent_uses(r, NULL);

    return ngx_http_civicgate_finalize(r,
                        ngx_http_civicgate_consent_problem(r, status, purpose));
}


/* 401, 403 or 503 as problem+json, in the language the client prefers */

ngx_int_t
ngx_http_civicgate_consent_problem(ngx_http_request_t *r, ngx_uint_t status,
    ngx_http_civicgate_purpose_t *purpose)
{
    json_t                              *problem;
    ngx_uint_t                           id;
    ngx_http_civicgate_consent_conf_t   *ccf;

    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);
    id = ngx_http_civicgate_lang_id(r);

    if (status == NGX_HTTP_UNAUTHORIZED) {
        if (ngx_http_civicgate_challenge(r) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        problem = ngx_http_civicgate_problem_new(status,
            NGX_HTTP_CIVICGATE_CONSENT_PROBLEM "citizen-required",
            id ? "Identitas warga diperlukan" : "Citizen identity required",
            id ? "Layanan ini memerlukan identitas warga yang terverifikasi."
               : "This service needs a verified citizen identity.");

    } else if (status == NGX_HTTP_FORBIDDEN) {
        problem = ngx_http_civicgate_problem_new(status,
            NGX_HTTP_CIVICGATE_CONSENT_PROBLEM "consent-required",
            id ? "Persetujuan diperlukan" : "Consent required",
            id ? "Layanan ini memproses data pribadi untuk tujuan yang "
                 "belum Anda setujui."
               : "This service processes personal data for a purpose you "
                 "have not consented to.");

        if (problem != NULL) {
            json_object_set_new(problem, "purpose",
                json_stringn((char *) purpose->name.data, purpose->name.len));
            json_object_set_new(problem, "purpose_label",
                json_pack("{s:s%, s:s%}",
                          "id", purpose->label_id.data, purpose->label_id.len,
                          "en", purpose->label_en.data,
                          purpose->label_en.len));

            if (ccf->grant_url.len) {
                json_object_set_new(problem, "grant_url",
                                    json_stringn((char *) ccf->grant_url.data,
                                                 ccf->grant_url.len));
            }
        }

    } else {
        problem = ngx_http_civicgate_problem_new(status,
            NGX_HTTP_CIVICGATE_CONSENT_PROBLEM "consent-unavailable",
            id ? "Persetujuan tidak dapat diperiksa"
               : "Consent cannot be checked",
            id ? "Coba lagi sebentar lagi." : "Please try again shortly.");
    }

    if (purpose != NULL) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "civicgate: no consent for purpose \"%V\"",
                      &purpose->name);
    }

    return ngx_http_civicgate_problem_send(r, status, problem);
}


/*
 * Every 401 names the scheme that establishes the identity (RFC 9110,
 * 11.6.1); auth_request passes it on from a subrequest.
 */

static ngx_int_t
ngx_http_civicgate_challenge(ngx_http_request_t *r)
{
    ngx_table_elt_t  *h;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "WWW-Authenticate");
    h->value = *ngx_http_civicgate_journey_challenge(r);

    r->headers_out.www_authenticate = h;

    return NGX_OK;
}


/* "id" (or the legacy "in") first in Accept-Language picks Indonesian */

ngx_uint_t
ngx_http_civicgate_lang_id(ngx_http_request_t *r)
{
    u_char           *p, *last;
    ngx_table_elt_t  *h;

#if (NGX_HTTP_HEADERS)
    h = r->headers_in.accept_language;
#else
    h = NULL;
#endif

    if (h == NULL) {
        return 0;
    }

    p = h->value.data;
    last = p + h->value.len;

    while (p < last && (*p == ' ' || *p == '\t')) {
        p++;
    }

    return (last - p >= 2
            && (ngx_strncasecmp(p, (u_char *) "id", 2) == 0
                || ngx_strncasecmp(p, (u_char *) "in", 2) == 0)
            && (last - p == 2 || p[2] == '-' || p[2] == ',' || p[2] == ';'));
}


ngx_str_t *
ngx_http_civicgate_consent_status_name(ngx_uint_t status)
{
    return &ngx_http_civicgate_consent_statuses[status];
}


static uint64_t
ngx_http_civicgate_cache_generation(ngx_http_request_t *r)
{
    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);

    return ccf->table.sh ? ccf->table.sh->generation : 0;
}


/* the decision cache: a shared-memory table keyed by citizen and purpose */

static ngx_int_t
ngx_http_civicgate_cache_get(ngx_http_civicgate_consent_conf_t *ccf,
    u_char *citizen, ngx_http_civicgate_consent_state_t *st)
{
    u_char                            key[NGX_HTTP_CIVICGATE_TABLE_KEY];
    ngx_int_t                         rc;
    ngx_http_civicgate_table_node_t  *node;

    if (ccf->table.sh == NULL) {
        return NGX_DECLINED;
    }

    ngx_http_civicgate_cache_key(key, citizen, st->purpose);
    rc = NGX_DECLINED;

    ngx_shmtx_lock(&ccf->table.shpool->mutex);

    node = ngx_http_civicgate_table_lookup(&ccf->table, key);

    if (node != NULL) {
        if ((ngx_msec_int_t) (node->value - ngx_current_msec) > 0) {
            st->known = 1;
            st->granted = node->flag;
            rc = NGX_OK;

        } else {
            ngx_http_civicgate_table_delete(&ccf->table, node);
        }
    }

    ngx_shmtx_unlock(&ccf->table.shpool->mutex);

    return rc;
}


static void
ngx_http_civicgate_cache_put(ngx_http_civicgate_consent_conf_t *ccf,
    u_char *citizen, ngx_http_civicgate_consent_state_t *st, ngx_msec_t ttl)
{
    u_char                            key[NGX_HTTP_CIVICGATE_TABLE_KEY];
    ngx_http_civicgate_table_node_t  *node;

    if (ttl == 0) {
        return;
    }

    ngx_http_civicgate_cache_key(key, citizen, st->purpose);

    ngx_shmtx_lock(&ccf->table.shpool->mutex);

    node = ngx_http_civicgate_table_lookup(&ccf->table, key);

    if (node != NULL) {
        ngx_http_civicgate_table_touch(&ccf->table, node);

    } else {
        node = ngx_http_civicgate_table_insert(&ccf->table, key);
    }

    if (node != NULL) {
        node->flag = st->granted;
        node->value = ngx_current_msec + ttl;
    }

    ngx_shmtx_unlock(&ccf->table.shpool->mutex);
}


/*
 * Keyed by the purpose's name, not its place in the list: the cache
 * outlives a reload that reorders civicgate_consent_purposes.
 */

static void
ngx_http_civicgate_cache_key(u_char *key, u_char *citizen,
    ngx_http_civicgate_purpose_t *purpose)
{
    u_char  in[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN
               + NGX_HTTP_CIVICGATE_SERVICE_MAX];

    ngx_memcpy(in, citizen, NGX_HTTP_CIVICGATE_PSEUDONYM_LEN);
    ngx_memcpy(in + NGX_HTTP_CIVICGATE_PSEUDONYM_LEN, purpose->name.data,
               purpose->name.len);

    (void) SHA256(in, NGX_HTTP_CIVICGATE_PSEUDONYM_LEN + purpose->name.len,
                  key);

    key[SHA256_DIGEST_LENGTH] = 0;
}


/* a grant or withdrawal for this citizen, here or on another gateway */

void
ngx_http_civicgate_consent_evict(ngx_http_civicgate_consent_conf_t *ccf,
    u_char *citizen)
{
    u_char                            key[NGX_HTTP_CIVICGATE_TABLE_KEY];
    ngx_uint_t                        i;
    ngx_http_civicgate_purpose_t     *purpose;
    ngx_http_civicgate_table_node_t  *node;

    if (ccf->table.sh == NULL) {
        return;
    }

    ngx_shmtx_lock(&ccf->table.shpool->mutex);

    ccf->table.sh->generation++;

    purpose = ccf->purposes.elts;

    for (i = 0; i < ccf->purposes.nelts; i++) {
        ngx_http_civicgate_cache_key(key, citizen, &purpose[i]);

        node = ngx_http_civicgate_table_lookup(&ccf->table, key);
        if (node != NULL) {
            ngx_http_civicgate_table_delete(&ccf->table, node);
        }
    }

    ngx_shmtx_unlock(&ccf->table.shpool->mutex);
}


static void
ngx_http_civicgate_cache_flush(ngx_http_civicgate_consent_conf_t *ccf)
{
    ngx_http_civicgate_table_node_t  *node;

    if (ccf->table.sh == NULL) {
        return;
    }

    ngx_shmtx_lock(&ccf->table.shpool->mutex);

    ccf->table.sh->generation++;

    while ((node = ngx_http_civicgate_table_oldest(&ccf->table)) != NULL) {
        ngx_http_civicgate_table_delete(&ccf->table, node);
    }

    ngx_shmtx_unlock(&ccf->table.shpool->mutex);

    ngx_log_error(NGX_LOG_INFO, ngx_cycle->log, 0,
                  "civicgate: consent cache flushed on (re)subscription");
}


static ngx_int_t
ngx_http_civicgate_consent_status_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                         *name;
    ngx_http_civicgate_consent_ctx_t  *cctx;

    cctx = ngx_http_civicgate_get_state(r->main,
                                        &ngx_http_civicgate_consent_module);

    if (cctx == NULL || !cctx->step.done) {
        v->not_found = 1;
        return NGX_OK;
    }

    name = ngx_http_civicgate_consent_status_name(cctx->status);
    ngx_http_civicgate_variable_set(v, name->data, name->len);

    return NGX_OK;
}
