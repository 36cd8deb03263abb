
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_status.h"
#include "ngx_http_civicgate_json.h"


/* <admin>services/{name}: PUT sets a service's status, DELETE clears it */


#define NGX_HTTP_CIVICGATE_MESSAGE_MAX  1000

/* a change's ID is refused when another came first: signed again */
#define NGX_HTTP_CIVICGATE_CHANGE_TRIES  3


typedef struct {
    ngx_str_t                      name;
    ngx_str_t                      record;     /* empty: cleared */
    ngx_http_civicgate_sid_t       sid;        /* proposed, with a notice */
    ngx_uint_t                     tries;
    ngx_str_t                      notice;     /* empty: no signing key */
    u_char                         code[NGX_HTTP_CIVICGATE_NOTICE_LEN];
} ngx_http_civicgate_admin_ctx_t;


static ngx_int_t ngx_http_civicgate_status_admin_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_civicgate_status_admin(ngx_http_request_t *r,
    ngx_str_t *name);
static void ngx_http_civicgate_status_admin_body(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_status_record(ngx_http_request_t *r,
    json_t **record);
static ngx_int_t ngx_http_civicgate_record_message(json_t *body,
    json_t *record, const char **error);
static ngx_int_t ngx_http_civicgate_record_times(json_t *body,
    json_t *record, const char **error);
static ngx_int_t ngx_http_civicgate_status_notice(ngx_http_request_t *r,
    ngx_http_civicgate_admin_ctx_t *sctx);
static ngx_int_t ngx_http_civicgate_status_store(ngx_http_request_t *r,
    ngx_http_civicgate_admin_ctx_t *sctx);
static ngx_int_t ngx_http_civicgate_status_retry(ngx_http_request_t *r,
    ngx_http_civicgate_admin_ctx_t *sctx, redisReply *reply);
static void ngx_http_civicgate_status_stored(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);


static ngx_http_civicgate_log_limit_t  ngx_http_civicgate_admin_refused;

static ngx_str_t  ngx_http_civicgate_admin_type =
    ngx_string("application/json");

static ngx_http_module_t  ngx_http_civicgate_status_admin_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_civicgate_status_admin_init,  /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    NULL,                                  /* create location configuration */
    NULL                                   /* merge location configuration */
};


/* the services/ path of the admin endpoint, above the status it sets */

ngx_module_t  ngx_http_civicgate_status_admin_module = {
    NGX_MODULE_V1,
    &ngx_http_civicgate_status_admin_module_ctx, /* module context */
    NULL,                                  /* module directives */
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


static const char  *ngx_http_civicgate_admin_states[] = {
    "operational", "degraded", "outage", "maintenance", NULL
};


static ngx_int_t
ngx_http_civicgate_status_admin_init(ngx_conf_t *cf)
{
    return ngx_http_civicgate_admin_route(cf, "services/",
                                          ngx_http_civicgate_status_admin);
}


static ngx_int_t
ngx_http_civicgate_status_admin(ngx_http_request_t *r, ngx_str_t *name)
{
    ngx_int_t                        rc;
    ngx_str_t                       *known;
    ngx_uint_t                       i;
    ngx_time_t                      *tp;
    ngx_http_civicgate_main_conf_t  *cgmcf;
    ngx_http_civicgate_admin_ctx_t  *sctx;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    if (!(r->method & (NGX_HTTP_PUT|NGX_HTTP_DELETE))) {
        return ngx_http_civicgate_method_not_allowed(r, "PUT, DELETE");
    }

    known = cgmcf->services.elts;

    for (i = 0; i < cgmcf->services.nelts; i++) {
        if (known[i].len == name->len
            && ngx_strncmp(known[i].data, name->data, name->len) == 0)
        {
            break;
        }
    }

    if (!ngx_http_civicgate_status_conf()->used
        || i == cgmcf->services.nelts)
    {
        return ngx_http_civicgate_error(r, NGX_HTTP_NOT_FOUND,
                                        "unknown-service",
                                        "No such service in this gateway's "
                                        "configuration.");
    }

    sctx = ngx_pcalloc(r->pool, sizeof(ngx_http_civicgate_admin_ctx_t));
    if (sctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    sctx->name = known[i];

    tp = ngx_timeofday();
    sctx->sid.ms = (uint64_t) tp->sec * 1000 + tp->msec;

    /* a content handler: no internal redirect loses it meanwhile */
    ngx_http_set_ctx(r, sctx, ngx_http_civicgate_status_admin_module);

    if (r->method == NGX_HTTP_DELETE) {
        (void) ngx_http_discard_request_body(r);

        r->main->count++;
        ngx_http_civicgate_status_admin_body(r);
        return NGX_DONE;
    }

    /* bodies are read into memory only: never a blocking temp file read */
    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r,
                                        ngx_http_civicgate_status_admin_body);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


static void
ngx_http_civicgate_status_admin_body(ngx_http_request_t *r)
{
    json_t                          *record;
    ngx_int_t                        rc;
    ngx_http_civicgate_admin_ctx_t  *sctx;

    sctx = ngx_http_get_module_ctx(r, ngx_http_civicgate_status_admin_module);

    if (r->method == NGX_HTTP_PUT) {
        rc = ngx_http_civicgate_status_record(r, &record);

        if (rc != NGX_DECLINED) {
            ngx_http_finalize_request(r, rc);
            return;
        }

        rc = ngx_http_civicgate_json_dump(r->pool, record, 1, &sctx->record);
        json_decref(record);

        if (rc != NGX_OK) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
            return;
        }
    }

    rc = ngx_http_civicgate_status_store(r, sctx);

    if (rc != NGX_DONE) {
        ngx_http_finalize_request(r, rc);
    }
}


/*
 * The body as the record to store: NGX_DECLINED with the record, or the
 * code of the 400 (413) already sent.
 */

static ngx_int_t
ngx_http_civicgate_status_record(ngx_http_request_t *r, json_t **record)
{
    u_char       detail[128];
    json_t      *body;
    ngx_int_t    rc;
    const char  *error;

    *record = NULL;

    rc = ngx_http_civicgate_read_json(r, &body);

    if (rc != NGX_DECLINED) {
        return rc;
    }

    if (body == NULL) {
        return ngx_http_civicgate_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid-body",
                                        "The body must be a JSON object "
                                        "with a \"state\".");
    }

    *record = ngx_http_civicgate_status_body(body, detail, sizeof(detail),
                                             &error);
    json_decref(body);

    if (*record == NULL) {
        return ngx_http_civicgate_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid-body", error);
    }

    return NGX_DECLINED;
}


/*
 * The body, checked field by field: the record, or NULL with what is
 * wrong in error (in detail when it names a field).  No request: the
 * fuzz target calls it too.
 */

json_t *
ngx_http_civicgate_status_body(json_t *body, u_char *detail, size_t size,
    const char **error)
{
    json_t      *rec, *v;
    ngx_uint_t   i;
    const char  *key, *state;

    json_object_foreach(body, key, v) {
        if (ngx_strcmp(key, "state") != 0 && ngx_strcmp(key, "message") != 0
            && ngx_strcmp(key, "since") != 0 && ngx_strcmp(key, "until") != 0)
        {
            ngx_snprintf(detail, size - 1, "Unknown field \"%s\".%Z", key);
            detail[size - 1] = '\0';
            *error = (const char *) detail;
            return NULL;
        }
    }

    state = json_string_value(json_object_get(body, "state"));

    for (i = 0; ngx_http_civicgate_admin_states[i]; i++) {
        if (state && ngx_strcmp(state, ngx_http_civicgate_admin_states[i])
                     == 0)
        {
            break;
        }
    }

    if (ngx_http_civicgate_admin_states[i] == NULL) {
        *error = "\"state\" must be one of operational, degraded, outage, "
                 "maintenance.";
        return NULL;
    }

    rec = json_object();
    json_object_set_new(rec, "state", json_string(state));

    if (ngx_http_civicgate_record_message(body, rec, error) != NGX_OK
        || ngx_http_civicgate_record_times(body, rec, error) != NGX_OK)
    {
        json_decref(rec);
        return NULL;
    }

    return rec;
}


/* "message": {"id": "...", "en": "..."}, either or both, or null */

static ngx_int_t
ngx_http_civicgate_record_message(json_t *body, json_t *record,
    const char **error)
{
    json_t      *msg, *v, *out;
    const char  *key;

    msg = json_object_get(body, "message");

    if (msg == NULL || json_is_null(msg)) {
        json_object_set_new(record, "message", json_null());
        return NGX_OK;
    }

    if (!json_is_object(msg)) {
        *error = "\"message\" must be an object with \"id\" and/or \"en\".";
        return NGX_ERROR;
    }

    out = json_object();

    json_object_foreach(msg, key, v) {
        if ((ngx_strcmp(key, "id") != 0 && ngx_strcmp(key, "en") != 0)
            || !json_is_string(v))
        {
            *error = "\"message\" may hold only \"id\" and \"en\" strings.";
            json_decref(out);
            return NGX_ERROR;
        }

        if (json_string_length(v) > NGX_HTTP_CIVICGATE_MESSAGE_MAX) {
            *error = "A \"message\" text is longer than 1000 bytes.";
            json_decref(out);
            return NGX_ERROR;
        }

        json_object_set(out, key, v);
    }

    json_object_set_new(record, "message", json_object_size(out) ? out
                                                                 : json_null());
    if (json_object_size(out) == 0) {
        json_decref(out);
    }

    return NGX_OK;
}


/* "since" (default now) and "until" (optional), RFC 3339, in order */

static ngx_int_t
ngx_http_civicgate_record_times(json_t *body, json_t *record,
    const char **error)
{
    u_char   buf[NGX_HTTP_CIVICGATE_RFC3339_LEN];
    json_t  *v;
    int64_t  since, until;

    v = json_object_get(body, "since");
    since = ngx_time();

    if (v && !json_is_null(v)
        && (!json_is_string(v)
            || ngx_http_civicgate_rfc3339_parse(
                   (u_char *) json_string_value(v), json_string_length(v),
                   &since) != 0))
    {
        *error = "\"since\" must be an RFC 3339 date-time.";
        return NGX_ERROR;
    }

    ngx_http_civicgate_rfc3339_format(since, buf);
    json_object_set_new(record, "since",
                        json_stringn((char *) buf,
                                     NGX_HTTP_CIVICGATE_RFC3339_LEN));

    v = json_object_get(body, "until");

    if (v == NULL || json_is_null(v)) {
        json_object_set_new(record, "until", json_null());

    } else if (!json_is_string(v)
               || ngx_http_civicgate_rfc3339_parse(
                      (u_char *) json_string_value(v), json_string_length(v),
                      &until) != 0)
    {
        *error = "\"until\" must be an RFC 3339 date-time.";
        return NGX_ERROR;

    } else if (until < since) {
        *error = "\"until\" is before \"since\".";
        return NGX_ERROR;

    } else {
        ngx_http_civicgate_rfc3339_format(until, buf);
        json_object_set_new(record, "until",
                            json_stringn((char *) buf,
                                         NGX_HTTP_CIVICGATE_RFC3339_LEN));
    }

    return NGX_OK;
}


/*
 * With a signing key, every change has an official notice: the change's
 * service, state, message, time and ID as sorted, compact JSON, signed as
 * a compact JWS; its code is the first 50 bits of the signature.  The
 * change's ID is the gateway's (its time in ms), so that the notice can
 * be signed before the script stores both at once.
 */

static ngx_int_t
ngx_http_civicgate_status_notice(ngx_http_request_t *r,
    ngx_http_civicgate_admin_ctx_t *sctx)
{
    u_char                          *p, time[32];
    u_char                           id[NGX_HTTP_CIVICGATE_SID_LEN + 1];
    u_char                           sig[NGX_HTTP_CIVICGATE_ED25519_SIG];
    json_t                          *notice, *record, *message;
    ngx_int_t                        rc;
    ngx_str_t                        payload, jws;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    record = sctx->record.len
             ? json_loadb((char *) sctx->record.data, sctx->record.len, 0,
                          NULL)
             : json_pack("{s:s, s:n}", "state", "operational", "message");
    if (record == NULL) {
        return NGX_ERROR;
    }

    message = json_object_get(record, "message");
    p = ngx_http_civicgate_time_ms(time, sctx->sid.ms);
    id[ngx_http_civicgate_sid_format(id, &sctx->sid) - id] = '\0';

    notice = json_pack("{s:s%, s:O, s:O, s:s%, s:s}",
                       "service", (char *) sctx->name.data, sctx->name.len,
                       "state", json_object_get(record, "state"),
                       "message", message ? message : json_null(),
                       "time", (char *) time, (size_t) (p - time),
                       "sid", (char *) id);
    json_decref(record);

    rc = ngx_http_civicgate_json_dump(r->pool, notice, 1, &payload);

    if (rc == NGX_OK) {
        rc = ngx_http_civicgate_jws(r->pool, cgmcf->signing, &payload, &jws,
                                    sig);
    }

    if (rc == NGX_OK) {
        ngx_http_civicgate_notice_code(sig, sctx->code);

        json_object_set_new(notice, "code",
                            json_stringn((char *) sctx->code,
                                         NGX_HTTP_CIVICGATE_NOTICE_LEN));
        json_object_set_new(notice, "jws",
                            json_stringn((char *) jws.data, jws.len));

        rc = ngx_http_civicgate_json_dump(r->pool, notice, 1, &sctx->notice);
    }

    json_decref(notice);

    return rc;
}


static ngx_int_t
ngx_http_civicgate_status_store(ngx_http_request_t *r,
    ngx_http_civicgate_admin_ctx_t *sctx)
{
    u_char                            *p, history[NGX_INT_T_LEN];
    u_char                             id[NGX_HTTP_CIVICGATE_SID_LEN];
    size_t                             id_len;
    ngx_http_civicgate_ctx_t          *ctx;
    ngx_http_civicgate_main_conf_t    *cgmcf;
    ngx_http_civicgate_redis_args_t    a;
    ngx_http_civicgate_status_conf_t  *scf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    ctx = ngx_http_civicgate_get_ctx(r);

    scf = ngx_http_civicgate_status_conf();

    p = ngx_sprintf(history, "%ui", scf->history);
    id_len = 0;

    if (cgmcf->signing != NULL) {
        if (ngx_http_civicgate_status_notice(r, sctx) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        id_len = ngx_http_civicgate_sid_format(id, &sctx->sid) - id;
    }

    ngx_http_civicgate_redis_evalsha(&a, scf->change_script, "4");
    ngx_http_civicgate_redis_arg_str(&a,
                                     NGX_HTTP_CIVICGATE_KEY_STATUS_SERVICES);
    ngx_http_civicgate_redis_arg_str(&a,
                                     NGX_HTTP_CIVICGATE_KEY_STATUS_HISTORY);
    ngx_http_civicgate_redis_arg_str(&a,
                                     NGX_HTTP_CIVICGATE_KEY_STATUS_NOTICES);
    ngx_http_civicgate_redis_arg_str(&a,
                                   NGX_HTTP_CIVICGATE_KEY_STATUS_NOTICE_LIST);
    ngx_http_civicgate_redis_arg(&a, sctx->name.data, sctx->name.len);
    ngx_http_civicgate_redis_arg(&a, sctx->record.len ? sctx->record.data
                                                      : (u_char *) "",
                                 sctx->record.len);
    ngx_http_civicgate_redis_arg(&a, history, p - history);
    ngx_http_civicgate_redis_arg_str(&a, NGX_HTTP_CIVICGATE_KEY_STATUS_CHANGES);
    ngx_http_civicgate_redis_arg(&a, id, id_len);
    ngx_http_civicgate_redis_arg(&a, sctx->code,
                                 id_len ? NGX_HTTP_CIVICGATE_NOTICE_LEN : 0);
    ngx_http_civicgate_redis_arg(&a, sctx->notice.len ? sctx->notice.data
                                                      : (u_char *) "",
                                 sctx->notice.len);
    ngx_http_civicgate_redis_arg(&a, history, p - history);

    ctx->cmd = ngx_http_civicgate_redis_send(cgmcf->client, a.argc, a.argv,
                                             a.lens,
                                             ngx_http_civicgate_status_stored,
                                             r);
    if (ctx->cmd == NULL) {
        return ngx_http_civicgate_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "status-unavailable",
                                        "Redis cannot be reached now; "
                                        "nothing was changed.");
    }

    ngx_http_civicgate_wait(r);

    return NGX_DONE;
}


/*
 * {"retry", last ID}: another change came first, at or after the time
 * this one was signed for; signed again for just after it.  NGX_DONE
 * while stored again, NGX_DECLINED if this is not such an answer.
 */

static ngx_int_t
ngx_http_civicgate_status_retry(ngx_http_request_t *r,
    ngx_http_civicgate_admin_ctx_t *sctx, redisReply *reply)
{
    ngx_time_t                *tp;
    ngx_http_civicgate_sid_t   last;

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != 2
        || reply->element[1]->type != REDIS_REPLY_STRING
        || ngx_http_civicgate_sid_parse((u_char *) reply->element[1]->str,
                                        reply->element[1]->len, &last)
           != NGX_OK)
    {
        return NGX_DECLINED;
    }

    if (++sctx->tries >= NGX_HTTP_CIVICGATE_CHANGE_TRIES) {
        if (ngx_http_civicgate_log_due(&ngx_http_civicgate_admin_refused)) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "civicgate: a status change found its ID taken "
                          "%ui times", sctx->tries);
        }

        return NGX_DECLINED;
    }

    tp = ngx_timeofday();
    sctx->sid.ms = (uint64_t) tp->sec * 1000 + tp->msec;
    sctx->sid.seq = 0;

    if (sctx->sid.ms <= last.ms) {
        sctx->sid.ms = last.ms;
        sctx->sid.seq = last.seq + 1;
    }

    return ngx_http_civicgate_status_store(r, sctx);
}


static void
ngx_http_civicgate_status_stored(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    u_char                           time[32], *p;
    json_t                          *answer;
    ngx_int_t                        rc;
    ngx_http_civicgate_sid_t         sid;
    ngx_connection_t                *c;
    ngx_http_request_t              *r;
    ngx_http_civicgate_ctx_t        *ctx;
    ngx_http_civicgate_admin_ctx_t  *sctx;

    r = ngx_http_civicgate_answered(cmd, &ctx);
    if (r == NULL) {
        return;
    }

    sctx = ngx_http_get_module_ctx(r, ngx_http_civicgate_status_admin_module);
    c = r->connection;
    ngx_http_set_log_request(c->log, r);

    rc = ngx_http_civicgate_status_retry(r, sctx, reply);

    if (rc != NGX_DECLINED) {
        if (rc != NGX_DONE) {
            ngx_http_finalize_request(r, rc);
        }

        ngx_http_run_posted_requests(c);
        return;
    }

    answer = sctx->record.len
             ? json_loadb((char *) sctx->record.data, sctx->record.len, 0,
                          NULL)
             : json_pack("{s:s, s:n, s:n, s:n}", "state", "operational",
                         "message", "since", "until");

    if (reply == NULL || reply->type != REDIS_REPLY_STRING || answer == NULL
        || ngx_http_civicgate_sid_parse((u_char *) reply->str, reply->len,
                                        &sid)
           != NGX_OK)
    {
        ngx_http_civicgate_redis_refused(cmd->redis, reply,
                                         "a status change",
                                         &ngx_http_civicgate_admin_refused);

        json_decref(answer);
        rc = ngx_http_civicgate_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                      "status-unavailable",
                                      "Redis cannot be reached now; retry, "
                                      "the change may not have been stored.");

    } else {
        json_object_set_new(answer, "name",
                            json_stringn((char *) sctx->name.data,
                                         sctx->name.len));
        json_object_set_new(answer, "id", json_stringn(reply->str,
                                                       reply->len));
        json_object_set_new(answer, "notice",
                            sctx->notice.len
                            ? json_stringn((char *) sctx->code,
                                           NGX_HTTP_CIVICGATE_NOTICE_LEN)
                            : json_null());

        /* the change's time is its ID's, as in the status document */
        p = ngx_http_civicgate_time_ms(time, sid.ms);
        json_object_set_new(answer, "updated_at",
                            json_stringn((char *) time, p - time));

        /* this worker reads its own write at once; others on the message */
        (void) ngx_http_civicgate_status_apply(&sid, &sctx->name,
                                               &sctx->record);

        rc = ngx_http_civicgate_json_send(r, NGX_HTTP_OK,
                                          &ngx_http_civicgate_admin_type,
                                          answer);
    }

    ngx_http_finalize_request(r, rc);
    ngx_http_run_posted_requests(c);
}
