
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_status.h"
#include "ngx_http_civicgate_json.h"
#include "ngx_http_civicgate_metrics.h"


/*
 * Streaming and waiting clients.  A topic keeps a ring of its recent
 * changes, each formatted once per language; a client remembers the last
 * change it was sent and copies the next ones into its own buffer only
 * when the previous write is done, so its memory stays fixed however many
 * changes go by.  A client that falls a whole ring behind is closed: it
 * reconnects and resumes from the history in Redis.
 */


static void ngx_http_civicgate_client_cleanup(void *data);
static void ngx_http_civicgate_client_read(ngx_event_t *rev);
static void ngx_http_civicgate_client_write(ngx_http_request_t *r);
static void ngx_http_civicgate_client_timer(ngx_event_t *ev);
static void ngx_http_civicgate_sse_pump(ngx_http_civicgate_client_t *cl);
static void ngx_http_civicgate_sse_wait_write(ngx_http_civicgate_client_t *cl);
static void ngx_http_civicgate_sse_reset(ngx_http_civicgate_client_t *cl);


static ngx_str_t  ngx_http_civicgate_last_event_id_name =
    ngx_string("Last-Event-ID");

static ngx_str_t  ngx_http_civicgate_sse_type =
    ngx_string("text/event-stream; charset=utf-8");

static ngx_str_t  ngx_http_civicgate_json_type =
    ngx_string("application/json");

/* this worker's streams and long-polls, and how many it takes */
static ngx_uint_t  ngx_http_civicgate_clients_n;
static ngx_uint_t  ngx_http_civicgate_clients_max = NGX_MAX_UINT32_VALUE;
static ngx_http_civicgate_log_limit_t  ngx_http_civicgate_clients_refused;


ngx_int_t
ngx_http_civicgate_sid_parse(const u_char *p, size_t len,
    ngx_http_civicgate_sid_t *sid)
{
    const u_char  *dash, *end;

    end = p + len;
    dash = ngx_strlchr((u_char *) p, (u_char *) end, '-');

    if (dash == NULL || dash == p || dash + 1 == end
        || dash - p > 19 || end - dash - 1 > 19)
    {
        return NGX_ERROR;
    }

    sid->ms = 0;
    sid->seq = 0;

    for ( /* void */ ; p < dash; p++) {
        if (*p < '0' || *p > '9') {
            return NGX_ERROR;
        }
        sid->ms = sid->ms * 10 + (*p - '0');
    }

    for (p = dash + 1; p < end; p++) {
        if (*p < '0' || *p > '9') {
            return NGX_ERROR;
        }
        sid->seq = sid->seq * 10 + (*p - '0');
    }

    return NGX_OK;
}


u_char *
ngx_http_civicgate_sid_format(u_char *p, ngx_http_civicgate_sid_t *sid)
{
    return ngx_sprintf(p, "%uL-%uL", sid->ms, sid->seq);
}


ngx_int_t
ngx_http_civicgate_sid_cmp(ngx_http_civicgate_sid_t *a,
    ngx_http_civicgate_sid_t *b)
{
    if (a->ms != b->ms) {
        return a->ms < b->ms ? -1 : 1;
    }

    if (a->seq != b->seq) {
        return a->seq < b->seq ? -1 : 1;
    }

    return 0;
}


/* RFC 3339 with milliseconds: "2026-11-29T22:13:49.123Z" */

u_char *
ngx_http_civicgate_time_ms(u_char *p, uint64_t ms)
{
    ngx_http_civicgate_rfc3339_format((int64_t) (ms / 1000), p);
    p += NGX_HTTP_CIVICGATE_RFC3339_LEN - 1;

    return ngx_sprintf(p, ".%03uLZ", ms % 1000);
}


/* the next slot of the ring; its old texts are freed */

ngx_http_civicgate_change_t *
ngx_http_civicgate_topic_push(ngx_http_civicgate_topic_t *t,
    ngx_http_civicgate_sid_t *sid)
{
    ngx_uint_t                    i;
    ngx_http_civicgate_change_t  *ch;

    t->seq++;
    ch = &t->ring[t->seq % t->ring_size];

    for (i = 0; i < NGX_HTTP_CIVICGATE_LANGS; i++) {
        if (ch->text[i].data) {
            ngx_free(ch->text[i].data);
            ch->text[i].data = NULL;
            ch->text[i].len = 0;
        }
    }

    ch->seq = t->seq;
    ch->sid = *sid;
    ch->force = 0;

    if (t->nchanges < t->ring_size) {
        t->nchanges++;
    }

    if (ngx_http_civicgate_sid_cmp(sid, &t->version) > 0) {
        t->version = *sid;
    }

    return ch;
}


/*
 * "event: E\nid: ID\ndata: JSON\n\n", formatted once for every client, from
 * a JSON value or from JSON text (a status document rendered already).
 */

ngx_int_t
ngx_http_civicgate_change_text(ngx_http_civicgate_change_t *ch,
    ngx_uint_t lang, const char *event, json_t *data, ngx_str_t *raw)
{
    u_char  *p;
    size_t   len, n;

    if (raw) {
        n = raw->len;

        /* a rendered document ends with a newline: an event line cannot */
        while (n && raw->data[n - 1] == '\n') {
            n--;
        }

    } else {
        n = json_dumpb(data, NULL, 0, JSON_COMPACT);
    }

    len = sizeof("event: \nid: \ndata: \n\n") - 1 + ngx_strlen(event)
          + NGX_HTTP_CIVICGATE_SID_LEN + n;

    p = ngx_alloc(len, ngx_cycle->log);
    if (p == NULL) {
        return NGX_ERROR;
    }

    ch->text[lang].data = p;

    p = ngx_sprintf(p, "event: %s\nid: ", event);
    p = ngx_http_civicgate_sid_format(p, &ch->sid);
    p = ngx_cpymem(p, "\ndata: ", 7);

    if (raw) {
        p = ngx_cpymem(p, raw->data, n);

    } else {
        p += json_dumpb(data, (char *) p, n, JSON_COMPACT);
    }

    *p++ = '\n';
    *p++ = '\n';

    ch->text[lang].len = p - ch->text[lang].data;

    return NGX_OK;
}


void
ngx_http_civicgate_topic_notify(ngx_http_civicgate_topic_t *t)
{
    ngx_queue_t                  *q, *next;
    ngx_http_civicgate_client_t  *cl;

    /* a client that ends here may be a journey's last: it is freed after */
    t->busy++;

    for (q = ngx_queue_head(&t->clients);
         q != ngx_queue_sentinel(&t->clients);
         q = next)
    {
        next = ngx_queue_next(q);
        cl = ngx_queue_data(q, ngx_http_civicgate_client_t, queue);

        cl->notify(cl);
    }

    t->busy--;

    if (t->release) {
        t->release(t);
    }
}


void
ngx_http_civicgate_clients_init(ngx_uint_t max)
{
    ngx_http_civicgate_clients_max = max;
}


/*
 * Each stream or long-poll holds a connection for long: past the cap the
 * worker takes no more, so that ordinary requests still find room.
 */

ngx_uint_t
ngx_http_civicgate_clients_full(void)
{
    return ngx_http_civicgate_clients_n >= ngx_http_civicgate_clients_max;
}


ngx_int_t
ngx_http_civicgate_client_refuse(ngx_http_request_t *r)
{
    ngx_table_elt_t  *h;

    if (ngx_http_civicgate_log_due(&ngx_http_civicgate_clients_refused)) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "civicgate: %ui status clients on this worker, more "
                      "are refused (logged once every 10 s)",
                      ngx_http_civicgate_clients_n);
    }

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Retry-After");
    ngx_str_set(&h->value, NGX_HTTP_CIVICGATE_CLIENTS_RETRY);

    return ngx_http_civicgate_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                    "too-many-clients",
                                    "Too many clients are waiting for "
                                    "changes here; retry later.");
}


/*
 * The request is held (count) until the client is finished.  The read
 * handler is the connection's own, so that a graceful shutdown, which
 * closes idle connections, ends a stream cleanly instead of cutting it.
 */

ngx_http_civicgate_client_t *
ngx_http_civicgate_client_create(ngx_http_request_t *r,
    ngx_http_civicgate_topic_t *t, ngx_uint_t hold)
{
    ngx_connection_t             *c;
    ngx_pool_cleanup_t           *cln;
    ngx_http_civicgate_client_t  *cl;

    cl = ngx_pcalloc(r->pool, sizeof(ngx_http_civicgate_client_t));
    cln = ngx_pool_cleanup_add(r->pool, 0);

    if (cl == NULL || cln == NULL) {
        return NULL;
    }

    c = r->connection;

    cl->request = r;
    cl->topic = t;

    if (t) {
        t->refs++;
    }
    cl->read_handler = c->read->handler;

    cl->timer.handler = ngx_http_civicgate_client_timer;
    cl->timer.data = cl;
    cl->timer.log = c->log;
    cl->timer.cancelable = 1;

    cln->handler = ngx_http_civicgate_client_cleanup;
    cln->data = cl;

    ngx_http_set_ctx(r, cl, ngx_http_civicgate_status_module);

    if (hold) {
        cl->held = 1;
        ngx_http_civicgate_clients_n++;
    }

    r->main->count++;
    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_request_empty_handler;

    c->read->handler = ngx_http_civicgate_client_read;
    c->idle = 1;

    /*
     * A worker shutting down closed its idle connections when it began:
     * a client that comes later is ended the same way once answered, so
     * that it goes to a new worker and its socket is not left at exit.
     */
    if (ngx_exiting) {
        c->close = 1;
        ngx_post_event(c->read, &ngx_posted_events);
    }

    return cl;
}


static void
ngx_http_civicgate_client_cleanup(void *data)
{
    ngx_http_civicgate_client_t *cl = data;

    ngx_http_civicgate_client_pt  gone;

    if (cl->queued) {
        ngx_queue_remove(&cl->queue);
        cl->queued = 0;
    }

    if (cl->timer.timer_set) {
        ngx_del_timer(&cl->timer);
    }

    if (cl->cmd) {
        ngx_http_civicgate_redis_detach(cl->cmd);
        cl->cmd = NULL;
    }

    if (cl->counted) {
        ngx_http_civicgate_status_count(cl, -1);
        cl->counted = 0;
    }

    if (cl->held) {
        ngx_http_civicgate_clients_n--;
        cl->held = 0;
    }

    if (cl->gone) {
        gone = cl->gone;
        cl->gone = NULL;
        gone(cl);
    }
}


/* the connection's read event: a client gone, or the worker shutting down */

static void
ngx_http_civicgate_client_read(ngx_event_t *rev)
{
    ngx_connection_t             *c;
    ngx_http_request_t           *r;
    ngx_http_civicgate_client_t  *cl;

    c = rev->data;
    r = c->data;

    ngx_http_set_log_request(c->log, r);

    cl = ngx_http_get_module_ctx(r, ngx_http_civicgate_status_module);

    if (cl == NULL) {
        r->read_event_handler(r);
        ngx_http_run_posted_requests(c);
        return;
    }

    if (cl->done) {
        /* finalized, still writing: as the connection's own handler does */
        c->read->handler = cl->read_handler;
        c->read->handler(rev);
        return;
    }

    if (c->close) {
        c->close = 0;

        if (!cl->sse && cl->deadline) {
            /* a long-poll still reading: answered as at its deadline */
            cl->deadline(cl);
            return;
        }

        ngx_http_civicgate_client_finish(cl, cl->sse ? NGX_OK
                                                     : NGX_HTTP_NOT_MODIFIED);
        return;
    }

    r->read_event_handler(r);
    ngx_http_run_posted_requests(c);
}


/* long-poll: wait at most this long; streams: heartbeat this often */

void
ngx_http_civicgate_client_wait(ngx_http_civicgate_client_t *cl,
    ngx_msec_t wait)
{
    if (!cl->queued) {
        ngx_queue_insert_tail(&cl->topic->clients, &cl->queue);
        cl->queued = 1;
    }

    if (!cl->counted) {
        ngx_http_civicgate_status_count(cl, 1);
        cl->counted = 1;
    }

    cl->wait = wait;

    /* a long-poll's deadline may already run, from the request's start */
    if (!cl->timer.timer_set) {
        ngx_add_timer(&cl->timer, wait);
    }
}


static void
ngx_http_civicgate_client_timer(ngx_event_t *ev)
{
    ngx_http_civicgate_client_t *cl = ev->data;

    ngx_http_civicgate_client_pt  handler;

    ngx_http_set_log_request(cl->request->connection->log, cl->request);

    if (cl->deadline) {
        handler = cl->deadline;
        cl->deadline = NULL;
        handler(cl);
        return;
    }

    if (!cl->sse) {
        ngx_http_civicgate_client_finish(cl, NGX_HTTP_NOT_MODIFIED);
        return;
    }

    if (!cl->request->connection->buffered) {
        ngx_http_civicgate_sse_reset(cl);

        if (ngx_http_civicgate_sse_append(cl, (u_char *) ": heartbeat\n\n",
                                          13, 0)
            == NGX_OK)
        {
            ngx_http_civicgate_sse_flush(cl);
        }
    }

    if (!cl->done) {
        ngx_add_timer(&cl->timer, cl->wait);
    }
}


/*
 * Ends a waiting or streaming client: a long-poll with its answer (or a
 * 304), a stream with its last chunk.
 */

void
ngx_http_civicgate_client_finish(ngx_http_civicgate_client_t *cl,
    ngx_int_t rc)
{
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    if (cl->done) {
        return;
    }

    r = cl->request;
    c = r->connection;

    cl->done = 1;
    c->idle = 0;
    c->read->handler = cl->read_handler;

    ngx_http_civicgate_client_cleanup(cl);

    if (cl->sse && rc == NGX_OK) {
        r->keepalive = 0;
        rc = ngx_http_send_special(r, NGX_HTTP_LAST);

    } else if (rc == NGX_HTTP_NOT_MODIFIED) {
        rc = ngx_http_civicgate_send_etag(r, NULL, &cl->etag, cl->lang);
    }

    ngx_http_finalize_request(r, rc);
    ngx_http_run_posted_requests(c);
}


/* response headers and the "retry" field; events follow */

ngx_int_t
ngx_http_civicgate_sse_start(ngx_http_civicgate_client_t *cl)
{
    ngx_int_t            rc;
    ngx_table_elt_t     *h;
    ngx_http_request_t  *r;

    r = cl->request;
    cl->sse = 1;

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_type = ngx_http_civicgate_sse_type;
    r->headers_out.content_type_len = ngx_http_civicgate_sse_type.len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n = -1;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, "no-cache");

    /* a proxy in front must pass each event on at once */
    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "X-Accel-Buffering");
    ngx_str_set(&h->value, "no");

    r->keepalive = 0;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return NGX_ERROR;
    }

    r->write_event_handler = ngx_http_civicgate_client_write;

    return ngx_http_civicgate_sse_append(cl, (u_char *) "retry: 2000\n\n",
                                         13, 0);
}


/* one event into the client's buffer, outside the ring (snapshots) */

ngx_int_t
ngx_http_civicgate_sse_event(ngx_http_civicgate_client_t *cl,
    const char *event, ngx_http_civicgate_sid_t *sid, json_t *data,
    ngx_str_t *raw)
{
    ngx_int_t                    rc;
    ngx_http_civicgate_change_t  ch;

    ngx_memzero(&ch, sizeof(ngx_http_civicgate_change_t));
    ch.sid = *sid;

    if (ngx_http_civicgate_change_text(&ch, 0, event, data, raw) != NGX_OK) {
        return NGX_ERROR;
    }

    rc = ngx_http_civicgate_sse_append(cl, ch.text[0].data, ch.text[0].len,
                                       1);
    ngx_free(ch.text[0].data);

    if (ngx_http_civicgate_sid_cmp(sid, &cl->last) > 0) {
        cl->last = *sid;
    }

    return rc;
}


/*
 * Appends to the buffer, which is not in flight when this is called.  It
 * grows for a change larger than itself, or when told to (what a resumed
 * client missed); otherwise a change that does not fit waits for the next
 * write, so that a steady stream needs no more memory.
 */

ngx_int_t
ngx_http_civicgate_sse_append(ngx_http_civicgate_client_t *cl, u_char *data,
    size_t len, ngx_uint_t grow)
{
    size_t      size, used;
    u_char     *p;
    ngx_buf_t  *b;

    b = &cl->buf;

    if ((size_t) (b->end - b->last) >= len) {
        b->last = ngx_cpymem(b->last, data, len);
        return NGX_OK;
    }

    used = b->last - b->pos;

    if (used && !grow) {
        return NGX_DECLINED;
    }

    size = ngx_max(ngx_max(used + len, 2 * cl->size), 1024);

    p = ngx_palloc(cl->request->pool, size);
    if (p == NULL) {
        return NGX_ERROR;
    }

    /* the first buffer: nothing to copy from b->pos, which is NULL */
    if (used) {
        p = ngx_cpymem(p, b->pos, used);
    }

    if (b->start) {
        (void) ngx_pfree(cl->request->pool, b->start);
    }

    cl->size = size;
    b->start = p - used;
    b->pos = b->start;
    b->end = b->start + size;
    b->last = ngx_cpymem(p, data, len);

    return NGX_OK;
}


ngx_int_t
ngx_http_civicgate_last_event_id(ngx_http_request_t *r,
    ngx_http_civicgate_sid_t *sid)
{
    ngx_table_elt_t  *h;

    h = ngx_http_civicgate_find_header(r,
                                       &ngx_http_civicgate_last_event_id_name);
    if (h == NULL) {
        return NGX_DECLINED;
    }

    return ngx_http_civicgate_sid_parse(h->value.data, h->value.len, sid);
}


/* what was written is sent: the buffer starts over (unsent text stays) */

static void
ngx_http_civicgate_sse_reset(ngx_http_civicgate_client_t *cl)
{
    if (cl->buf.pos == cl->buf.last) {
        cl->buf.pos = cl->buf.start;
        cl->buf.last = cl->buf.start;
    }
}


void
ngx_http_civicgate_sse_flush(ngx_http_civicgate_client_t *cl)
{
    ngx_int_t            rc;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = cl->request;
    c = r->connection;

    if (cl->buf.last == cl->buf.pos) {
        return;
    }

    cl->buf.memory = 1;
    cl->buf.flush = 1;
    cl->out.buf = &cl->buf;
    cl->out.next = NULL;

    rc = ngx_http_output_filter(r, &cl->out);

    if (rc == NGX_ERROR) {
        c->error = 1;
        ngx_http_civicgate_client_finish(cl, NGX_ERROR);
        return;
    }

    if (c->buffered) {
        ngx_http_civicgate_sse_wait_write(cl);
    }
}


/* the rest goes out when the client reads, or it times out as nginx does */

static void
ngx_http_civicgate_sse_wait_write(ngx_http_civicgate_client_t *cl)
{
    ngx_connection_t          *c;
    ngx_http_core_loc_conf_t  *clcf;

    c = cl->request->connection;
    clcf = ngx_http_get_module_loc_conf(cl->request, ngx_http_core_module);

    if (!c->write->delayed) {
        ngx_add_timer(c->write, clcf->send_timeout);
    }

    if (ngx_handle_write_event(c->write, clcf->send_lowat) != NGX_OK) {
        ngx_http_civicgate_client_finish(cl, NGX_ERROR);
    }
}


static void
ngx_http_civicgate_client_write(ngx_http_request_t *r)
{
    ngx_event_t                  *wev;
    ngx_http_civicgate_client_t  *cl;

    cl = ngx_http_get_module_ctx(r, ngx_http_civicgate_status_module);
    wev = r->connection->write;

    if (wev->timedout) {
        r->connection->timedout = 1;
        ngx_http_civicgate_client_finish(cl, NGX_ERROR);
        return;
    }

    if (wev->timer_set) {
        ngx_del_timer(wev);
    }

    if (ngx_http_output_filter(r, NULL) == NGX_ERROR) {
        ngx_http_civicgate_client_finish(cl, NGX_ERROR);
        return;
    }

    if (r->connection->buffered) {
        ngx_http_civicgate_sse_wait_write(cl);
        return;
    }

    ngx_http_civicgate_sse_pump(cl);
}


/* a stream client's notify: the changes it has not been sent yet */

void
ngx_http_civicgate_sse_notify(ngx_http_civicgate_client_t *cl)
{
    if (!cl->request->connection->buffered) {
        ngx_http_civicgate_sse_pump(cl);
    }
}


static void
ngx_http_civicgate_sse_pump(ngx_http_civicgate_client_t *cl)
{
    ngx_int_t                     rc;
    ngx_str_t                    *text;
    ngx_uint_t                    next;
    ngx_http_civicgate_topic_t   *t;
    ngx_http_civicgate_change_t  *ch;

    t = cl->topic;

    ngx_http_civicgate_sse_reset(cl);

    while (cl->seq < t->seq) {
        next = cl->seq + 1;

        if (t->seq - next >= t->nchanges) {
            ngx_log_error(NGX_LOG_INFO, cl->request->connection->log, 0,
                          "civicgate: stream client too slow, closed");
            ngx_http_civicgate_client_finish(cl, NGX_OK);
            return;
        }

        ch = &t->ring[next % t->ring_size];

        if (!ch->force && ngx_http_civicgate_sid_cmp(&ch->sid, &cl->last) <= 0)
        {
            cl->seq = next;
            continue;
        }

        text = ch->text[cl->lang].data ? &ch->text[cl->lang] : &ch->text[0];

        rc = ngx_http_civicgate_sse_append(cl, text->data, text->len, 0);

        if (rc == NGX_DECLINED) {
            break;
        }

        if (rc != NGX_OK) {
            ngx_http_civicgate_client_finish(cl, NGX_ERROR);
            return;
        }

        cl->seq = next;

        if (ngx_http_civicgate_sid_cmp(&ch->sid, &cl->last) > 0) {
            cl->last = ch->sid;
        }
    }

    ngx_http_civicgate_sse_flush(cl);
}


/* If-None-Match: a list of entity tags, or "*" */

ngx_int_t
ngx_http_civicgate_etag_matches(ngx_http_request_t *r, ngx_str_t *etag)
{
    u_char           *p, *end, *start;
    ngx_table_elt_t  *inm;

    inm = r->headers_in.if_none_match;

    if (inm == NULL || etag->len == 0) {
        return 0;
    }

    p = inm->value.data;
    end = p + inm->value.len;

    while (p < end) {
        while (p < end && (*p == ' ' || *p == ',' || *p == '\t')) {
            p++;
        }

        if (p < end && *p == '*') {
            return 1;
        }

        if (end - p > 2 && p[0] == 'W' && p[1] == '/') {
            p += 2;
        }

        start = p;

        while (p < end && *p != ',') {
            p++;
        }

        while (p > start && (p[-1] == ' ' || p[-1] == '\t')) {
            p--;
        }

        if ((size_t) (p - start) == etag->len
            && ngx_strncmp(start, etag->data, etag->len) == 0)
        {
            return 1;
        }

        while (p < end && *p != ',') {
            p++;
        }
    }

    return 0;
}


/* a JSON answer with its ETag; 304 without a body when body is NULL */

ngx_int_t
ngx_http_civicgate_send_etag(ngx_http_request_t *r, ngx_str_t *body,
    ngx_str_t *etag, ngx_uint_t lang)
{
    return ngx_http_civicgate_send_typed(r, body, etag, lang,
                                         &ngx_http_civicgate_json_type);
}


/* a status document as JSON or as another type (a JWS of it) */

ngx_int_t
ngx_http_civicgate_send_typed(ngx_http_request_t *r, ngx_str_t *body,
    ngx_str_t *etag, ngx_uint_t lang, ngx_str_t *type)
{
    ngx_table_elt_t  *h;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "ETag");
    h->value = *etag;
    r->headers_out.etag = h;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, "no-cache");

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* Accept: application/jose asks for the same document as a JWS */
    h->hash = 1;
    ngx_str_set(&h->key, "Vary");
    ngx_str_set(&h->value, "Accept-Language, Accept");

    if (lang != NGX_HTTP_CIVICGATE_LANG_ALL) {
        h = ngx_http_civicgate_push_header(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "Content-Language");

        if (lang == NGX_HTTP_CIVICGATE_LANG_ID) {
            ngx_str_set(&h->value, "id");
        } else {
            ngx_str_set(&h->value, "en");
        }
    }

    if (body == NULL) {
        r->headers_out.status = NGX_HTTP_NOT_MODIFIED;
        r->header_only = 1;
        r->headers_out.content_length_n = -1;

        return ngx_http_send_header(r);
    }

    return ngx_http_civicgate_send(r, NGX_HTTP_OK, type, body);
}


/* the gauge of status clients, by kind */

void
ngx_http_civicgate_status_count(ngx_http_civicgate_client_t *cl, ngx_int_t n)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(cl->request,
                                          ngx_http_civicgate_module);

    ngx_http_civicgate_metrics_add(cgmcf->metrics,
                                   cgmcf->metrics->status_clients,
                                   cl->sse ? 0 : 1, n);
}


ngx_msec_t
ngx_http_civicgate_heartbeat(ngx_http_civicgate_client_t *cl)
{
    ngx_http_civicgate_status_loc_conf_t  *cglcf;

    cglcf = ngx_http_get_module_loc_conf(cl->request,
                                         ngx_http_civicgate_status_module);

    return cglcf->status_heartbeat;
}
