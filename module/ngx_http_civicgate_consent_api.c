
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <openssl/crypto.h>

#include "ngx_http_civicgate_consent.h"
#include "ngx_http_civicgate_journey.h"
#include "ngx_http_civicgate_json.h"
#include "ngx_http_civicgate_metrics.h"


#define NGX_HTTP_CIVICGATE_OP_LIST      0
#define NGX_HTTP_CIVICGATE_OP_GET       1
#define NGX_HTTP_CIVICGATE_OP_GRANT     2
#define NGX_HTTP_CIVICGATE_OP_WITHDRAW  3
#define NGX_HTTP_CIVICGATE_OP_VERIFY    4
#define NGX_HTTP_CIVICGATE_OP_USES      5

#define NGX_HTTP_CIVICGATE_NOTES_MAX    500
#define NGX_HTTP_CIVICGATE_RAW_ID_MAX   256



typedef struct {
    u_char                             *file;   /* NULL: not an endpoint */
    ngx_uint_t                          line;
} ngx_http_civicgate_api_loc_conf_t;


/* per request, from the route to the answer */
typedef struct {
    ngx_uint_t                          op;
    ngx_uint_t                          admin;
    ngx_http_civicgate_purpose_t       *purpose;
    u_char                          citizen[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN];
    ngx_str_t                           answer;      /* the receipt */
} ngx_http_civicgate_api_ctx_t;


static ngx_http_civicgate_log_limit_t  ngx_http_civicgate_api_refused;


static char *ngx_http_civicgate_consent_api(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static ngx_int_t ngx_http_civicgate_api_postconfiguration(ngx_conf_t *cf);
static void *ngx_http_civicgate_api_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_civicgate_api_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_int_t ngx_http_civicgate_consent_admin(ngx_http_request_t *r,
    ngx_str_t *rest);
static ngx_int_t ngx_http_civicgate_api_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_api_identity(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx);
static ngx_int_t ngx_http_civicgate_api_route(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, ngx_str_t *rest);
static ngx_int_t ngx_http_civicgate_api_op(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, ngx_str_t *rest);
static void ngx_http_civicgate_api_body(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_api_process(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx);
static ngx_int_t ngx_http_civicgate_api_change(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, json_t *body);
static ngx_int_t ngx_http_civicgate_api_store(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, ngx_str_t *rec);
static ngx_int_t ngx_http_civicgate_api_admin_citizen(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, json_t *body);
static json_t *ngx_http_civicgate_api_receipt(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, json_t *record, const char *type);
static ngx_int_t ngx_http_civicgate_api_base64url(ngx_http_request_t *r,
    ngx_str_t *raw, ngx_str_t *out);
static ngx_int_t ngx_http_civicgate_api_sign(ngx_http_request_t *r,
    ngx_http_civicgate_key_t *key, json_t *receipt, ngx_str_t *signature);
static ngx_int_t ngx_http_civicgate_api_sign_eddsa(ngx_http_request_t *r,
    ngx_http_civicgate_keyset_t *ks, json_t *receipt, ngx_str_t *signature);
static ngx_int_t ngx_http_civicgate_api_verify_eddsa(ngx_http_request_t *r,
    ngx_http_civicgate_keyset_t *ks, json_t *body, const char *key_id,
    const char *signature);
static ngx_int_t ngx_http_civicgate_api_verify(ngx_http_request_t *r,
    json_t *body);
static ngx_int_t ngx_http_civicgate_api_redis(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, int argc, const char **argv,
    size_t *lens);
static void ngx_http_civicgate_api_reply(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply);
static ngx_int_t ngx_http_civicgate_api_list(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, redisReply *reply);
static json_t *ngx_http_civicgate_api_entry(ngx_http_civicgate_purpose_t *p,
    redisReply *value);


static ngx_command_t  ngx_http_civicgate_consent_api_commands[] = {

    { ngx_string("civicgate_consent_api"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_civicgate_consent_api,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_civicgate_consent_api_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_civicgate_api_postconfiguration, /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_civicgate_api_create_loc_conf, /* create location conf */
    ngx_http_civicgate_api_merge_loc_conf  /* merge location conf */
};


/* the citizen's consent API, and the consents/ path of the admin endpoint */

ngx_module_t  ngx_http_civicgate_consent_api_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_consent_api_module_ctx, /* module context */
    ngx_http_civicgate_consent_api_commands, /* module directives */
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


static ngx_str_t  ngx_http_civicgate_json_type =
    ngx_string("application/json");


/* the requirements are checked at merge, pointing back at this line */

static char *
ngx_http_civicgate_consent_api(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_api_loc_conf_t *alcf = conf;

    ngx_http_core_loc_conf_t           *clcf;
    ngx_http_civicgate_consent_conf_t  *ccf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_civicgate_api_handler;

    ccf = ngx_http_conf_get_module_main_conf(cf,
                                           ngx_http_civicgate_consent_module);
    ccf->used = 1;

    alcf->file = cf->conf_file->file.name.data;
    alcf->line = cf->conf_file->line;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_civicgate_api_postconfiguration(ngx_conf_t *cf)
{
    return ngx_http_civicgate_admin_route(cf, "consents/",
                                          ngx_http_civicgate_consent_admin);
}


static void *
ngx_http_civicgate_api_create_loc_conf(ngx_conf_t *cf)
{
    return ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_api_loc_conf_t));
}


/* the endpoint's own location only: it is not inherited */

static char *
ngx_http_civicgate_api_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_civicgate_api_loc_conf_t *conf = child;

    if (conf->file != NULL
        && ngx_http_civicgate_consent_requires(cf, "civicgate_consent_api",
                                               conf->file, conf->line)
           != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * <location>, <location>{purpose}, <location>receipts/verify.  The route
 * and the method are checked before the identity: credentials would not
 * make an unknown purpose or a method the resource never allows succeed.
 */

static ngx_int_t
ngx_http_civicgate_api_handler(ngx_http_request_t *r)
{
    ngx_str_t                      rest;
    ngx_http_civicgate_api_ctx_t  *actx;

    actx = ngx_pcalloc(r->pool, sizeof(ngx_http_civicgate_api_ctx_t));
    if (actx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ngx_http_civicgate_location_rest(r, &rest) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (rest.len == 9 && ngx_strncmp(rest.data, "receipts/", 9) == 0) {
        rest.len = 0;
    }

    return ngx_http_civicgate_api_route(r, actx, &rest);
}


/* the citizen the API acts for: NGX_DECLINED, or a 401 sent */

static ngx_int_t
ngx_http_civicgate_api_identity(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx)
{
    if (actx->admin || actx->op == NGX_HTTP_CIVICGATE_OP_VERIFY) {
        return NGX_DECLINED;
    }

    ngx_http_civicgate_journey_t  *j;

    j = ngx_http_civicgate_journey_citizen(r);
    if (j == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (!j->citizen_set) {
        (void) ngx_http_discard_request_body(r);
        return ngx_http_civicgate_consent_problem(r, NGX_HTTP_UNAUTHORIZED,
                                                  NULL);
    }

    ngx_memcpy(actx->citizen, j->citizen, NGX_HTTP_CIVICGATE_PSEUDONYM_LEN);

    return NGX_DECLINED;
}


/* <admin>consents/{purpose}: grant and withdraw at the counter */

static ngx_int_t
ngx_http_civicgate_consent_admin(ngx_http_request_t *r, ngx_str_t *rest)
{
    ngx_http_civicgate_api_ctx_t       *actx;
    ngx_http_civicgate_main_conf_t     *cgmcf;
    ngx_http_civicgate_consent_conf_t  *ccf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);

    if (cgmcf->keyring == NULL || ccf->purposes.nelts == 0) {
        (void) ngx_http_discard_request_body(r);
        return ngx_http_civicgate_error(r, NGX_HTTP_NOT_FOUND,
                                        "not-found", "No such endpoint.");
    }

    if (!(r->method & (NGX_HTTP_PUT|NGX_HTTP_DELETE))) {
        return ngx_http_civicgate_method_not_allowed(r, "PUT, DELETE");
    }

    actx = ngx_pcalloc(r->pool, sizeof(ngx_http_civicgate_api_ctx_t));
    if (actx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    actx->admin = 1;

    return ngx_http_civicgate_api_route(r, actx, rest);
}


static ngx_int_t
ngx_http_civicgate_api_route(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, ngx_str_t *rest)
{
    ngx_int_t  rc;

    /* a content handler: no internal redirect loses it meanwhile */
    ngx_http_set_ctx(r, actx, ngx_http_civicgate_consent_api_module);

    rc = ngx_http_civicgate_api_op(r, actx, rest);

    if (rc == NGX_DECLINED) {
        rc = ngx_http_civicgate_api_identity(r, actx);
    }

    if (rc != NGX_DECLINED) {
        return rc;
    }

    if (actx->op == NGX_HTTP_CIVICGATE_OP_LIST
        || actx->op == NGX_HTTP_CIVICGATE_OP_GET
        || actx->op == NGX_HTTP_CIVICGATE_OP_USES)
    {
        (void) ngx_http_discard_request_body(r);

        /* balanced by the finalization after the reply, as a body read is */
        r->main->count++;
        ngx_http_civicgate_api_body(r);
        return NGX_DONE;
    }

    /* bodies are read into memory only: never a blocking temp file read */
    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r, ngx_http_civicgate_api_body);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


/* the operation the path and method name: NGX_DECLINED, or an answer sent */

static ngx_int_t
ngx_http_civicgate_api_op(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, ngx_str_t *rest)
{
    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);

    if (rest->len == 0 && !actx->admin) {
        if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
            return ngx_http_civicgate_method_not_allowed(r, "GET, HEAD");
        }

        actx->op = NGX_HTTP_CIVICGATE_OP_LIST;
        return NGX_DECLINED;
    }

    if (rest->len == 15 && ngx_strncmp(rest->data, "receipts/verify", 15) == 0
        && !actx->admin)
    {
        if (r->method != NGX_HTTP_POST) {
            return ngx_http_civicgate_method_not_allowed(r, "POST");
        }

        actx->op = NGX_HTTP_CIVICGATE_OP_VERIFY;
        return NGX_DECLINED;
    }

    if (rest->len == 4 && ngx_strncmp(rest->data, "uses", 4) == 0
        && !actx->admin)
    {
        if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
            return ngx_http_civicgate_method_not_allowed(r, "GET, HEAD");
        }

        actx->op = NGX_HTTP_CIVICGATE_OP_USES;
        return NGX_DECLINED;
    }

    actx->purpose = ngx_http_civicgate_purpose_find(ccf, rest->data,
                                                    rest->len);
    if (actx->purpose == NULL) {
        (void) ngx_http_discard_request_body(r);
        return ngx_http_civicgate_error(r, NGX_HTTP_BAD_REQUEST,
                                        "unknown-purpose",
                                        "No such consent purpose.");
    }

    if (r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD)) {
        actx->op = NGX_HTTP_CIVICGATE_OP_GET;

    } else if (r->method == NGX_HTTP_PUT) {
        actx->op = NGX_HTTP_CIVICGATE_OP_GRANT;

    } else if (r->method == NGX_HTTP_DELETE) {
        actx->op = NGX_HTTP_CIVICGATE_OP_WITHDRAW;

    } else {
        return ngx_http_civicgate_method_not_allowed(r,
                                                    "GET, HEAD, PUT, DELETE");
    }

    return NGX_DECLINED;
}


/* the body is in (or there is none): act, or wait for Redis */

static void
ngx_http_civicgate_api_body(ngx_http_request_t *r)
{
    ngx_int_t                      rc;
    ngx_http_civicgate_api_ctx_t  *actx;

    actx = ngx_http_get_module_ctx(r, ngx_http_civicgate_consent_api_module);

    rc = ngx_http_civicgate_api_process(r, actx);

    if (rc != NGX_DONE) {
        ngx_http_finalize_request(r, rc);
    }
}


static ngx_int_t
ngx_http_civicgate_api_process(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx)
{
    u_char       key[64], *p;
    json_t      *body;
    size_t       lens[3];
    ngx_int_t    rc;
    const char  *argv[3];

    p = ngx_http_civicgate_key_citizen(key, actx->citizen,
                                       NGX_HTTP_CIVICGATE_PSEUDONYM_LEN,
                                       NGX_HTTP_CIVICGATE_KEY_CONSENTS);

    argv[1] = (const char *) key;
    lens[1] = p - key;

    switch (actx->op) {

    case NGX_HTTP_CIVICGATE_OP_USES:
        return ngx_http_civicgate_uses_read(r, actx->citizen);

    case NGX_HTTP_CIVICGATE_OP_LIST:
        argv[0] = "HGETALL";
        lens[0] = 7;
        return ngx_http_civicgate_api_redis(r, actx, 2, argv, lens);

    case NGX_HTTP_CIVICGATE_OP_GET:
        argv[0] = "HMGET";
        lens[0] = 5;
        argv[2] = (const char *) actx->purpose->name.data;
        lens[2] = actx->purpose->name.len;
        return ngx_http_civicgate_api_redis(r, actx, 3, argv, lens);
    }

    rc = ngx_http_civicgate_read_json(r, &body);

    if (rc != NGX_DECLINED) {
        return rc;
    }

    if (actx->op == NGX_HTTP_CIVICGATE_OP_VERIFY) {
        rc = ngx_http_civicgate_api_verify(r, body);

    } else {
        rc = ngx_http_civicgate_api_change(r, actx, body);
    }

    json_decref(body);

    return rc;
}


/* grant (PUT) or withdraw (DELETE): the record, its receipt, the script */

static ngx_int_t
ngx_http_civicgate_api_change(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, json_t *body)
{
    json_t                        *record, *receipt;
    ngx_str_t                      rec, channel;
    ngx_int_t                      rc;
    const char                    *error;
    ngx_http_civicgate_journey_t  *j;

    if (actx->admin) {
        if (ngx_http_civicgate_api_admin_citizen(r, actx, body) != NGX_OK) {
            return ngx_http_civicgate_error(r, NGX_HTTP_BAD_REQUEST,
                          "invalid-body",
                          "\"citizen\" must name the citizen (a string).");
        }

        ngx_str_set(&channel, "counter");

    } else {
        j = ngx_http_civicgate_journey_channel(r);
        if (j == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ngx_http_civicgate_journey_channel_name(r, j, &channel);
    }

    j = ngx_http_civicgate_journey_id(r);
    if (j == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    record = json_pack("{s:s, s:s%, s:o}",
                       "status", actx->op == NGX_HTTP_CIVICGATE_OP_GRANT
                                 ? "granted" : "withdrawn",
                       "channel", channel.data, channel.len,
                       "journey", j->journey_on
                                  ? json_stringn((char *) j->journey_id,
                                                 NGX_HTTP_CIVICGATE_JID_LEN)
                                  : json_null());
    if (record == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ngx_http_civicgate_consent_options(body,
                                       actx->op == NGX_HTTP_CIVICGATE_OP_GRANT,
                                       record, &error)
        != NGX_OK)
    {
        json_decref(record);
        return ngx_http_civicgate_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid-body", error);
    }

    receipt = ngx_http_civicgate_api_receipt(r, actx, record,
                                  actx->op == NGX_HTTP_CIVICGATE_OP_GRANT
                                  ? "grant" : "withdrawal");

    rc = NGX_HTTP_INTERNAL_SERVER_ERROR;

    if (receipt != NULL
        && ngx_http_civicgate_json_dump(r->pool, receipt, 0, &actx->answer)
           == NGX_OK
        && ngx_http_civicgate_json_dump(r->pool, record, 1, &rec) == NGX_OK)
    {
        rc = ngx_http_civicgate_api_store(r, actx, &rec);
    }

    json_decref(record);
    json_decref(receipt);

    return rc;
}


/* the counter names the citizen: pseudonymised here, never stored */

/* stored and announced in one step: the record and the invalidation */

static ngx_int_t
ngx_http_civicgate_api_store(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, ngx_str_t *rec)
{
    u_char                             *p, key[64];
    size_t                              lens[8];
    const char                         *argv[8];
    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);

    p = ngx_http_civicgate_key_citizen(key, actx->citizen,
                                       NGX_HTTP_CIVICGATE_PSEUDONYM_LEN,
                                       NGX_HTTP_CIVICGATE_KEY_CONSENTS);

    argv[0] = "EVALSHA";
    lens[0] = 7;
    argv[1] = (const char *) ccf->script->sha;
    lens[1] = 40;
    argv[2] = "1";
    lens[2] = 1;
    argv[3] = (const char *) key;
    lens[3] = p - key;
    argv[4] = (const char *) actx->purpose->name.data;
    lens[4] = actx->purpose->name.len;
    argv[5] = (const char *) rec->data;
    lens[5] = rec->len;
    argv[6] = NGX_HTTP_CIVICGATE_KEY_CONSENT_CHANNEL;
    lens[6] = sizeof(NGX_HTTP_CIVICGATE_KEY_CONSENT_CHANNEL) - 1;
    argv[7] = (const char *) actx->citizen;
    lens[7] = NGX_HTTP_CIVICGATE_PSEUDONYM_LEN;

    return ngx_http_civicgate_api_redis(r, actx, 8, argv, lens);
}


static ngx_int_t
ngx_http_civicgate_api_admin_citizen(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, json_t *body)
{
    size_t                           len;
    const char                      *citizen;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    citizen = json_string_value(json_object_get(body, "citizen"));
    len = citizen ? json_string_length(json_object_get(body, "citizen")) : 0;

    if (len == 0 || len > NGX_HTTP_CIVICGATE_RAW_ID_MAX
        || cgmcf->keyring == NULL
        || ngx_http_civicgate_pseudonym(cgmcf->keyring, (u_char *) citizen,
                                        len, actx->citizen)
           != 0)
    {
        return NGX_ERROR;
    }

    json_object_del(body, "citizen");

    return NGX_OK;
}


/*
 * times, expires_at (RFC 3339, in the future) and notes: nothing else.
 * No request: the fuzz target calls it too.
 */

ngx_int_t
ngx_http_civicgate_consent_options(json_t *body, ngx_uint_t grant,
    json_t *record, const char **error)
{
    u_char       ts[NGX_HTTP_CIVICGATE_RFC3339_LEN];
    json_t      *value;
    int64_t      t;
    const char  *key, *s;

    ngx_http_civicgate_rfc3339_format(ngx_time(), ts);
    json_object_set_new(record, grant ? "granted_at" : "withdrawn_at",
                        json_stringn((char *) ts, sizeof(ts)));

    if (grant) {
        json_object_set_new(record, "expires_at", json_null());
    }

    json_object_foreach(body, key, value) {

        s = json_string_value(value);

        if (grant && ngx_strcmp(key, "expires_at") == 0) {
            if (s == NULL
                || ngx_http_civicgate_rfc3339_parse((u_char *) s,
                                                    ngx_strlen(s), &t)
                   != 0)
            {
                *error = "\"expires_at\" must be an RFC 3339 date-time.";
                return NGX_ERROR;
            }

            if (t <= ngx_time()) {
                *error = "\"expires_at\" is in the past.";
                return NGX_ERROR;
            }

            ngx_http_civicgate_rfc3339_format(t, ts);
            json_object_set_new(record, "expires_at",
                                json_stringn((char *) ts, sizeof(ts)));
            continue;
        }

        if (ngx_strcmp(key, "notes") == 0) {
            if (s == NULL
                || json_string_length(value) > NGX_HTTP_CIVICGATE_NOTES_MAX)
            {
                *error = "\"notes\" must be a string of at most 500 bytes.";
                return NGX_ERROR;
            }

            json_object_set(record, "notes", value);
            continue;
        }

        *error = "Unknown field in the body.";
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* a signed receipt: proof of what was consented to, when, and how */

static json_t *
ngx_http_civicgate_api_receipt(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, json_t *record, const char *type)
{
    u_char                           id[16], rnd[8];
    json_t                          *receipt;
    ngx_int_t                        rc;
    ngx_str_t                        signature;
    ngx_http_civicgate_key_t        *key;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    key = &cgmcf->keyring->keys[0];

    if (ngx_http_civicgate_random(rnd, sizeof(rnd)) != 0) {
        return NULL;
    }

    ngx_hex_dump(id, rnd, sizeof(rnd));

    json_object_set_new(record, "receipt", json_stringn((char *) id, 16));

    receipt = json_deep_copy(record);
    if (receipt == NULL) {
        return NULL;
    }

    json_object_del(receipt, "status");
    json_object_del(receipt, "notes");
    json_object_del(receipt, "receipt");
    json_object_set_new(receipt, "receipt_id", json_stringn((char *) id, 16));
    json_object_set_new(receipt, "type", json_string(type));
    json_object_set_new(receipt, "purpose",
                        json_stringn((char *) actx->purpose->name.data,
                                     actx->purpose->name.len));
    json_object_set_new(receipt, "citizen",
                        json_stringn((char *) actx->citizen,
                                     NGX_HTTP_CIVICGATE_PSEUDONYM_LEN));

    if (cgmcf->signing != NULL) {
        rc = ngx_http_civicgate_api_sign_eddsa(r, cgmcf->signing, receipt,
                                               &signature);

    } else {
        json_object_set_new(receipt, "key_id",
                            json_stringn((char *) key->id, key->id_len));
        json_object_set_new(receipt, "alg", json_string("HS256"));

        rc = ngx_http_civicgate_api_sign(r, key, receipt, &signature);
    }

    if (rc != NGX_OK) {
        json_decref(receipt);
        return NULL;
    }

    json_object_set_new(receipt, "signature",
                        json_stringn((char *) signature.data, signature.len));

    return receipt;
}


/* HMAC-SHA256 over the receipt's sorted, compact JSON without "signature" */

static ngx_int_t
ngx_http_civicgate_api_sign(ngx_http_request_t *r,
    ngx_http_civicgate_key_t *key, json_t *receipt, ngx_str_t *signature)
{
    u_char     mac[NGX_HTTP_CIVICGATE_SHA256_LEN];
    ngx_str_t  canonical, raw;

    if (ngx_http_civicgate_json_dump(r->pool, receipt, 1, &canonical)
        != NGX_OK
        || ngx_http_civicgate_hmac_sha256(key->receipt,
                                          NGX_HTTP_CIVICGATE_SUBKEY_LEN,
                                          canonical.data, canonical.len, mac)
           != 0)
    {
        return NGX_ERROR;
    }

    raw.data = mac;
    raw.len = sizeof(mac);

    return ngx_http_civicgate_api_base64url(r, &raw, signature);
}


/* a signature as the receipt carries it */

static ngx_int_t
ngx_http_civicgate_api_base64url(ngx_http_request_t *r, ngx_str_t *raw,
    ngx_str_t *out)
{
    out->data = ngx_pnalloc(r->pool, ngx_base64_encoded_length(raw->len));
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    ngx_encode_base64url(out, raw);

    return NGX_OK;
}


/*
 * With civicgate_signing_key: Ed25519 by the first key over the same
 * sorted, compact JSON (with "alg" EdDSA and "key_id" the key's kid), so
 * that anyone holding the JWK Set can check it.
 */

static ngx_int_t
ngx_http_civicgate_api_sign_eddsa(ngx_http_request_t *r,
    ngx_http_civicgate_keyset_t *ks, json_t *receipt, ngx_str_t *signature)
{
    u_char                             sig[NGX_HTTP_CIVICGATE_ED25519_SIG];
    ngx_str_t                          canonical, raw;
    ngx_http_civicgate_signing_key_t  *k;

    k = ks->keys.elts;

    json_object_set_new(receipt, "key_id",
                        json_stringn((char *) k[0].kid.data, k[0].kid.len));
    json_object_set_new(receipt, "alg", json_string("EdDSA"));

    if (ngx_http_civicgate_json_dump(r->pool, receipt, 1, &canonical)
        != NGX_OK
        || ngx_http_civicgate_sign(ks, canonical.data, canonical.len, sig)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    raw.data = sig;
    raw.len = sizeof(sig);

    return ngx_http_civicgate_api_base64url(r, &raw, signature);
}


/* an EdDSA receipt: by any published key; 1 valid, 0 not, -1 error */

static ngx_int_t
ngx_http_civicgate_api_verify_eddsa(ngx_http_request_t *r,
    ngx_http_civicgate_keyset_t *ks, json_t *body, const char *key_id,
    const char *signature)
{
    u_char     sig[NGX_HTTP_CIVICGATE_ED25519_SIG + 3];
    json_t    *copy;
    ngx_int_t  rc;
    ngx_str_t  canonical, src, dst;

    src.data = (u_char *) signature;
    src.len = ngx_strlen(signature);

    if (ks == NULL
        || src.len != ngx_base64_encoded_length(NGX_HTTP_CIVICGATE_ED25519_SIG)
                      - 2)
    {
        return 0;
    }

    dst.data = sig;

    if (ngx_decode_base64url(&dst, &src) != NGX_OK
        || dst.len != NGX_HTTP_CIVICGATE_ED25519_SIG)
    {
        return 0;
    }

    copy = json_copy(body);
    if (copy == NULL) {
        return -1;
    }

    json_object_del(copy, "signature");
    rc = ngx_http_civicgate_json_dump(r->pool, copy, 1, &canonical);
    json_decref(copy);

    if (rc != NGX_OK) {
        return -1;
    }

    rc = ngx_http_civicgate_sign_verify(ks, (u_char *) key_id,
                                        ngx_strlen(key_id), canonical.data,
                                        canonical.len, dst.data, dst.len);

    return rc == NGX_OK ? 1 : (rc == NGX_DECLINED ? 0 : -1);
}


static ngx_int_t
ngx_http_civicgate_api_verify(ngx_http_request_t *r, json_t *body)
{
    size_t                           i, len;
    json_t                          *copy;
    ngx_str_t                        expected, out;
    ngx_int_t                        rc;
    ngx_uint_t                       valid;
    const char                      *signature, *key_id, *alg;
    ngx_http_civicgate_key_t        *key;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    signature = json_string_value(json_object_get(body, "signature"));
    key_id = json_string_value(json_object_get(body, "key_id"));

    if (signature == NULL || key_id == NULL) {
        return ngx_http_civicgate_error(r, NGX_HTTP_BAD_REQUEST,
                          "invalid-body",
                          "The body must be a receipt with \"key_id\" and "
                          "\"signature\".");
    }

    valid = 0;
    len = ngx_strlen(key_id);
    key = NULL;

    alg = json_string_value(json_object_get(body, "alg"));

    if (alg != NULL && ngx_strcmp(alg, "EdDSA") == 0) {
        rc = ngx_http_civicgate_api_verify_eddsa(r, cgmcf->signing, body,
                                                 key_id, signature);
        if (rc < 0) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        valid = rc;
        goto answer;
    }

    for (i = 0; i < cgmcf->keyring->nkeys; i++) {
        if (cgmcf->keyring->keys[i].id_len == len
            && ngx_strncmp(cgmcf->keyring->keys[i].id, key_id, len) == 0)
        {
            key = &cgmcf->keyring->keys[i];
            break;
        }
    }

    copy = json_copy(body);

    if (key != NULL && copy != NULL) {
        json_object_del(copy, "signature");

        if (ngx_http_civicgate_api_sign(r, key, copy, &expected) != NGX_OK) {
            json_decref(copy);
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        valid = (expected.len == ngx_strlen(signature)
                 && CRYPTO_memcmp(expected.data, signature, expected.len)
                    == 0);
    }

    json_decref(copy);

answer:

    if (ngx_http_civicgate_json_dump(r->pool,
                                     json_pack("{s:b}", "valid", (int) valid),
                                     0, &out)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_civicgate_send(r, NGX_HTTP_OK,
                                   &ngx_http_civicgate_json_type, &out);
}


static ngx_int_t
ngx_http_civicgate_api_redis(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, int argc, const char **argv,
    size_t *lens)
{
    ngx_http_civicgate_ctx_t        *ctx;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    ctx = ngx_http_civicgate_get_ctx(r);

    ctx->cmd = ngx_http_civicgate_redis_send(cgmcf->client, argc, argv, lens,
                                             ngx_http_civicgate_api_reply, r);
    if (ctx->cmd == NULL) {
        return ngx_http_civicgate_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "consent-unavailable",
                                        "Consents cannot be reached now; "
                                        "nothing was changed.");
    }

    ngx_http_civicgate_wait(r);

    return NGX_DONE;
}


static void
ngx_http_civicgate_api_reply(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_int_t                        rc;
    ngx_connection_t                *c;
    ngx_http_request_t              *r;
    ngx_http_civicgate_ctx_t        *ctx;
    ngx_http_civicgate_main_conf_t  *cgmcf;
    ngx_http_civicgate_api_ctx_t    *actx;

    r = ngx_http_civicgate_answered(cmd, &ctx);
    if (r == NULL) {
        return;
    }

    actx = ngx_http_get_module_ctx(r, ngx_http_civicgate_consent_api_module);

    c = r->connection;
    ngx_http_set_log_request(c->log, r);

    if (reply == NULL || reply->type == REDIS_REPLY_ERROR) {
        ngx_http_civicgate_redis_refused(cmd->redis, reply,
                                         "a consent command",
                                         &ngx_http_civicgate_api_refused);

        rc = ngx_http_civicgate_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                      "consent-unavailable",
                                      "Consents cannot be reached now; "
                                      "retry, the change may not have "
                                      "been stored.");

    } else if (actx->op == NGX_HTTP_CIVICGATE_OP_GRANT
               || actx->op == NGX_HTTP_CIVICGATE_OP_WITHDRAW)
    {
        /* this gateway forgets at once, the others on the message */
        cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
        ngx_http_civicgate_consent_evict(
            ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module),
            actx->citizen);

        ngx_http_civicgate_metrics_inc(cgmcf->metrics,
                                cgmcf->metrics->consent_changes,
                                actx->purpose->index * 2
                                + (actx->op == NGX_HTTP_CIVICGATE_OP_GRANT
                                   ? 0 : 1));

        rc = ngx_http_civicgate_send(r, actx->op == NGX_HTTP_CIVICGATE_OP_GRANT
                                        ? NGX_HTTP_CREATED : NGX_HTTP_OK,
                                     &ngx_http_civicgate_json_type,
                                     &actx->answer);

    } else {
        rc = ngx_http_civicgate_api_list(r, actx, reply);
    }

    ngx_http_finalize_request(r, rc);
    ngx_http_run_posted_requests(c);
}


/* every known purpose with the citizen's state for it */

static ngx_int_t
ngx_http_civicgate_api_list(ngx_http_request_t *r,
    ngx_http_civicgate_api_ctx_t *actx, redisReply *reply)
{
    json_t                             *list, *entry;
    ngx_str_t                           out;
    ngx_uint_t                          i, j;
    redisReply                         *value;
    ngx_http_civicgate_purpose_t       *p;
    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);

    if (reply->type != REDIS_REPLY_ARRAY) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (actx->op == NGX_HTTP_CIVICGATE_OP_GET) {
        entry = ngx_http_civicgate_api_entry(actx->purpose,
                                             reply->elements
                                             ? reply->element[0] : NULL);
        goto send;
    }

    list = json_array();
    p = ccf->purposes.elts;

    for (i = 0; list && i < ccf->purposes.nelts; i++) {
        value = NULL;

        for (j = 0; j + 1 < reply->elements; j += 2) {
            if (reply->element[j]->len == p[i].name.len
                && ngx_strncmp(reply->element[j]->str, p[i].name.data,
                               p[i].name.len) == 0)
            {
                value = reply->element[j + 1];
                break;
            }
        }

        json_array_append_new(list,
                              ngx_http_civicgate_api_entry(&p[i], value));
    }

    entry = json_pack("{s:o}", "consents", list);

send:

    if (ngx_http_civicgate_json_dump(r->pool, entry, 0, &out) != NGX_OK) {
        json_decref(entry);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    json_decref(entry);

    return ngx_http_civicgate_send(r, NGX_HTTP_OK,
                                   &ngx_http_civicgate_json_type, &out);
}


/* status: granted, withdrawn, expired or none; with labels and times */

static json_t *
ngx_http_civicgate_api_entry(ngx_http_civicgate_purpose_t *p,
    redisReply *value)
{
    json_t      *entry, *record;
    const char  *status;

    entry = json_pack("{s:s%, s:{s:s%, s:s%}}",
                      "purpose", p->name.data, p->name.len,
                      "label", "id", p->label_id.data, p->label_id.len,
                      "en", p->label_en.data, p->label_en.len);
    if (entry == NULL) {
        return NULL;
    }

    record = NULL;

    if (value && value->type == REDIS_REPLY_STRING) {
        record = json_loadb(value->str, value->len, 0, NULL);
    }

    if (!json_is_object(record)) {
        json_decref(record);
        json_object_set_new(entry, "status", json_string("none"));
        return entry;
    }

    status = json_string_value(json_object_get(record, "status"));

    if (status && ngx_strcmp(status, "granted") == 0
        && ngx_http_civicgate_consent_record_valid(record, ngx_time()) < 0)
    {
        status = "expired";
    }

    json_object_update(entry, record);
    json_object_set_new(entry, "status", json_string(status ? status
                                                            : "none"));
    json_decref(record);

    return entry;
}


