
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_conf.h"
#include "ngx_http_civicgate_metrics.h"
#include "ngx_http_civicgate_journey.h"


typedef struct {
    ngx_flag_t                     enable;
    ngx_str_t                      header;
    ngx_str_t                      cookie;       /* len 0: no cookie */
    ngx_str_t                      cookie_attrs; /* "; Path=/; ..." */
    time_t                         ttl;
} ngx_http_civicgate_journey_conf_t;


typedef struct {
    ngx_http_complex_value_t           *channel;
    ngx_http_complex_value_t           *citizen;
    ngx_str_t                           citizen_challenge;
    ngx_http_civicgate_journey_conf_t  *journey;
} ngx_http_civicgate_journey_loc_conf_t;


typedef struct {
    ngx_str_t                      path;
    time_t                         max_age;
    ngx_flag_t                     secure;
    ngx_flag_t                     httponly;
    ngx_str_t                      samesite;
} ngx_http_civicgate_cookie_params_t;


static ngx_http_civicgate_journey_t *ngx_http_civicgate_journey_state(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_journey_inherit(ngx_http_request_t *r,
    ngx_http_civicgate_journey_t *j);
static ngx_int_t ngx_http_civicgate_journey_header_filter(
    ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_set_cookie(ngx_http_request_t *r,
    ngx_http_civicgate_journey_t *j, ngx_http_civicgate_journey_conf_t *jcf);
static ngx_int_t ngx_http_civicgate_channel_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_journey_id_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_journey_new_variable(
    ngx_http_request_t *r, ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_civicgate_citizen_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static char *ngx_http_civicgate_journey(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_civicgate_journey_param(ngx_conf_t *cf,
    ngx_http_civicgate_journey_conf_t *jcf,
    ngx_http_civicgate_cookie_params_t *cp, ngx_str_t *value);
static ngx_int_t ngx_http_civicgate_cookie_param(ngx_conf_t *cf,
    ngx_http_civicgate_cookie_params_t *cp, ngx_str_t *value);
static ngx_int_t ngx_http_civicgate_cookie_attrs(ngx_conf_t *cf,
    ngx_http_civicgate_journey_conf_t *jcf,
    ngx_http_civicgate_cookie_params_t *cp);
static char *ngx_http_civicgate_citizen(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_civicgate_journey_preconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_journey_postconfiguration(
    ngx_conf_t *cf);
static void *ngx_http_civicgate_journey_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_journey_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);


static ngx_command_t  ngx_http_civicgate_journey_commands[] = {

    { ngx_string("civicgate_channel"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_set_complex_value_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_journey_loc_conf_t, channel),
      NULL },

    { ngx_string("civicgate_citizen"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_civicgate_citizen,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_journey_loc_conf_t, citizen),
      NULL },

    { ngx_string("civicgate_citizen_challenge"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_civicgate_journey_loc_conf_t, citizen_challenge),
      NULL },

    { ngx_string("civicgate_journey"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_civicgate_journey,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_civicgate_journey_module_ctx = {
    ngx_http_civicgate_journey_preconfiguration, /* preconfiguration */
    ngx_http_civicgate_journey_postconfiguration, /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_civicgate_journey_create_loc_conf, /* create location conf */
    ngx_http_civicgate_journey_merge_loc_conf   /* merge location conf */
};


ngx_module_t  ngx_http_civicgate_journey_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_journey_module_ctx, /* module context */
    ngx_http_civicgate_journey_commands,   /* module directives */
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


static ngx_http_variable_t  ngx_http_civicgate_journey_vars[] = {

    { ngx_string("civicgate_channel"), NULL,
      ngx_http_civicgate_channel_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("civicgate_journey_id"), NULL,
      ngx_http_civicgate_journey_id_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("civicgate_journey_new"), NULL,
      ngx_http_civicgate_journey_new_variable, 0,
      NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("civicgate_citizen"), NULL,
      ngx_http_civicgate_citizen_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_http_civicgate_journey_conf_t  ngx_http_civicgate_journey_off;

static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


/*
 * In the core's ctx, so that it outlives internal redirects; a subrequest
 * (auth_request, SSI, mirror) is the same citizen on the same journey.
 */

static ngx_http_civicgate_journey_t *
ngx_http_civicgate_journey_state(ngx_http_request_t *r)
{
    ngx_http_civicgate_journey_t  *j;

    j = ngx_http_civicgate_get_state(r, &ngx_http_civicgate_journey_module);
    if (j != NULL) {
        return j;
    }

    j = ngx_pcalloc(r->pool, sizeof(ngx_http_civicgate_journey_t));
    if (j == NULL) {
        return NULL;
    }

    if (r != r->main && ngx_http_civicgate_journey_inherit(r, j) != NGX_OK) {
        return NULL;
    }

    if (ngx_http_civicgate_set_state(r, &ngx_http_civicgate_journey_module, j)
        != NGX_OK)
    {
        return NULL;
    }

    return j;
}


static ngx_int_t
ngx_http_civicgate_journey_inherit(ngx_http_request_t *r,
    ngx_http_civicgate_journey_t *j)
{
    ngx_http_civicgate_journey_t  *mj;

    /* minted once, for the main request, whichever asks first */
    mj = ngx_http_civicgate_journey_id(r->main);
    if (mj == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(j->journey_id, mj->journey_id, NGX_HTTP_CIVICGATE_JID_LEN);
    j->journey_done = 1;
    j->journey_on = mj->journey_on;
    j->journey_new = mj->journey_new;
    j->headers_done = 1;

    j->channel = mj->channel;
    j->channel_done = mj->channel_done;

    if (mj->citizen_done) {
        ngx_memcpy(j->citizen, mj->citizen, NGX_HTTP_CIVICGATE_PSEUDONYM_LEN);
        j->citizen_set = mj->citizen_set;
        j->citizen_done = 1;
    }

    return NGX_OK;
}


ngx_http_civicgate_journey_t *
ngx_http_civicgate_journey_get(ngx_http_request_t *r)
{
    return ngx_http_civicgate_get_state(r, &ngx_http_civicgate_journey_module);
}


ngx_http_civicgate_journey_t *
ngx_http_civicgate_journey_channel(ngx_http_request_t *r)
{
    int                                     n;
    ngx_str_t                               value;
    ngx_http_civicgate_journey_t           *j;
    ngx_http_civicgate_main_conf_t         *cgmcf;
    ngx_http_civicgate_journey_loc_conf_t  *jlcf;

    j = ngx_http_civicgate_journey_state(r);

    if (j == NULL || j->channel_done) {
        return j;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    jlcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_journey_module);

    j->channel = cgmcf->nchannels;

    if (jlcf->channel != NULL) {
        if (ngx_http_complex_value(r, jlcf->channel, &value) != NGX_OK) {
            return NULL;
        }

        /* control bytes and over-long values match no configured name */
        n = ngx_http_civicgate_channel_match(value.data, value.len,
                                             cgmcf->channels,
                                             cgmcf->nchannels);
        if (n >= 0) {
            j->channel = n;
        }
    }

    j->channel_done = 1;

    return j;
}


void
ngx_http_civicgate_journey_channel_name(ngx_http_request_t *r,
    ngx_http_civicgate_journey_t *j, ngx_str_t *name)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    if (j != NULL && j->channel < cgmcf->nchannels) {
        name->len = cgmcf->channels[j->channel].len;
        name->data = (u_char *) cgmcf->channels[j->channel].data;

    } else {
        ngx_str_set(name, "unknown");
    }
}


ngx_http_civicgate_journey_t *
ngx_http_civicgate_journey_id(ngx_http_request_t *r)
{
    u_char                                  raw[NGX_HTTP_CIVICGATE_JID_RAW];
    ngx_str_t                               value;
    ngx_uint_t                              outcome;
    ngx_http_civicgate_journey_t           *j;
    ngx_http_civicgate_main_conf_t         *cgmcf;
    ngx_http_civicgate_journey_loc_conf_t  *jlcf;

    j = ngx_http_civicgate_journey_state(r);

    if (j == NULL || j->journey_done) {
        return j;
    }

    jlcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_journey_module);

    if (!jlcf->journey->enable) {
        return j;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    outcome = NGX_HTTP_CIVICGATE_JOURNEY_MINTED;

    if (ngx_http_civicgate_journey_input(r, &jlcf->journey->header,
                                         &jlcf->journey->cookie, &value)
        == NGX_OK)
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
            return NULL;
        }

        j->journey_new = 1;
    }

    ngx_http_civicgate_metrics_inc(cgmcf->metrics, cgmcf->metrics->journeys,
                                   outcome);

    ngx_http_civicgate_jid_format(raw, j->journey_id);
    j->journey_on = 1;
    j->journey_done = 1;

    return j;
}


ngx_http_civicgate_journey_t *
ngx_http_civicgate_journey_citizen(ngx_http_request_t *r)
{
    ngx_str_t                               value;
    ngx_http_civicgate_journey_t           *j;
    ngx_http_civicgate_main_conf_t         *cgmcf;
    ngx_http_civicgate_journey_loc_conf_t  *jlcf;

    j = ngx_http_civicgate_journey_state(r);

    if (j == NULL || j->citizen_done) {
        return j;
    }

    jlcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_journey_module);

    if (jlcf->citizen != NULL) {
        if (ngx_http_complex_value(r, jlcf->citizen, &value) != NGX_OK) {
            return NULL;
        }

        if (value.len == 0) {
            /*
             * Not known yet: an identity set by auth_request_set appears
             * in the access phase, after the limits asked; consent and
             * events ask again.
             */
            return j;
        }

        cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

        if (ngx_http_civicgate_pseudonym(cgmcf->keyring, value.data,
                                         value.len, j->citizen)
            != 0)
        {
            return NULL;
        }

        j->citizen_set = 1;
    }

    j->citizen_done = 1;

    return j;
}


time_t
ngx_http_civicgate_journey_ttl(ngx_http_request_t *r)
{
    ngx_http_civicgate_journey_loc_conf_t  *jlcf;

    jlcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_journey_module);

    return jlcf->journey->ttl;
}


/* the WWW-Authenticate of a request that names no citizen */

ngx_str_t *
ngx_http_civicgate_journey_challenge(ngx_http_request_t *r)
{
    ngx_http_civicgate_journey_loc_conf_t  *jlcf;

    jlcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_journey_module);

    return &jlcf->citizen_challenge;
}


/* at merge of a later module: this location's is merged already */

ngx_uint_t
ngx_http_civicgate_journey_has_citizen(ngx_conf_t *cf)
{
    ngx_http_civicgate_journey_loc_conf_t  *jlcf;

    jlcf = ngx_http_conf_get_module_loc_conf(cf,
                                            ngx_http_civicgate_journey_module);

    return jlcf->citizen != NULL && jlcf->citizen != NGX_CONF_UNSET_PTR;
}


static ngx_int_t
ngx_http_civicgate_journey_header_filter(ngx_http_request_t *r)
{
    ngx_table_elt_t                        *h;
    ngx_http_civicgate_journey_t           *j;
    ngx_http_civicgate_journey_loc_conf_t  *jlcf;

    jlcf = ngx_http_get_module_loc_conf(r, ngx_http_civicgate_journey_module);

    if (!jlcf->journey->enable || r != r->main) {
        return ngx_http_next_header_filter(r);
    }

    j = ngx_http_civicgate_journey_id(r);
    if (j == NULL) {
        return NGX_ERROR;
    }

    if (j->headers_done) {
        return ngx_http_next_header_filter(r);
    }

    j->headers_done = 1;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key = jlcf->journey->header;
    h->value.data = j->journey_id;
    h->value.len = NGX_HTTP_CIVICGATE_JID_LEN;

    if (j->journey_new && jlcf->journey->cookie.len
        && ngx_http_civicgate_set_cookie(r, j, jlcf->journey) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_next_header_filter(r);
}


static ngx_int_t
ngx_http_civicgate_channel_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                      name;
    ngx_http_civicgate_journey_t  *j;

    j = ngx_http_civicgate_journey_channel(r);
    if (j == NULL) {
        return NGX_ERROR;
    }

    ngx_http_civicgate_journey_channel_name(r, j, &name);
    ngx_http_civicgate_variable_set(v, name.data, name.len);

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_journey_id_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_civicgate_journey_t  *j;

    j = ngx_http_civicgate_journey_id(r);
    if (j == NULL) {
        return NGX_ERROR;
    }

    ngx_http_civicgate_variable_set(v, j->journey_id,
                                    j->journey_on
                                    ? NGX_HTTP_CIVICGATE_JID_LEN : 0);
    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_journey_new_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_civicgate_journey_t  *j;

    j = ngx_http_civicgate_journey_id(r);
    if (j == NULL) {
        return NGX_ERROR;
    }

    if (!j->journey_on) {
        ngx_http_civicgate_variable_set(v, NULL, 0);

    } else {
        ngx_http_civicgate_variable_set(v, (u_char *) (j->journey_new
                                                       ? "1" : "0"), 1);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_citizen_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_civicgate_journey_t  *j;

    j = ngx_http_civicgate_journey_citizen(r);
    if (j == NULL) {
        return NGX_ERROR;
    }

    ngx_http_civicgate_variable_set(v, j->citizen,
                                    j->citizen_set
                                    ? NGX_HTTP_CIVICGATE_PSEUDONYM_LEN : 0);
    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_journey_preconfiguration(ngx_conf_t *cf)
{
    if (ngx_http_civicgate_add_state(cf, &ngx_http_civicgate_journey_module)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_civicgate_add_variables(cf,
                                            ngx_http_civicgate_journey_vars);
}


static ngx_int_t
ngx_http_civicgate_journey_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_civicgate_journey_header_filter;

    return NGX_OK;
}


static void *
ngx_http_civicgate_journey_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_civicgate_journey_loc_conf_t  *jlcf;

    jlcf = ngx_pcalloc(cf->pool,
                       sizeof(ngx_http_civicgate_journey_loc_conf_t));
    if (jlcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     jlcf->citizen_challenge = { 0, NULL };
     */

    jlcf->channel = NGX_CONF_UNSET_PTR;
    jlcf->citizen = NGX_CONF_UNSET_PTR;
    jlcf->journey = NGX_CONF_UNSET_PTR;

    return jlcf;
}


static char *
ngx_http_civicgate_journey_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_civicgate_journey_loc_conf_t *prev = parent;
    ngx_http_civicgate_journey_loc_conf_t *conf = child;

    ngx_conf_merge_ptr_value(conf->channel, prev->channel, NULL);
    ngx_conf_merge_ptr_value(conf->citizen, prev->citizen, NULL);
    ngx_conf_merge_str_value(conf->citizen_challenge, prev->citizen_challenge,
                             "Bearer realm=\"civicgate\"");
    ngx_conf_merge_ptr_value(conf->journey, prev->journey,
                             &ngx_http_civicgate_journey_off);

    return NGX_CONF_OK;
}


/* the header wins over the cookie: apps and channel backends send it */

ngx_int_t
ngx_http_civicgate_journey_input(ngx_http_request_t *r, ngx_str_t *header,
    ngx_str_t *cookie, ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_http_civicgate_find_header(r, header);

    if (h != NULL && h->value.len) {
        *value = h->value;
        return NGX_OK;
    }

    if (cookie->len
        && ngx_http_civicgate_cookie(r, cookie, value) == NGX_OK
        && value->len)
    {
        return NGX_OK;
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_civicgate_set_cookie(ngx_http_request_t *r,
    ngx_http_civicgate_journey_t *j, ngx_http_civicgate_journey_conf_t *jcf)
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
    p = ngx_cpymem(p, j->journey_id, NGX_HTTP_CIVICGATE_JID_LEN);
    ngx_memcpy(p, jcf->cookie_attrs.data, jcf->cookie_attrs.len);

    return NGX_OK;
}


static char *
ngx_http_civicgate_journey(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_journey_loc_conf_t *jlcf = conf;

    char                                *rv;
    ngx_str_t                           *value;
    ngx_uint_t                           i;
    ngx_http_civicgate_cookie_params_t   cp;
    ngx_http_civicgate_journey_conf_t   *jcf;

    if (jlcf->journey != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    jcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_journey_conf_t));
    if (jcf == NULL) {
        return NGX_CONF_ERROR;
    }

    if (ngx_strcmp(value[1].data, "on") == 0) {
        jcf->enable = 1;
        ngx_http_civicgate_needs_keys(cf, "civicgate_journey");

    } else if (ngx_strcmp(value[1].data, "off") != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid value \"%V\", it must be \"on\" or \"off\"",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    ngx_str_set(&jcf->header, "X-Journey-ID");
    ngx_str_set(&jcf->cookie, "cg_journey");
    jcf->ttl = 30 * 86400;

    ngx_str_set(&cp.path, "/");
    cp.max_age = 30 * 86400;
    cp.secure = 1;
    cp.httponly = 1;
    ngx_str_set(&cp.samesite, "Lax");

    for (i = 2; i < cf->args->nelts; i++) {
        rv = ngx_http_civicgate_journey_param(cf, jcf, &cp, &value[i]);
        if (rv != NGX_CONF_OK) {
            return rv;
        }
    }

    if (ngx_http_civicgate_cookie_attrs(cf, jcf, &cp) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    jlcf->journey = jcf;

    return NGX_CONF_OK;
}


static char *
ngx_http_civicgate_journey_param(ngx_conf_t *cf,
    ngx_http_civicgate_journey_conf_t *jcf,
    ngx_http_civicgate_cookie_params_t *cp, ngx_str_t *value)
{
    ngx_str_t  s;

    if (ngx_strncmp(value->data, "header=", 7) == 0 && value->len > 7) {
        jcf->header.data = value->data + 7;
        jcf->header.len = value->len - 7;
        return NGX_CONF_OK;
    }

    if (ngx_strncmp(value->data, "cookie=", 7) == 0 && value->len > 7) {
        jcf->cookie.data = value->data + 7;
        jcf->cookie.len = value->len - 7;

        if (ngx_strcmp(jcf->cookie.data, "off") == 0) {
            jcf->cookie.len = 0;
        }

        return NGX_CONF_OK;
    }

    if (ngx_strncmp(value->data, "ttl=", 4) == 0) {
        s.data = value->data + 4;
        s.len = value->len - 4;
        jcf->ttl = ngx_parse_time(&s, 1);

        if (jcf->ttl != (time_t) NGX_ERROR && jcf->ttl > 0) {
            return NGX_CONF_OK;
        }

    } else if (ngx_http_civicgate_cookie_param(cf, cp, value) == NGX_OK) {
        return NGX_CONF_OK;
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid parameter \"%V\"", value);
    return NGX_CONF_ERROR;
}


/* the cookie's attributes; NGX_DECLINED: not one, or an invalid value */

static ngx_int_t
ngx_http_civicgate_cookie_param(ngx_conf_t *cf,
    ngx_http_civicgate_cookie_params_t *cp, ngx_str_t *value)
{
    ngx_str_t  s;

    if (ngx_strncmp(value->data, "path=", 5) == 0 && value->len > 5
        && value->data[5] == '/')
    {
        cp->path.data = value->data + 5;
        cp->path.len = value->len - 5;
        return NGX_OK;
    }

    if (ngx_strncmp(value->data, "max_age=", 8) == 0) {
        s.data = value->data + 8;
        s.len = value->len - 8;
        cp->max_age = ngx_parse_time(&s, 1);

        if (cp->max_age != (time_t) NGX_ERROR) {
            return NGX_OK;
        }

    } else if (ngx_strncmp(value->data, "secure=", 7) == 0) {
        if (ngx_http_civicgate_flag_param(cf, value, 7, &cp->secure)
            == NGX_OK)
        {
            return NGX_OK;
        }

    } else if (ngx_strncmp(value->data, "httponly=", 9) == 0) {
        if (ngx_http_civicgate_flag_param(cf, value, 9, &cp->httponly)
            == NGX_OK)
        {
            return NGX_OK;
        }

    } else if (ngx_strncmp(value->data, "samesite=", 9) == 0) {
        s.data = value->data + 9;
        s.len = value->len - 9;

        if (ngx_strcasecmp(s.data, (u_char *) "strict") == 0) {
            ngx_str_set(&cp->samesite, "Strict");
            return NGX_OK;
        }

        if (ngx_strcasecmp(s.data, (u_char *) "lax") == 0) {
            ngx_str_set(&cp->samesite, "Lax");
            return NGX_OK;
        }

        if (ngx_strcasecmp(s.data, (u_char *) "none") == 0) {
            ngx_str_set(&cp->samesite, "None");
            return NGX_OK;
        }

        if (ngx_strcasecmp(s.data, (u_char *) "off") == 0) {
            ngx_str_null(&cp->samesite);
            return NGX_OK;
        }
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_civicgate_cookie_attrs(ngx_conf_t *cf,
    ngx_http_civicgate_journey_conf_t *jcf,
    ngx_http_civicgate_cookie_params_t *cp)
{
    u_char  *p;
    size_t   len;

    len = sizeof("; Path=") - 1 + cp->path.len
          + sizeof("; Max-Age=") - 1 + NGX_TIME_T_LEN
          + sizeof("; Secure") - 1 + sizeof("; HttpOnly") - 1
          + sizeof("; SameSite=") - 1 + cp->samesite.len;

    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    jcf->cookie_attrs.data = p;

    p = ngx_sprintf(p, "; Path=%V; Max-Age=%T", &cp->path, cp->max_age);

    if (cp->secure) {
        p = ngx_cpymem(p, "; Secure", sizeof("; Secure") - 1);
    }

    if (cp->httponly) {
        p = ngx_cpymem(p, "; HttpOnly", sizeof("; HttpOnly") - 1);
    }

    if (cp->samesite.len) {
        p = ngx_sprintf(p, "; SameSite=%V", &cp->samesite);
    }

    jcf->cookie_attrs.len = p - jcf->cookie_attrs.data;

    return NGX_OK;
}


static char *
ngx_http_civicgate_citizen(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    char  *rv;

    rv = ngx_http_set_complex_value_slot(cf, cmd, conf);

    if (rv == NGX_CONF_OK) {
        ngx_http_civicgate_needs_keys(cf, "civicgate_citizen");
    }

    return rv;
}
