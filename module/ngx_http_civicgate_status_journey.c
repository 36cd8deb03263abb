
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_status.h"
#include "ngx_http_civicgate_json.h"
#include "ngx_http_civicgate_events.h"


/*
 * Journey timelines.  The steps are the journey's events in Redis; a
 * worker subscribes to a journey's steps only while some client follows
 * it, and a client's first read waits for that subscription, so that no
 * step falls between what it read and what it is sent.
 *
 * A step may reach a worker twice, and in either order: in a client's
 * read and in its publication, which can come late.  The topic's ring
 * takes every published step newer than the ring's newest, whatever the
 * clients have read; each client skips the steps up to the last one it
 * was sent, so one client's read never takes a step from another.
 */


#define NGX_HTTP_CIVICGATE_JOURNEY_RING  16

/*
 * A followed journey stays in the watch registry this long (ms) after its
 * follower last said so; a worker says so again every WATCH_EVERY.
 */
#define NGX_HTTP_CIVICGATE_WATCH_TTL     90000
#define NGX_HTTP_CIVICGATE_WATCH_EVERY   30000
#define NGX_HTTP_CIVICGATE_WATCH_MAX     256     /* journeys per command */


/* a followed journey, by the shard whose registry holds it */
typedef struct {
    ngx_uint_t                     shard;
    ngx_str_t                     *jid;
} ngx_http_civicgate_watched_t;


typedef struct {
    ngx_str_t                      id;
    ngx_str_t                      time;
    ngx_str_t                      channel;
    ngx_str_t                      service;
    ngx_str_t                      status;
} ngx_http_civicgate_step_text_t;


static ngx_int_t ngx_http_civicgate_journey_fetch(
    ngx_http_civicgate_client_t *cl);
static void ngx_http_civicgate_journey_fetched(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static void ngx_http_civicgate_journey_answer(ngx_http_civicgate_client_t *cl,
    redisReply *reply);
static void ngx_http_civicgate_journey_stream(ngx_http_civicgate_client_t *cl,
    redisReply *reply);
static json_t *ngx_http_civicgate_timeline(ngx_http_civicgate_client_t *cl,
    redisReply *reply);
static json_t *ngx_http_civicgate_step_json(redisReply *step,
    ngx_http_civicgate_sid_t *sid);
static ngx_int_t ngx_http_civicgate_step_split(u_char *p, size_t len,
    ngx_http_civicgate_step_text_t *st);
static ngx_int_t ngx_http_civicgate_journey_render(json_t *timeline,
    ngx_pool_t *pool, ngx_str_t *body, ngx_str_t *etag);
static ngx_int_t ngx_http_civicgate_journey_not_found(ngx_http_request_t *r);
static ngx_http_civicgate_topic_t *ngx_http_civicgate_topic_get(u_char *jid);
static ngx_http_civicgate_topic_t *ngx_http_civicgate_topic_find(
    ngx_str_t *channel);
static void ngx_http_civicgate_topic_subscribe(ngx_http_civicgate_topic_t *t,
    const char *command);
static void ngx_http_civicgate_journey_gone(ngx_http_civicgate_client_t *cl);
static ngx_int_t ngx_http_civicgate_journey_wait(
    ngx_http_civicgate_client_t *cl);
static void ngx_http_civicgate_journey_deadline(
    ngx_http_civicgate_client_t *cl);
static void ngx_http_civicgate_journey_unpending(
    ngx_http_civicgate_client_t *cl);
static ngx_int_t ngx_http_civicgate_journey_unavailable(
    ngx_http_request_t *r);
static void ngx_http_civicgate_journey_longpoll(
    ngx_http_civicgate_client_t *cl);
static void ngx_http_civicgate_topic_catch_up(ngx_http_civicgate_topic_t *t);
static void ngx_http_civicgate_topic_caught_up(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static void ngx_http_civicgate_topic_push_step(ngx_http_civicgate_topic_t *t,
    u_char *step, size_t len, ngx_http_civicgate_sid_t *after);
static void ngx_http_civicgate_watch_timer(ngx_event_t *ev);
static void ngx_http_civicgate_watch_prune(ngx_pool_t *pool,
    ngx_array_t *args, u_char *now, size_t len);
static void ngx_http_civicgate_watch_refresh(ngx_pool_t *pool,
    ngx_array_t *args, u_char *until, size_t len);
static ngx_int_t ngx_http_civicgate_watch_followed(ngx_pool_t *pool,
    ngx_array_t *followed);
static int ngx_libc_cdecl ngx_http_civicgate_watch_cmp(const void *one,
    const void *two);
static ngx_int_t ngx_http_civicgate_watch_key(ngx_pool_t *pool,
    ngx_array_t *args, const char *command, ngx_uint_t shard);
static void ngx_http_civicgate_watch_send(ngx_array_t *args);


/*
 * KEYS: journey timeline, watch registry.  ARGV: a step ID to read after,
 * or ""; for a client that follows the journey, the time (ms) until which
 * it is registered as watched, and the journey ID.  Answers {first_seen,
 * last_seen, channels, resumed, steps}, derived from the timeline's
 * entries, each step as "ID TIME CHANNEL SERVICE STATUS", the form the
 * event script publishes.  Registered in the same call, a follower misses
 * no step between what it reads and what is published.
 */
static const char  ngx_http_civicgate_timeline_lua[] =
    "if ARGV[2] ~= '' then"
    " redis.pcall('ZADD', KEYS[2], 'GT', ARGV[2], ARGV[3]) end\n"
    "local l = redis.call('LRANGE', KEYS[1], 0, -1)\n"
    "local first, last, fs, ls, chans, seen = nil, nil, '', '', {}, {}\n"
    "local from, resumed = 0, 0\n"
    "for i, x in ipairs(l) do\n"
    "  local id, t, ch = string.match(x, '^(%S*) (%S*) (%S*)')\n"
    "  local n = tonumber(t)\n"
    "  if n then\n"
    "    if not first or n < first then first, fs = n, t end\n"
    "    if not last or n >= last then last, ls = n, t end end\n"
    "  if ch and ch ~= '' and not seen[ch] then"
    " seen[ch] = true; chans[#chans + 1] = ch end\n"
    "  if id == ARGV[1] then from, resumed = i, 1 end\n"
    "end\n"
    "local out = {}\n"
    "for i = from + 1, #l do"
    " out[#out + 1] = string.match(l[i], '^%S* %S* %S* %S* %S*') end\n"
    "return {fs, ls, table.concat(chans, ','), resumed, out}\n";


static ngx_rbtree_t                        ngx_http_civicgate_journeys;
static ngx_rbtree_node_t                   ngx_http_civicgate_journeys_sentinel;
static ngx_http_civicgate_main_conf_t     *ngx_http_civicgate_journeys_conf;
static ngx_event_t                         ngx_http_civicgate_watch;


ngx_int_t
ngx_http_civicgate_journey_status_init_conf(ngx_conf_t *cf,
    ngx_http_civicgate_status_conf_t *scf)
{
    scf->journey_script =
        ngx_http_civicgate_redis_add_script(cf, scf->core->redis,
                                            ngx_http_civicgate_timeline_lua);

    return scf->journey_script ? NGX_OK : NGX_ERROR;
}


ngx_int_t
ngx_http_civicgate_journey_status_init_worker(ngx_cycle_t *cycle,
    ngx_http_civicgate_main_conf_t *cgmcf)
{
    ngx_rbtree_init(&ngx_http_civicgate_journeys,
                    &ngx_http_civicgate_journeys_sentinel,
                    ngx_str_rbtree_insert_value);

    ngx_http_civicgate_journeys_conf = cgmcf;

    ngx_memzero(&ngx_http_civicgate_watch, sizeof(ngx_event_t));
    ngx_http_civicgate_watch.handler = ngx_http_civicgate_watch_timer;
    ngx_http_civicgate_watch.log = cycle->log;
    ngx_http_civicgate_watch.cancelable = 1;

    ngx_add_timer(&ngx_http_civicgate_watch, NGX_HTTP_CIVICGATE_WATCH_EVERY);

    return NGX_OK;
}


/* GET <location>journeys/{id}: JSON, long-poll or an event stream */

ngx_int_t
ngx_http_civicgate_journey_status(ngx_http_request_t *r, ngx_str_t *id,
    ngx_uint_t sse, ngx_msec_t wait)
{
    u_char                           raw[NGX_HTTP_CIVICGATE_JID_RAW];
    u_char                           jid[NGX_HTTP_CIVICGATE_JID_LEN];
    ngx_uint_t                       hold;
    ngx_http_civicgate_sid_t         sid;
    ngx_http_civicgate_topic_t      *t;
    ngx_http_civicgate_client_t     *cl;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    if (cgmcf->keyring == NULL
        || ngx_http_civicgate_jid_parse(id->data, id->len, raw) != 0
        || ngx_http_civicgate_jid_verify(cgmcf->keyring, raw) < 0)
    {
        return ngx_http_civicgate_journey_not_found(r);
    }

    ngx_http_civicgate_jid_format(raw, jid);

    sse = sse && !r->header_only;

    /* a stream, or a long-poll unless the ETag turns out not to match */
    hold = sse || (wait && r->headers_in.if_none_match != NULL);

    if (hold && ngx_http_civicgate_clients_full()) {
        return ngx_http_civicgate_client_refuse(r);
    }

    t = NULL;

    if (sse) {
        t = ngx_http_civicgate_topic_get(jid);
        if (t == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    cl = ngx_http_civicgate_client_create(r, t, hold);
    if (cl == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_memcpy(cl->jid, jid, NGX_HTTP_CIVICGATE_JID_LEN);
    cl->wait = wait;
    cl->sse = sse;
    cl->gone = ngx_http_civicgate_journey_gone;

    if (cl->sse && ngx_http_civicgate_last_event_id(r, &sid) == NGX_OK) {
        cl->resume = 1;
        cl->last = sid;
    }

    if (ngx_http_civicgate_journey_wait(cl) == NGX_OK) {
        return NGX_DONE;
    }

    if (ngx_http_civicgate_journey_fetch(cl) != NGX_OK) {
        ngx_http_civicgate_client_finish(cl,
                              ngx_http_civicgate_journey_unavailable(r));
    }

    return NGX_DONE;
}


/*
 * The first read of a stream waits for the subscription, up to a
 * heartbeat (NGX_OK).  A long-poll ends by its wait from here on, however
 * long its reads take.
 */

static ngx_int_t
ngx_http_civicgate_journey_wait(ngx_http_civicgate_client_t *cl)
{
    ngx_http_civicgate_main_conf_t  *cgmcf;

    cgmcf = ngx_http_civicgate_journeys_conf;

    if (!cl->sse) {
        if (cl->wait) {
            cl->deadline = ngx_http_civicgate_journey_deadline;
            ngx_add_timer(&cl->timer, cl->wait);
        }

        return NGX_DECLINED;
    }

    if (cl->topic->subscribed
        || !ngx_http_civicgate_redis_ready(cgmcf->subscriber))
    {
        return NGX_DECLINED;
    }

    ngx_queue_insert_tail(&cl->topic->pending, &cl->queue);
    cl->queued = 1;

    cl->deadline = ngx_http_civicgate_journey_unpending;
    ngx_add_timer(&cl->timer, ngx_http_civicgate_heartbeat(cl));

    return NGX_OK;
}


/* the wait is over: 304, or 503 when the timeline could not be read yet */

static void
ngx_http_civicgate_journey_deadline(ngx_http_civicgate_client_t *cl)
{
    if (cl->etag.len) {
        ngx_http_civicgate_client_finish(cl, NGX_HTTP_NOT_MODIFIED);
        return;
    }

    ngx_http_civicgate_client_finish(cl,
                   ngx_http_civicgate_journey_unavailable(cl->request));
}


/*
 * The subscription is late: the stream reads without it, as when the
 * subscriber is down, and the steps it may miss meanwhile are read again
 * when the subscription comes.
 */

static void
ngx_http_civicgate_journey_unpending(ngx_http_civicgate_client_t *cl)
{
    ngx_queue_remove(&cl->queue);
    cl->queued = 0;
    cl->topic->resubscribing = 1;

    if (ngx_http_civicgate_journey_fetch(cl) != NGX_OK) {
        ngx_http_civicgate_client_finish(cl,
                   ngx_http_civicgate_journey_unavailable(cl->request));
    }
}


static ngx_int_t
ngx_http_civicgate_journey_unavailable(ngx_http_request_t *r)
{
    return ngx_http_civicgate_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                    "unavailable", "Journey timelines are "
                                    "unavailable for the moment.");
}


static ngx_int_t
ngx_http_civicgate_journey_fetch(ngx_http_civicgate_client_t *cl)
{
    u_char                           key[64], watched[32], *p;
    u_char                           from[NGX_HTTP_CIVICGATE_SID_LEN];
    u_char                           until[NGX_INT64_LEN];
    ngx_uint_t                       shard;
    ngx_time_t                      *tp;
    ngx_http_civicgate_shards_t     *sh;
    ngx_http_civicgate_main_conf_t  *cgmcf;
    ngx_http_civicgate_redis_args_t  a;

    cgmcf = ngx_http_civicgate_journeys_conf;

    /* in cluster mode both keys are in the journey's shard's slot */
    sh = ngx_http_civicgate_events_shards();
    shard = ngx_http_civicgate_shard_of(sh, cl->jid,
                                        NGX_HTTP_CIVICGATE_JID_LEN);

    ngx_http_civicgate_redis_evalsha(&a,
                                     ngx_http_civicgate_status_conf()
                                         ->journey_script, "2");
    p = ngx_http_civicgate_key_timeline(key, sh, shard, cl->jid,
                                        NGX_HTTP_CIVICGATE_JID_LEN);
    ngx_http_civicgate_redis_arg(&a, key, p - key);
    p = ngx_http_civicgate_key_watched(watched, sh, shard);
    ngx_http_civicgate_redis_arg(&a, watched, p - watched);

    ngx_http_civicgate_redis_arg(&a, from,
                                 cl->resume
                                 ? ngx_http_civicgate_sid_format(from,
                                                                 &cl->last)
                                   - from
                                 : 0);

    /* a follower (or a catch-up) registers the journey as watched */
    if (cl->topic || cl->request == NULL) {
        tp = ngx_timeofday();
        p = ngx_sprintf(until, "%uL", (uint64_t) tp->sec * 1000 + tp->msec
                                      + NGX_HTTP_CIVICGATE_WATCH_TTL);
        ngx_http_civicgate_redis_arg(&a, until, p - until);
        ngx_http_civicgate_redis_arg(&a, cl->jid, NGX_HTTP_CIVICGATE_JID_LEN);

    } else {
        ngx_http_civicgate_redis_arg(&a, "", 0);
        ngx_http_civicgate_redis_arg(&a, "", 0);
    }

    if (cl->topic) {
        cl->seq = cl->topic->seq;

        /* unsubscribed: whatever the ring gets after, steps may be lost */
        cl->gaps = cl->topic->subscribed ? cl->topic->gaps
                                         : (ngx_uint_t) -1;
    }

    cl->cmd = ngx_http_civicgate_redis_send(cgmcf->client, a.argc, a.argv,
                                            a.lens,
                                            ngx_http_civicgate_journey_fetched,
                                            cl);

    return cl->cmd ? NGX_OK : NGX_ERROR;
}


static void
ngx_http_civicgate_journey_fetched(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    ngx_http_civicgate_client_t *cl = cmd->data;

    ngx_int_t            rc;
    ngx_http_request_t  *r;

    cl->cmd = NULL;
    r = cl->request;

    ngx_http_set_log_request(r->connection->log, r);

    if (reply == NULL || reply->type != REDIS_REPLY_ARRAY
        || reply->elements != 5
        || reply->element[4]->type != REDIS_REPLY_ARRAY)
    {
        if (cl->queued) {
            /* a waiting client asks again at the next step */
            if (cl->again) {
                ngx_http_civicgate_journey_longpoll(cl);
            }

            return;
        }

        rc = ngx_http_civicgate_journey_unavailable(r);
        ngx_http_civicgate_client_finish(cl, rc);
        return;
    }

    if (reply->element[0]->len == 0 && reply->element[4]->elements == 0
        && reply->element[3]->integer == 0)
    {
        if (cl->queued) {
            return;
        }

        rc = ngx_http_civicgate_journey_not_found(r);
        ngx_http_civicgate_client_finish(cl, rc);
        return;
    }

    if (cl->sse) {
        ngx_http_civicgate_journey_stream(cl, reply);

    } else {
        ngx_http_civicgate_journey_answer(cl, reply);
    }
}


/* JSON; a long-poll whose ETag still matches goes on waiting */

static void
ngx_http_civicgate_journey_answer(ngx_http_civicgate_client_t *cl,
    redisReply *reply)
{
    json_t              *timeline;
    ngx_int_t            rc;
    ngx_str_t            body, etag;
    ngx_http_request_t  *r;

    r = cl->request;

    timeline = ngx_http_civicgate_timeline(cl, reply);

    if (ngx_http_civicgate_journey_render(timeline, r->pool, &body, &etag)
        != NGX_OK)
    {
        ngx_http_civicgate_client_finish(cl, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    if (cl->queued) {
        if (etag.len == cl->etag.len
            && ngx_strncmp(etag.data, cl->etag.data, etag.len) == 0)
        {
            if (cl->again) {
                ngx_http_civicgate_journey_longpoll(cl);
            }

            return;
        }

        rc = ngx_http_civicgate_send_etag(r, &body, &etag,
                                          NGX_HTTP_CIVICGATE_LANG_ALL);
        ngx_http_civicgate_client_finish(cl, rc);
        return;
    }

    if (!ngx_http_civicgate_etag_matches(r, &etag)) {
        rc = ngx_http_civicgate_send_etag(r, &body, &etag,
                                          NGX_HTTP_CIVICGATE_LANG_ALL);
        ngx_http_civicgate_client_finish(cl, rc);
        return;
    }

    if (cl->wait == 0) {
        cl->etag = etag;
        ngx_http_civicgate_client_finish(cl, NGX_HTTP_NOT_MODIFIED);
        return;
    }

    /* long-poll: follow the journey's steps until the deadline */

    cl->topic = ngx_http_civicgate_topic_get(cl->jid);
    if (cl->topic == NULL) {
        ngx_http_civicgate_client_finish(cl, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    cl->topic->refs++;

    cl->etag = etag;
    cl->notify = ngx_http_civicgate_journey_longpoll;

    ngx_http_civicgate_client_wait(cl, cl->wait);
}


/*
 * A step came: read the timeline again.  A step that comes while a read
 * is out may be missing from its answer, so the read is made once more.
 */

static void
ngx_http_civicgate_journey_longpoll(ngx_http_civicgate_client_t *cl)
{
    if (cl->cmd) {
        cl->again = 1;
        return;
    }

    cl->again = 0;

    /* on failure the deadline answers */
    (void) ngx_http_civicgate_journey_fetch(cl);
}


/* an event stream: the timeline, or the steps after Last-Event-ID */

static void
ngx_http_civicgate_journey_stream(ngx_http_civicgate_client_t *cl,
    redisReply *reply)
{
    json_t                      *data;
    size_t                       i;
    ngx_int_t                    rc;
    ngx_http_civicgate_sid_t     sid;
    ngx_http_civicgate_topic_t  *t;

    t = cl->topic;

    if (ngx_http_civicgate_sse_start(cl) != NGX_OK) {
        ngx_http_civicgate_client_finish(cl, NGX_ERROR);
        return;
    }

    if (reply->element[3]->integer == 1) {
        for (i = 0; i < reply->element[4]->elements; i++) {
            data = ngx_http_civicgate_step_json(
                                 reply->element[4]->element[i], &sid);
            if (data == NULL) {
                continue;
            }

            rc = ngx_http_civicgate_sse_event(cl, "step", &sid, data, NULL);
            json_decref(data);

            if (rc != NGX_OK) {
                ngx_http_civicgate_client_finish(cl, NGX_ERROR);
                return;
            }
        }

    } else {
        data = ngx_http_civicgate_timeline(cl, reply);
        if (data == NULL) {
            ngx_http_civicgate_client_finish(cl, NGX_ERROR);
            return;
        }

        /* the snapshot's ID is its last step's */
        sid = cl->last;
        cl->last.ms = 0;
        cl->last.seq = 0;

        rc = ngx_http_civicgate_sse_event(cl, "snapshot", &sid, data,
                                          NULL);
        json_decref(data);

        if (rc != NGX_OK) {
            ngx_http_civicgate_client_finish(cl, NGX_ERROR);
            return;
        }
    }

    cl->notify = ngx_http_civicgate_sse_notify;

    ngx_http_civicgate_client_wait(cl, ngx_http_civicgate_heartbeat(cl));

    /*
     * The ring may lack steps that came after the read: read them again.
     * Unsubscribed still, the catch-up at the subscription finds them.
     */
    if (t->subscribed && cl->gaps != t->gaps) {
        ngx_http_civicgate_topic_catch_up(t);
    }

    ngx_http_civicgate_sse_notify(cl);
}


/* the reply as the public timeline; cl->last becomes its last step */

static json_t *
ngx_http_civicgate_timeline(ngx_http_civicgate_client_t *cl,
    redisReply *reply)
{
    u_char                    time[32], *p, *end, *comma;
    json_t                   *root, *steps, *channels, *step;
    size_t                    i;
    uint64_t                  ms;
    redisReply               *e;
    ngx_http_civicgate_sid_t  sid;

    root = json_object();
    steps = json_array();
    channels = json_array();

    if (root == NULL || steps == NULL || channels == NULL) {
        json_decref(root);
        json_decref(steps);
        json_decref(channels);
        return NULL;
    }

    json_object_set_new(root, "journey",
                        json_stringn((char *) cl->jid,
                                     NGX_HTTP_CIVICGATE_JID_LEN));

    for (i = 0; i < 2; i++) {
        e = reply->element[i];
        ms = (uint64_t) ngx_atoof((u_char *) e->str, e->len);

        if (e->len && ms != (uint64_t) NGX_ERROR) {
            p = ngx_http_civicgate_time_ms(time, ms);
            json_object_set_new(root, i ? "last_seen" : "first_seen",
                                json_stringn((char *) time, p - time));
        } else {
            json_object_set_new(root, i ? "last_seen" : "first_seen",
                                json_null());
        }
    }

    p = (u_char *) reply->element[2]->str;
    end = p + reply->element[2]->len;

    while (p < end) {
        comma = ngx_strlchr(p, end, ',');
        comma = comma ? comma : end;
        json_array_append_new(channels, json_stringn((char *) p, comma - p));
        p = comma + 1;
    }

    json_object_set_new(root, "channels", channels);

    for (i = 0; i < reply->element[4]->elements; i++) {
        step = ngx_http_civicgate_step_json(reply->element[4]->element[i],
                                            &sid);
        if (step == NULL) {
            continue;
        }

        json_array_append_new(steps, step);

        if (ngx_http_civicgate_sid_cmp(&sid, &cl->last) > 0) {
            cl->last = sid;
        }
    }

    json_object_set_new(root, "steps", steps);

    return root;
}


static json_t *
ngx_http_civicgate_step_json(redisReply *step, ngx_http_civicgate_sid_t *sid)
{
    if (step->type != REDIS_REPLY_STRING) {
        return NULL;
    }

    return ngx_http_civicgate_step_parse((u_char *) step->str, step->len,
                                         sid);
}


/* "ID TIME CHANNEL SERVICE STATUS" as a public step: no personal data */

json_t *
ngx_http_civicgate_step_parse(u_char *p, size_t len,
    ngx_http_civicgate_sid_t *sid)
{
    u_char                          time[32], *e, outcome[3];
    json_t                         *step;
    uint64_t                        ms;
    ngx_http_civicgate_step_text_t  st;

    if (ngx_http_civicgate_step_split(p, len, &st) != NGX_OK
        || ngx_http_civicgate_sid_parse(st.id.data, st.id.len, sid) != NGX_OK)
    {
        return NULL;
    }

    ms = (uint64_t) ngx_atoof(st.time.data, st.time.len);
    if (ms == (uint64_t) NGX_ERROR) {
        ms = sid->ms;
    }

    e = ngx_http_civicgate_time_ms(time, ms);

    outcome[0] = st.status.len ? st.status.data[0] : '0';
    outcome[1] = 'x';
    outcome[2] = 'x';

    step = json_object();
    if (step == NULL) {
        return NULL;
    }

    json_object_set_new(step, "id", json_stringn((char *) st.id.data,
                                                 st.id.len));
    json_object_set_new(step, "time", json_stringn((char *) time, e - time));
    json_object_set_new(step, "channel",
                        json_stringn((char *) st.channel.data,
                                     st.channel.len));
    json_object_set_new(step, "service",
                        st.service.len
                        ? json_stringn((char *) st.service.data,
                                       st.service.len)
                        : json_null());
    json_object_set_new(step, "outcome", json_stringn((char *) outcome, 3));

    return step;
}


static ngx_int_t
ngx_http_civicgate_step_split(u_char *p, size_t len,
    ngx_http_civicgate_step_text_t *st)
{
    u_char      *end, *sp;
    ngx_str_t   *field[5];
    ngx_uint_t   i;

    field[0] = &st->id;
    field[1] = &st->time;
    field[2] = &st->channel;
    field[3] = &st->service;
    field[4] = &st->status;

    end = p + len;

    for (i = 0; i < 5; i++) {
        sp = (i < 4) ? ngx_strlchr(p, end, ' ') : end;

        if (sp == NULL) {
            return NGX_ERROR;
        }

        field[i]->data = p;
        field[i]->len = sp - p;
        p = sp + 1;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_journey_render(json_t *timeline, ngx_pool_t *pool,
    ngx_str_t *body, ngx_str_t *etag)
{
    uint32_t  h1, h2;

    if (ngx_http_civicgate_json_dump(pool, timeline, 0, body) != NGX_OK) {
        json_decref(timeline);
        return NGX_ERROR;
    }

    json_decref(timeline);

    etag->data = ngx_pnalloc(pool, 18);
    if (etag->data == NULL) {
        return NGX_ERROR;
    }

    h1 = ngx_crc32_long(body->data, body->len);
    h2 = ngx_murmur_hash2(body->data, body->len);

    etag->len = ngx_sprintf(etag->data, "\"%08xD%08xD\"", h1, h2)
                - etag->data;

    return NGX_OK;
}


/* forged, malformed, unknown or expired: one answer, so no oracle */

static ngx_int_t
ngx_http_civicgate_journey_not_found(ngx_http_request_t *r)
{
    return ngx_http_civicgate_error(r, NGX_HTTP_NOT_FOUND, "not-found",
                                    "No such journey.");
}


/* topics: one per followed journey, subscribed while it has clients */

static ngx_http_civicgate_topic_t *
ngx_http_civicgate_topic_get(u_char *jid)
{
    u_char                      *p;
    uint32_t                     hash;
    ngx_str_t                    key;
    ngx_str_node_t              *node;
    ngx_http_civicgate_topic_t  *t;

    key.data = jid;
    key.len = NGX_HTTP_CIVICGATE_JID_LEN;
    hash = ngx_crc32_short(jid, key.len);

    node = ngx_str_rbtree_lookup(&ngx_http_civicgate_journeys, &key, hash);
    if (node) {
        return (ngx_http_civicgate_topic_t *) node;
    }

    t = ngx_calloc(sizeof(ngx_http_civicgate_topic_t)
                   + NGX_HTTP_CIVICGATE_JOURNEY_RING
                     * sizeof(ngx_http_civicgate_change_t)
                   + NGX_HTTP_CIVICGATE_REDIS_KEY_MAX,
                   ngx_cycle->log);
    if (t == NULL) {
        return NULL;
    }

    t->ring = (ngx_http_civicgate_change_t *) (t + 1);
    t->ring_size = NGX_HTTP_CIVICGATE_JOURNEY_RING;
    t->journey = 1;
    t->release = ngx_http_civicgate_topic_release;
    ngx_queue_init(&t->clients);
    ngx_queue_init(&t->pending);

    p = (u_char *) (t->ring + t->ring_size);
    t->channel = p;
    p = ngx_http_civicgate_key_journey(p, jid, NGX_HTTP_CIVICGATE_JID_LEN,
                                       NGX_HTTP_CIVICGATE_KEY_STEPS);
    *p = '\0';
    t->channel_len = p - t->channel;

    t->node.str.data = t->channel + NGX_HTTP_CIVICGATE_KEY_JOURNEY_AT;
    t->node.str.len = NGX_HTTP_CIVICGATE_JID_LEN;
    t->node.node.key = hash;

    ngx_rbtree_insert(&ngx_http_civicgate_journeys, &t->node.node);

    ngx_http_civicgate_topic_subscribe(t, "SUBSCRIBE");

    return t;
}


static ngx_http_civicgate_topic_t *
ngx_http_civicgate_topic_find(ngx_str_t *channel)
{
    ngx_str_t        key;
    ngx_str_node_t  *node;

    if (channel->len
        != ngx_http_civicgate_key_journey_len(NGX_HTTP_CIVICGATE_KEY_STEPS,
                                              NGX_HTTP_CIVICGATE_JID_LEN))
    {
        return NULL;
    }

    key.data = channel->data + NGX_HTTP_CIVICGATE_KEY_JOURNEY_AT;
    key.len = NGX_HTTP_CIVICGATE_JID_LEN;

    node = ngx_str_rbtree_lookup(&ngx_http_civicgate_journeys, &key,
                                 ngx_crc32_short(key.data, key.len));

    return (ngx_http_civicgate_topic_t *) node;
}


static void
ngx_http_civicgate_topic_subscribe(ngx_http_civicgate_topic_t *t,
    const char *command)
{
    size_t                        lens[2];
    const char                   *argv[2];
    ngx_http_civicgate_redis_t   *sub;

    sub = ngx_http_civicgate_journeys_conf->subscriber;

    if (!ngx_http_civicgate_redis_ready(sub)) {
        return;        /* subscribed again when it reconnects */
    }

    argv[0] = command;
    lens[0] = ngx_strlen(command);
    argv[1] = (const char *) t->channel;
    lens[1] = t->channel_len;

    (void) ngx_http_civicgate_redis_push(sub, 2, argv, lens);
}


/* the last client of a journey is gone: no more following it */

static void
ngx_http_civicgate_journey_gone(ngx_http_civicgate_client_t *cl)
{
    ngx_http_civicgate_topic_t  *t;

    t = cl->topic;
    cl->topic = NULL;

    if (t != NULL) {
        t->refs--;
        ngx_http_civicgate_topic_release(t);
    }
}


void
ngx_http_civicgate_topic_release(ngx_http_civicgate_topic_t *t)
{
    ngx_uint_t  i, j;

    if (t->busy || t->cmd || t->refs) {
        return;
    }

    ngx_http_civicgate_topic_subscribe(t, "UNSUBSCRIBE");
    ngx_rbtree_delete(&ngx_http_civicgate_journeys, &t->node.node);

    for (i = 0; i < t->ring_size; i++) {
        for (j = 0; j < NGX_HTTP_CIVICGATE_LANGS; j++) {
            ngx_free(t->ring[i].text[j].data);
        }
    }

    ngx_free(t);
}


/* a journey's subscription is (again) active */

void
ngx_http_civicgate_journey_subscribed(ngx_str_t *channel)
{
    ngx_queue_t                  *q;
    ngx_http_civicgate_topic_t   *t;
    ngx_http_civicgate_client_t  *cl;

    t = ngx_http_civicgate_topic_find(channel);
    if (t == NULL) {
        return;
    }

    t->gaps++;

    if (t->resubscribing) {
        ngx_http_civicgate_topic_catch_up(t);
    }

    t->subscribed = 1;
    t->resubscribing = 0;
    t->busy++;

    while (!ngx_queue_empty(&t->pending)) {
        q = ngx_queue_head(&t->pending);
        ngx_queue_remove(q);
        cl = ngx_queue_data(q, ngx_http_civicgate_client_t, queue);
        cl->queued = 0;
        cl->deadline = NULL;

        if (cl->timer.timer_set) {
            ngx_del_timer(&cl->timer);
        }

        if (ngx_http_civicgate_journey_fetch(cl) != NGX_OK) {
            ngx_http_civicgate_client_finish(cl,
                                        NGX_HTTP_SERVICE_UNAVAILABLE);
        }
    }

    /* long-polls look again: a step may have come before the subscription */
    ngx_http_civicgate_topic_notify(t);

    t->busy--;
    ngx_http_civicgate_topic_release(t);
}


/*
 * Steps the ring may have missed (the subscription was down, a
 * publication was dropped): those after the oldest step a stream client
 * was sent.  Long-polls read the timeline themselves on each change.
 */

static void
ngx_http_civicgate_topic_catch_up(ngx_http_civicgate_topic_t *t)
{
    ngx_uint_t                    n;
    ngx_queue_t                  *q;
    ngx_http_civicgate_client_t  *cl, fake;

    if (t->cmd) {
        /* the read out may have run before these steps were written */
        t->again = 1;
        return;
    }

    ngx_memzero(&fake, sizeof(ngx_http_civicgate_client_t));
    n = 0;

    for (q = ngx_queue_head(&t->clients);
         q != ngx_queue_sentinel(&t->clients);
         q = ngx_queue_next(q))
    {
        cl = ngx_queue_data(q, ngx_http_civicgate_client_t, queue);

        if (cl->sse
            && (n++ == 0 || ngx_http_civicgate_sid_cmp(&cl->last,
                                                       &fake.last) < 0))
        {
            fake.last = cl->last;
        }
    }

    if (n == 0) {
        return;
    }

    ngx_memcpy(fake.jid, t->channel + 6, NGX_HTTP_CIVICGATE_JID_LEN);
    fake.resume = 1;
    t->from = fake.last;

    /* the command belongs to the topic, not to a client */
    if (ngx_http_civicgate_journey_fetch(&fake) == NGX_OK) {
        fake.cmd->handler = ngx_http_civicgate_topic_caught_up;
        fake.cmd->data = t;
        t->cmd = fake.cmd;
    }
}


static void
ngx_http_civicgate_topic_caught_up(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    size_t                       i;
    ngx_uint_t                   ok;
    redisReply                  *e;
    ngx_http_civicgate_topic_t  *t;

    t = cmd->data;
    t->cmd = NULL;

    ok = (reply && reply->type == REDIS_REPLY_ARRAY && reply->elements == 5
          && reply->element[4]->type == REDIS_REPLY_ARRAY);

    /*
     * Not the steps up to "from": when it is gone from the timeline, the
     * reply is the whole timeline, and every stream client has those.
     */
    for (i = 0; ok && i < reply->element[4]->elements; i++) {
        e = reply->element[4]->element[i];

        if (e->type == REDIS_REPLY_STRING) {
            ngx_http_civicgate_topic_push_step(t, (u_char *) e->str,
                                               e->len, &t->from);
        }
    }

    if (t->again) {
        t->again = 0;
        ngx_http_civicgate_topic_catch_up(t);
    }

    if (ok) {
        ngx_http_civicgate_topic_notify(t);
        return;
    }

    ngx_http_civicgate_topic_release(t);
}


void
ngx_http_civicgate_journey_message(ngx_str_t *channel, redisReply *payload)
{
    ngx_http_civicgate_topic_t  *t;

    t = ngx_http_civicgate_topic_find(channel);

    if (t == NULL || payload->type != REDIS_REPLY_STRING) {
        return;
    }

    /*
     * The steps a catch-up returns come before this one: the ring would
     * have them out of order.  The catch-up is made again, after this.
     */
    if (t->cmd) {
        t->again = 1;
        t->gaps++;
        return;
    }

    ngx_http_civicgate_topic_push_step(t, (u_char *) payload->str,
                                       payload->len, NULL);
    ngx_http_civicgate_topic_notify(t);
}


/*
 * A step not newer than the ring's newest is there already (or came out
 * of order, and was read by whoever followed then); what clients have
 * read does not count: each skips its own.
 */

static void
ngx_http_civicgate_topic_push_step(ngx_http_civicgate_topic_t *t,
    u_char *step, size_t len, ngx_http_civicgate_sid_t *after)
{
    json_t                       *data;
    ngx_http_civicgate_sid_t      sid;
    ngx_http_civicgate_change_t  *ch;

    data = ngx_http_civicgate_step_parse(step, len, &sid);
    if (data == NULL) {
        return;
    }

    if (ngx_http_civicgate_sid_cmp(&sid, &t->version) <= 0
        || (after && ngx_http_civicgate_sid_cmp(&sid, after) <= 0))
    {
        json_decref(data);
        return;
    }

    ch = ngx_http_civicgate_topic_push(t, &sid);

    if (ngx_http_civicgate_change_text(ch, 0, "step", data, NULL) != NGX_OK)
    {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "civicgate: journey step not formatted");
    }

    json_decref(data);
}


/* the subscriber reconnected: every followed journey is subscribed again */

void
ngx_http_civicgate_journeys_resubscribe(void)
{
    ngx_rbtree_node_t           *node, *root, *sentinel;
    ngx_http_civicgate_topic_t  *t;

    root = ngx_http_civicgate_journeys.root;
    sentinel = ngx_http_civicgate_journeys.sentinel;

    if (root == sentinel) {
        return;
    }

    for (node = ngx_rbtree_min(root, sentinel);
         node;
         node = ngx_rbtree_next(&ngx_http_civicgate_journeys, node))
    {
        t = (ngx_http_civicgate_topic_t *) node;
        t->subscribed = 0;
        t->resubscribing = 1;
        ngx_http_civicgate_topic_subscribe(t, "SUBSCRIBE");
    }
}


/*
 * The journeys this worker follows stay in the watch registry: one ZADD
 * per NGX_HTTP_CIVICGATE_WATCH_MAX of them, and the registrations that
 * have run out are removed.  A journey nobody follows any more is not
 * removed at once: another gateway may follow it too.
 */

static void
ngx_http_civicgate_watch_timer(ngx_event_t *ev)
{
    u_char       *until, *p;
    ngx_time_t   *tp;
    ngx_pool_t   *pool;
    ngx_array_t   args;

    if (ngx_exiting || ngx_quit || ngx_terminate) {
        return;
    }

    ngx_add_timer(ev, NGX_HTTP_CIVICGATE_WATCH_EVERY);

    if (!ngx_http_civicgate_redis_ready(
                                ngx_http_civicgate_journeys_conf->client))
    {
        return;
    }

    pool = ngx_create_pool(4096, ngx_cycle->log);
    if (pool == NULL) {
        return;
    }

    until = ngx_pnalloc(pool, 2 * NGX_INT64_LEN);

    if (until == NULL
        || ngx_array_init(&args, pool, 4 + 2 * NGX_HTTP_CIVICGATE_WATCH_MAX,
                          sizeof(ngx_str_t)) != NGX_OK)
    {
        ngx_destroy_pool(pool);
        return;
    }

    tp = ngx_timeofday();

    /* run out: registered until before now */
    p = ngx_sprintf(until, "%uL", (uint64_t) tp->sec * 1000 + tp->msec);
    ngx_http_civicgate_watch_prune(pool, &args, until, p - until);

    until = p;
    p = ngx_sprintf(until, "%uL", (uint64_t) tp->sec * 1000 + tp->msec
                                  + NGX_HTTP_CIVICGATE_WATCH_TTL);

    ngx_http_civicgate_watch_refresh(pool, &args, until, p - until);

    ngx_destroy_pool(pool);
}


/*
 * Every journey this worker follows, registered until then; in cluster
 * mode in its shard's registry, so one command per shard it follows.
 */

static void
ngx_http_civicgate_watch_refresh(ngx_pool_t *pool, ngx_array_t *args,
    u_char *until, size_t len)
{
    ngx_str_t                     *arg;
    ngx_uint_t                     i;
    ngx_array_t                    followed;
    ngx_http_civicgate_watched_t  *w;

    if (ngx_http_civicgate_watch_followed(pool, &followed) != NGX_OK) {
        return;
    }

    w = followed.elts;

    for (i = 0; i < followed.nelts; i++) {

        if (args->nelts && w[i].shard != w[i - 1].shard) {
            ngx_http_civicgate_watch_send(args);
        }

        if (args->nelts == 0) {
            if (ngx_http_civicgate_watch_key(pool, args, "ZADD", w[i].shard)
                != NGX_OK)
            {
                return;
            }

            arg = ngx_array_push(args);
            if (arg == NULL) {
                return;
            }

            ngx_str_set(arg, "GT");
        }

        arg = ngx_array_push_n(args, 2);
        if (arg == NULL) {
            return;
        }

        arg[0].data = until;
        arg[0].len = len;
        arg[1] = *w[i].jid;

        if (args->nelts >= 3 + 2 * NGX_HTTP_CIVICGATE_WATCH_MAX) {
            ngx_http_civicgate_watch_send(args);
        }
    }

    if (args->nelts) {
        ngx_http_civicgate_watch_send(args);
    }
}


/* the journeys this worker follows, by shard in cluster mode */

static ngx_int_t
ngx_http_civicgate_watch_followed(ngx_pool_t *pool, ngx_array_t *followed)
{
    ngx_rbtree_node_t             *node, *root, *sentinel;
    ngx_http_civicgate_topic_t    *t;
    ngx_http_civicgate_shards_t   *sh;
    ngx_http_civicgate_watched_t  *w;

    if (ngx_array_init(followed, pool, 64,
                       sizeof(ngx_http_civicgate_watched_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    sh = ngx_http_civicgate_events_shards();
    root = ngx_http_civicgate_journeys.root;
    sentinel = ngx_http_civicgate_journeys.sentinel;

    for (node = (root == sentinel) ? NULL : ngx_rbtree_min(root, sentinel);
         node;
         node = ngx_rbtree_next(&ngx_http_civicgate_journeys, node))
    {
        t = (ngx_http_civicgate_topic_t *) node;

        w = ngx_array_push(followed);
        if (w == NULL) {
            return NGX_ERROR;
        }

        w->jid = &t->node.str;
        w->shard = sh->cluster
                   ? ngx_http_civicgate_shard_of(sh, t->node.str.data,
                                                 t->node.str.len)
                   : 0;
    }

    if (sh->cluster && followed->nelts > 1) {
        ngx_qsort(followed->elts, followed->nelts,
                  sizeof(ngx_http_civicgate_watched_t),
                  ngx_http_civicgate_watch_cmp);
    }

    return NGX_OK;
}


static int ngx_libc_cdecl
ngx_http_civicgate_watch_cmp(const void *one, const void *two)
{
    const ngx_http_civicgate_watched_t  *a = one, *b = two;

    return (a->shard > b->shard) - (a->shard < b->shard);
}


/* the registrations that have run out; in cluster mode, in every shard */

static void
ngx_http_civicgate_watch_prune(ngx_pool_t *pool, ngx_array_t *args,
    u_char *now, size_t len)
{
    ngx_str_t                    *arg;
    ngx_uint_t                    shard, n;
    ngx_http_civicgate_shards_t  *sh;

    sh = ngx_http_civicgate_events_shards();
    n = sh->cluster ? sh->n : 1;

    for (shard = 0; shard < n; shard++) {
        if (ngx_http_civicgate_watch_key(pool, args, "ZREMRANGEBYSCORE",
                                         shard)
            != NGX_OK)
        {
            return;
        }

        arg = ngx_array_push_n(args, 2);
        if (arg == NULL) {
            return;
        }

        ngx_str_set(&arg[0], "-inf");
        arg[1].data = now;
        arg[1].len = len;

        ngx_http_civicgate_watch_send(args);
    }
}


/* a command on a shard's watch registry: its name and the key */

static ngx_int_t
ngx_http_civicgate_watch_key(ngx_pool_t *pool, ngx_array_t *args,
    const char *command, ngx_uint_t shard)
{
    u_char     *key;
    ngx_str_t  *arg;

    key = ngx_pnalloc(pool, 32);
    arg = ngx_array_push_n(args, 2);

    if (key == NULL || arg == NULL) {
        return NGX_ERROR;
    }

    arg[0].data = (u_char *) command;
    arg[0].len = ngx_strlen(command);
    arg[1].data = key;
    arg[1].len = ngx_http_civicgate_key_watched(key,
                                    ngx_http_civicgate_events_shards(), shard)
                 - key;

    return NGX_OK;
}


/* a command whose reply nobody waits for; the arguments are emptied */

static void
ngx_http_civicgate_watch_send(ngx_array_t *args)
{
    size_t       lens[4 + 2 * NGX_HTTP_CIVICGATE_WATCH_MAX];
    ngx_str_t   *arg;
    ngx_uint_t   i;
    const char  *argv[4 + 2 * NGX_HTTP_CIVICGATE_WATCH_MAX];

    arg = args->elts;

    for (i = 0; i < args->nelts; i++) {
        argv[i] = (const char *) arg[i].data;
        lens[i] = arg[i].len;
    }

    (void) ngx_http_civicgate_redis_send(ngx_http_civicgate_journeys_conf
                                             ->client,
                                         (int) args->nelts, argv, lens,
                                         NULL, NULL);

    args->nelts = 0;
}
