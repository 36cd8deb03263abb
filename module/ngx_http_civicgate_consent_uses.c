
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_consent.h"


/*
 * The citizen's data-use log: one list per citizen and month (UTC),
 * "cg:{c:PSEUDONYM}:uses:YYYYMM", newest first, each element
 * "TIME PURPOSE SERVICE CHANNEL JOURNEY".  Journey events write it; this
 * file reads it, a page at a time, newest first.
 */


#define NGX_HTTP_CIVICGATE_USES_LIMIT       50
#define NGX_HTTP_CIVICGATE_USES_LIMIT_MAX   200
#define NGX_HTTP_CIVICGATE_USES_KEY_LEN                                       \
    (sizeof("cg:{c:}:uses:YYYYMM") - 1 + NGX_HTTP_CIVICGATE_PSEUDONYM_LEN)
#define NGX_HTTP_CIVICGATE_USES_FIELDS      5


/* where a page starts: a month and a position counted from its oldest */
typedef struct {
    ngx_uint_t                          month;     /* YYYYMM */
    ngx_int_t                           pos;       /* -1: the newest */
    ngx_uint_t                          limit;
} ngx_http_civicgate_uses_page_t;


typedef struct {
    ngx_uint_t                         *months;    /* newest first */
    ngx_uint_t                          nmonths;
    int64_t                             oldest;    /* ms: older are gone */
} ngx_http_civicgate_uses_ctx_t;


static ngx_int_t ngx_http_civicgate_uses_args(ngx_http_request_t *r,
    ngx_http_civicgate_uses_page_t *page);
static ngx_int_t ngx_http_civicgate_uses_cursor(ngx_str_t *arg,
    ngx_http_civicgate_uses_page_t *page);
static ngx_int_t ngx_http_civicgate_uses_months(ngx_http_request_t *r,
    ngx_http_civicgate_uses_ctx_t *uctx, ngx_uint_t from);
static ngx_uint_t ngx_http_civicgate_uses_previous(ngx_uint_t month);
static ngx_int_t ngx_http_civicgate_uses_send(ngx_http_request_t *r,
    ngx_http_civicgate_uses_ctx_t *uctx, ngx_uint_t n, const char **argv,
    size_t *lens);
static void ngx_http_civicgate_uses_reply(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply);
static ngx_int_t ngx_http_civicgate_uses_answer(ngx_http_request_t *r,
    ngx_http_civicgate_uses_ctx_t *uctx, redisReply *reply);
static json_t *ngx_http_civicgate_uses_entry(ngx_http_request_t *r,
    redisReply *element, int64_t oldest);
static json_t *ngx_http_civicgate_uses_label(ngx_http_request_t *r,
    u_char *name, size_t len);
static json_t *ngx_http_civicgate_uses_next(ngx_http_civicgate_uses_ctx_t *uctx,
    redisReply *reply, ngx_uint_t stopped);


/*
 * KEYS: the month lists, newest first.  ARGV: the position to start at in
 * the first (from its oldest element; -1: its newest), how many.
 * Answers {elements, key index to go on with (0: none), position}.
 */
static const char  ngx_http_civicgate_uses_lua[] =
    "local p, n, out = tonumber(ARGV[1]), tonumber(ARGV[2]), {}\n"
    "for k = 1, #KEYS do\n"
    "  local len = redis.call('LLEN', KEYS[k])\n"
    "  local i = 0\n"
    "  if p >= 0 then i = math.max(len - 1 - p, 0) end\n"
    "  p = -1\n"
    "  if i < len then\n"
    "    local got = redis.call('LRANGE', KEYS[k], i, i + n - #out - 1)\n"
    "    for _, e in ipairs(got) do out[#out + 1] = e end\n"
    "    i = i + #got\n"
    "  end\n"
    "  if #out == n then\n"
    "    if i < len then return {out, k, len - 1 - i} end\n"
    "    if k < #KEYS then return {out, k + 1, -1} end\n"
    "    return {out, 0, -1}\n"
    "  end\n"
    "end\n"
    "return {out, 0, -1}\n";


static ngx_str_t  ngx_http_civicgate_uses_type =
    ngx_string("application/json");


ngx_int_t
ngx_http_civicgate_uses_init(ngx_conf_t *cf,
    ngx_http_civicgate_consent_conf_t *ccf,
    ngx_http_civicgate_redis_conf_t *redis)
{
    if (ccf->uses_retention == 0) {
        return NGX_OK;
    }

    ccf->uses_script = ngx_http_civicgate_redis_add_script(cf, redis,
                                                  ngx_http_civicgate_uses_lua);

    return ccf->uses_script ? NGX_OK : NGX_ERROR;
}


ngx_int_t
ngx_http_civicgate_uses_read(ngx_http_request_t *r, u_char *citizen)
{
    u_char                             *key, pos[NGX_INT_T_LEN],
                                        count[NGX_INT_T_LEN];
    size_t                             *lens;
    ngx_int_t                           rc;
    ngx_uint_t                          i, n;
    const char                        **argv;
    ngx_http_civicgate_uses_ctx_t      *uctx;
    ngx_http_civicgate_uses_page_t      page;
    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);

    if (ccf->uses_script == NULL) {
        return ngx_http_civicgate_error(r, NGX_HTTP_NOT_FOUND, "not-found",
                                        "The data-use log is off.");
    }

    rc = ngx_http_civicgate_uses_args(r, &page);
    if (rc != NGX_DECLINED) {
        return rc;
    }

    uctx = ngx_pcalloc(r->pool, sizeof(ngx_http_civicgate_uses_ctx_t));
    if (uctx == NULL
        || ngx_http_civicgate_uses_months(r, uctx, page.month) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    n = 3 + 1 + uctx->nmonths + 2;
    argv = ngx_palloc(r->pool, n * sizeof(char *));
    lens = ngx_palloc(r->pool, n * sizeof(size_t));
    key = ngx_palloc(r->pool,
                     uctx->nmonths * NGX_HTTP_CIVICGATE_USES_KEY_LEN
                     + NGX_INT_T_LEN);
    if (argv == NULL || lens == NULL || key == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    argv[0] = "EVALSHA";
    lens[0] = 7;
    argv[1] = (const char *) ccf->uses_script->sha;
    lens[1] = 40;
    argv[2] = (const char *) count;
    lens[2] = ngx_sprintf(count, "%ui", uctx->nmonths) - count;

    for (i = 0; i < uctx->nmonths; i++) {
        argv[3 + i] = (const char *) key;
        lens[3 + i] = ngx_http_civicgate_key_uses(key, citizen,
                                       NGX_HTTP_CIVICGATE_PSEUDONYM_LEN,
                                       uctx->months[i])
                      - key;
        key += lens[3 + i];
    }

    n = 3 + uctx->nmonths;
    argv[n] = (const char *) pos;
    lens[n++] = ngx_sprintf(pos, "%i", page.pos) - pos;
    argv[n] = (const char *) key;
    lens[n++] = ngx_sprintf(key, "%ui", page.limit) - key;

    return ngx_http_civicgate_uses_send(r, uctx, n, argv, lens);
}


static ngx_int_t
ngx_http_civicgate_uses_send(ngx_http_request_t *r,
    ngx_http_civicgate_uses_ctx_t *uctx, ngx_uint_t n, const char **argv,
    size_t *lens)
{
    ngx_http_civicgate_ctx_t        *ctx;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    ctx = ngx_http_civicgate_get_ctx(r);

    ctx->cmd = ngx_http_civicgate_redis_send(cgmcf->client, (int) n, argv,
                                             lens,
                                             ngx_http_civicgate_uses_reply, r);
    if (ctx->cmd == NULL) {
        return ngx_http_civicgate_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "consent-unavailable",
                                        "The data-use log cannot be reached "
                                        "now.");
    }

    ngx_http_set_ctx(r, uctx, ngx_http_civicgate_consent_module);
    ngx_http_civicgate_wait(r);

    return NGX_DONE;
}


/* ?limit=N&cursor=C: NGX_DECLINED, or a 400 sent */

static ngx_int_t
ngx_http_civicgate_uses_args(ngx_http_request_t *r,
    ngx_http_civicgate_uses_page_t *page)
{
    ngx_int_t  n;
    ngx_str_t  arg;

    page->month = ngx_http_civicgate_month_of((int64_t) ngx_time() * 1000);
    page->pos = -1;
    page->limit = NGX_HTTP_CIVICGATE_USES_LIMIT;

    if (ngx_http_arg(r, (u_char *) "limit", 5, &arg) == NGX_OK) {
        n = ngx_atoi(arg.data, arg.len);

        if (n < 1 || n > NGX_HTTP_CIVICGATE_USES_LIMIT_MAX) {
            return ngx_http_civicgate_error(r, NGX_HTTP_BAD_REQUEST,
                                            "invalid-limit",
                                            "limit must be a number from 1 "
                                            "to 200.");
        }

        page->limit = (ngx_uint_t) n;
    }

    if (ngx_http_arg(r, (u_char *) "cursor", 6, &arg) == NGX_OK
        && ngx_http_civicgate_uses_cursor(&arg, page) != NGX_OK)
    {
        return ngx_http_civicgate_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid-cursor",
                                        "cursor must be a \"next\" value "
                                        "of an earlier page.");
    }

    return NGX_DECLINED;
}


/* "YYYYMM" or "YYYYMM.POS", not after this month */

static ngx_int_t
ngx_http_civicgate_uses_cursor(ngx_str_t *arg,
    ngx_http_civicgate_uses_page_t *page)
{
    ngx_int_t  month, pos;

    if (arg->len < 6) {
        return NGX_ERROR;
    }

    month = ngx_atoi(arg->data, 6);
    pos = -1;

    if (arg->len > 6) {
        if (arg->data[6] != '.' || arg->len > 6 + NGX_INT32_LEN) {
            return NGX_ERROR;
        }

        pos = ngx_atoi(arg->data + 7, arg->len - 7);
        if (pos == NGX_ERROR) {
            return NGX_ERROR;
        }
    }

    if (month == NGX_ERROR || month % 100 < 1 || month % 100 > 12
        || (ngx_uint_t) month > page->month)
    {
        return NGX_ERROR;
    }

    page->month = (ngx_uint_t) month;
    page->pos = pos;

    return NGX_OK;
}


/* the months from "from" back to the oldest the retention keeps */

static ngx_int_t
ngx_http_civicgate_uses_months(ngx_http_request_t *r,
    ngx_http_civicgate_uses_ctx_t *uctx, ngx_uint_t from)
{
    ngx_uint_t                          m, last, n;
    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);

    uctx->oldest = ((int64_t) ngx_time() - ccf->uses_retention) * 1000;
    last = ngx_http_civicgate_month_of(uctx->oldest);

    n = 0;
    for (m = from; m >= last; m = ngx_http_civicgate_uses_previous(m)) {
        n++;
    }

    uctx->months = ngx_palloc(r->pool, (n + 1) * sizeof(ngx_uint_t));
    if (uctx->months == NULL) {
        return NGX_ERROR;
    }

    for (m = from; m >= last; m = ngx_http_civicgate_uses_previous(m)) {
        uctx->months[uctx->nmonths++] = m;
    }

    /* a cursor older than the retention: one month, found empty */
    if (uctx->nmonths == 0) {
        uctx->months[uctx->nmonths++] = from;
    }

    return NGX_OK;
}


static ngx_uint_t
ngx_http_civicgate_uses_previous(ngx_uint_t month)
{
    return month % 100 == 1 ? month - 100 + 11 : month - 1;
}


static void
ngx_http_civicgate_uses_reply(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_int_t                       rc;
    ngx_connection_t               *c;
    ngx_http_request_t             *r;
    ngx_http_civicgate_ctx_t       *ctx;
    ngx_http_civicgate_uses_ctx_t  *uctx;

    static ngx_http_civicgate_log_limit_t  refused;

    r = ngx_http_civicgate_answered(cmd, &ctx);
    if (r == NULL) {
        return;
    }

    uctx = ngx_http_get_module_ctx(r, ngx_http_civicgate_consent_module);

    c = r->connection;
    ngx_http_set_log_request(c->log, r);

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != 3
        || reply->element[0]->type != REDIS_REPLY_ARRAY)
    {
        ngx_http_civicgate_redis_refused(cmd->redis, reply,
                                         "a data-use log read", &refused);

        rc = ngx_http_civicgate_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                      "consent-unavailable",
                                      "The data-use log cannot be reached "
                                      "now.");

    } else {
        rc = ngx_http_civicgate_uses_answer(r, uctx, reply);
    }

    ngx_http_finalize_request(r, rc);
    ngx_http_run_posted_requests(c);
}


/* {"uses": [...], "next": cursor or null} */

static ngx_int_t
ngx_http_civicgate_uses_answer(ngx_http_request_t *r,
    ngx_http_civicgate_uses_ctx_t *uctx, redisReply *reply)
{
    json_t      *list, *entry, *doc;
    ngx_str_t    out;
    ngx_uint_t   i, stopped;
    redisReply  *elements;

    elements = reply->element[0];
    list = json_array();
    stopped = 0;

    for (i = 0; list && i < elements->elements; i++) {
        entry = ngx_http_civicgate_uses_entry(r, elements->element[i],
                                              uctx->oldest);
        if (entry == NULL) {
            /* older than the retention: so is every one after it */
            stopped = 1;
            break;
        }

        if (json_is_null(entry)) {
            continue;
        }

        json_array_append_new(list, entry);
    }

    doc = json_pack("{s:o, s:o}", "uses", list,
                    "next", ngx_http_civicgate_uses_next(uctx, reply,
                                                         stopped));

    if (ngx_http_civicgate_json_dump(r->pool, doc, 0, &out) != NGX_OK) {
        json_decref(doc);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    json_decref(doc);

    r->headers_out.last_modified_time = -1;

    return ngx_http_civicgate_send(r, NGX_HTTP_OK,
                                   &ngx_http_civicgate_uses_type, &out);
}


/* one element, "TIME PURPOSE SERVICE CHANNEL JOURNEY"; NULL: too old */

static json_t *
ngx_http_civicgate_uses_entry(ngx_http_request_t *r, redisReply *element,
    int64_t oldest)
{
    u_char      *p, *end, *f[NGX_HTTP_CIVICGATE_USES_FIELDS];
    u_char       when[sizeof("2026-12-06T23:30:00.123Z")];
    size_t       l[NGX_HTTP_CIVICGATE_USES_FIELDS];
    int64_t      ms;
    ngx_tm_t     tm;
    ngx_uint_t   i;

    if (element->type != REDIS_REPLY_STRING) {
        return json_null();
    }

    p = (u_char *) element->str;
    end = p + element->len;

    for (i = 0; i < NGX_HTTP_CIVICGATE_USES_FIELDS; i++) {
        f[i] = p;

        while (p < end && *p != ' ') {
            p++;
        }

        l[i] = p - f[i];
        p += (p < end);
    }

    ms = ngx_atoof(f[0], l[0]);

    if (ms == NGX_ERROR || ms < oldest) {
        return NULL;
    }

    ngx_gmtime((time_t) (ms / 1000), &tm);
    (void) ngx_sprintf(when, "%4d-%02d-%02dT%02d:%02d:%02d.%03dZ%Z",
                       tm.ngx_tm_year, tm.ngx_tm_mon, tm.ngx_tm_mday,
                       tm.ngx_tm_hour, tm.ngx_tm_min, tm.ngx_tm_sec,
                       (int) (ms % 1000));

    return json_pack("{s:s, s:s%, s:o, s:s%, s:s%, s:s%}",
                     "time", when,
                     "purpose", f[1], l[1],
                     "label", ngx_http_civicgate_uses_label(r, f[1], l[1]),
                     "service", f[2], l[2],
                     "channel", f[3], l[3],
                     "journey", f[4], l[4]);
}


/* the purpose's names in both languages; null for one no longer known */

static json_t *
ngx_http_civicgate_uses_label(ngx_http_request_t *r, u_char *name,
    size_t len)
{
    ngx_uint_t                          i;
    ngx_http_civicgate_purpose_t       *p;
    ngx_http_civicgate_consent_conf_t  *ccf;

    ccf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_consent_module);
    p = ccf->purposes.elts;

    for (i = 0; i < ccf->purposes.nelts; i++) {
        if (p[i].name.len == len && ngx_strncmp(p[i].name.data, name, len)
                                    == 0)
        {
            return json_pack("{s:s%, s:s%}",
                             "id", p[i].label_id.data, p[i].label_id.len,
                             "en", p[i].label_en.data, p[i].label_en.len);
        }
    }

    return json_null();
}


static json_t *
ngx_http_civicgate_uses_next(ngx_http_civicgate_uses_ctx_t *uctx,
    redisReply *reply, ngx_uint_t stopped)
{
    u_char      buf[NGX_INT_T_LEN * 2 + 2], *p;
    long long   k, pos;

    if (stopped
        || reply->element[1]->type != REDIS_REPLY_INTEGER
        || reply->element[2]->type != REDIS_REPLY_INTEGER)
    {
        return json_null();
    }

    k = reply->element[1]->integer;
    pos = reply->element[2]->integer;

    if (k < 1 || (ngx_uint_t) k > uctx->nmonths) {
        return json_null();
    }

    p = ngx_sprintf(buf, "%06ui", uctx->months[k - 1]);

    if (pos >= 0) {
        p = ngx_sprintf(p, ".%L", (int64_t) pos);
    }

    return json_stringn((char *) buf, p - buf);
}
