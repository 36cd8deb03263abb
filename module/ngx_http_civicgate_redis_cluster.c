
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_redis_cluster.h"
#include "ngx_http_civicgate_util.h"


#define NGX_HTTP_CIVICGATE_CLUSTER_NODES      64
#define NGX_HTTP_CIVICGATE_CLUSTER_REDIRECTS  5

/*
 * The slot map is read again at most every REREAD ms when a redirection
 * or a lost master says it changed, every DOWN ms while a master of the
 * map takes no commands, and every IDLE ms otherwise.  A command refused
 * with TRYAGAIN or CLUSTERDOWN is tried again every RETRY ms until its
 * timeout; a node left out of the map keeps its connection for REAP ms,
 * for the replies still due.
 */
#define NGX_HTTP_CIVICGATE_CLUSTER_REREAD     100
#define NGX_HTTP_CIVICGATE_CLUSTER_DOWN       100
#define NGX_HTTP_CIVICGATE_CLUSTER_IDLE       10000
#define NGX_HTTP_CIVICGATE_CLUSTER_RETRY      20
#define NGX_HTTP_CIVICGATE_CLUSTER_REAP       2000

/* slots whose waiting commands failed lately: the older sent fail too */
#define NGX_HTTP_CIVICGATE_CLUSTER_FAILED     32


typedef struct {
    ngx_http_civicgate_redis_t       *rc;
    ngx_http_civicgate_redis_conf_t   conf;
    ngx_addr_t                        addr;
    ngx_pool_t                       *pool;
    ngx_msec_t                        retired;     /* 0: in the map */
    ngx_str_t                         name;        /* ip:port */
} ngx_http_civicgate_cluster_node_t;


struct ngx_http_civicgate_cluster_s {
    ngx_http_civicgate_redis_t       *router;
    ngx_http_civicgate_redis_t       *seed;
    ngx_http_civicgate_redis_conf_t  *conf;
    ngx_log_t                        *log;

    ngx_http_civicgate_cluster_node_t
                                     *nodes[NGX_HTTP_CIVICGATE_CLUSTER_NODES];
    u_char                            slots[NGX_HTTP_CIVICGATE_REDIS_SLOTS];

    ngx_queue_t                       parked;      /* TRYAGAIN, CLUSTERDOWN */
    uint16_t                          waiting[NGX_HTTP_CIVICGATE_REDIS_SLOTS];

    struct {
        ngx_int_t                     slot;
        ngx_msec_t                    at;
    }                                 failed[NGX_HTTP_CIVICGATE_CLUSTER_FAILED];
    ngx_uint_t                        nfailed;     /* next in the ring */
    ngx_event_t                       retry;
    ngx_event_t                       reread;
    ngx_event_t                       reap;
    ngx_msec_t                        asked;       /* last map read sent */

    unsigned                          reading:1;   /* a map read in flight */
    unsigned                          known:1;     /* a map was read */
};


static void ngx_http_civicgate_cluster_seed_ready(
    ngx_http_civicgate_redis_t *seed);
static void ngx_http_civicgate_cluster_node_ready(
    ngx_http_civicgate_redis_t *rc);
static void ngx_http_civicgate_cluster_read_map(
    ngx_http_civicgate_cluster_t *cl);
static void ngx_http_civicgate_cluster_map_read(
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply);
static ngx_int_t ngx_http_civicgate_cluster_apply(
    ngx_http_civicgate_cluster_t *cl, redisReply *reply);
static void ngx_http_civicgate_cluster_adopt(ngx_http_civicgate_cluster_t *cl,
    u_char *slots);
static void ngx_http_civicgate_cluster_schedule(
    ngx_http_civicgate_cluster_t *cl);
static ngx_int_t ngx_http_civicgate_cluster_node(
    ngx_http_civicgate_cluster_t *cl, u_char *ip, size_t len,
    ngx_uint_t port);
static ngx_int_t ngx_http_civicgate_cluster_add(
    ngx_http_civicgate_cluster_t *cl, ngx_uint_t i, ngx_str_t *name);
static void ngx_http_civicgate_cluster_remove(
    ngx_http_civicgate_cluster_t *cl, ngx_uint_t i);
static ngx_http_civicgate_cluster_node_t *ngx_http_civicgate_cluster_of(
    ngx_http_civicgate_cluster_t *cl, ngx_int_t slot);
static ngx_http_civicgate_redis_cmd_t *ngx_http_civicgate_cluster_route(
    ngx_http_civicgate_redis_t *router, int argc, const char **argv,
    const size_t *argvlen, ngx_http_civicgate_redis_handler_pt handler,
    void *data);
static ngx_int_t ngx_http_civicgate_cluster_redirect(
    ngx_http_civicgate_redis_t *rc, ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply);
static ngx_int_t ngx_http_civicgate_cluster_moved(
    ngx_http_civicgate_cluster_t *cl, ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply, ngx_uint_t asking);
static void ngx_http_civicgate_cluster_park(ngx_http_civicgate_cluster_t *cl,
    ngx_http_civicgate_redis_cmd_t *cmd);
static void ngx_http_civicgate_cluster_retry(ngx_event_t *ev);
static void ngx_http_civicgate_cluster_fail_slot(
    ngx_http_civicgate_cluster_t *cl, ngx_int_t slot);
static ngx_uint_t ngx_http_civicgate_cluster_failed(
    ngx_http_civicgate_cluster_t *cl, ngx_http_civicgate_redis_cmd_t *cmd);
static void ngx_http_civicgate_cluster_reread(ngx_event_t *ev);
static void ngx_http_civicgate_cluster_reap(ngx_event_t *ev);
static ngx_uint_t ngx_http_civicgate_cluster_is(redisReply *reply,
    const char *word, size_t len);


ngx_http_civicgate_redis_t *
ngx_http_civicgate_cluster_create(ngx_cycle_t *cycle,
    ngx_http_civicgate_redis_conf_t *conf)
{
    ngx_http_civicgate_cluster_t  *cl;

    cl = ngx_calloc(sizeof(ngx_http_civicgate_cluster_t), cycle->log);
    if (cl == NULL) {
        return NULL;
    }

    cl->conf = conf;
    cl->log = cycle->log;
    ngx_queue_init(&cl->parked);

    cl->router = ngx_http_civicgate_redis_create(cycle, conf);
    cl->seed = ngx_http_civicgate_redis_create(cycle, conf->seeds);

    if (cl->router == NULL || cl->seed == NULL) {
        if (cl->router) {
            ngx_http_civicgate_redis_destroy(cl->router);
        }

        if (cl->seed) {
            ngx_http_civicgate_redis_destroy(cl->seed);
        }

        ngx_free(cl);
        return NULL;
    }

    cl->router->route = ngx_http_civicgate_cluster_route;
    cl->router->cluster = cl;
    cl->router->state = NGX_HTTP_CIVICGATE_REDIS_IDLE;

    cl->seed->cluster = cl;
    cl->seed->on_ready = ngx_http_civicgate_cluster_seed_ready;

    cl->retry.handler = ngx_http_civicgate_cluster_retry;
    cl->reread.handler = ngx_http_civicgate_cluster_reread;
    cl->reap.handler = ngx_http_civicgate_cluster_reap;
    cl->retry.data = cl;
    cl->reread.data = cl;
    cl->reap.data = cl;
    cl->retry.log = cycle->log;
    cl->reread.log = cycle->log;
    cl->reap.log = cycle->log;
    cl->retry.cancelable = 1;
    cl->reread.cancelable = 1;
    cl->reap.cancelable = 1;

    return cl->router;
}


/* after the caller set the router's handlers: the seeds are asked first */

void
ngx_http_civicgate_cluster_start(ngx_http_civicgate_redis_t *router)
{
    ngx_http_civicgate_cluster_t  *cl;

    cl = router->cluster;

    cl->seed->metrics = router->metrics;
    cl->seed->role = router->role;

    ngx_http_civicgate_redis_start(cl->seed);
}


void
ngx_http_civicgate_cluster_destroy(ngx_http_civicgate_redis_t *router)
{
    ngx_uint_t                       i;
    ngx_queue_t                     *q;
    ngx_http_civicgate_cluster_t    *cl;
    ngx_http_civicgate_redis_cmd_t  *cmd;

    cl = router->cluster;

    /* handlers that look see a closed client, and send nothing more */
    router->state = NGX_HTTP_CIVICGATE_REDIS_CLOSED;

    while (!ngx_queue_empty(&cl->parked)) {
        q = ngx_queue_head(&cl->parked);
        ngx_queue_remove(q);
        cmd = ngx_queue_data(q, ngx_http_civicgate_redis_cmd_t, queue);
        ngx_http_civicgate_redis_abandon(cmd, router);
    }

    if (cl->retry.timer_set) {
        ngx_del_timer(&cl->retry);
    }

    if (cl->reread.timer_set) {
        ngx_del_timer(&cl->reread);
    }

    if (cl->reap.timer_set) {
        ngx_del_timer(&cl->reap);
    }

    for (i = 0; i < NGX_HTTP_CIVICGATE_CLUSTER_NODES; i++) {
        if (cl->nodes[i]) {
            ngx_http_civicgate_cluster_remove(cl, i);
        }
    }

    ngx_http_civicgate_redis_destroy(cl->seed);
    ngx_http_civicgate_redis_destroy(router);
    ngx_free(cl);
}


static void
ngx_http_civicgate_cluster_seed_ready(ngx_http_civicgate_redis_t *seed)
{
    ngx_http_civicgate_cluster_read_map(seed->cluster);
}


/* a master's connection is (again) ready: what waited for Redis may go */

static void
ngx_http_civicgate_cluster_node_ready(ngx_http_civicgate_redis_t *rc)
{
    ngx_http_civicgate_redis_t  *router;

    router = rc->cluster->router;

    if (router->state == NGX_HTTP_CIVICGATE_REDIS_READY && router->on_ready) {
        router->on_ready(router);
    }
}


/*
 * CLUSTER SLOTS, one at a time, asked of a master that is ready, else of
 * the seeds' connection; not more often than the reread interval.
 */

static void
ngx_http_civicgate_cluster_read_map(ngx_http_civicgate_cluster_t *cl)
{
    const char                         *argv[2];
    size_t                              lens[2];
    ngx_msec_t                          since;
    ngx_uint_t                          i;
    ngx_http_civicgate_redis_t         *rc;
    ngx_http_civicgate_cluster_node_t  *node;

    if (cl->reading || cl->router->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED) {
        return;
    }

    since = ngx_current_msec - cl->asked;

    if (cl->asked && since < NGX_HTTP_CIVICGATE_CLUSTER_REREAD) {
        if (!cl->reread.timer_set) {
            ngx_add_timer(&cl->reread,
                          NGX_HTTP_CIVICGATE_CLUSTER_REREAD - since);
        }

        return;
    }

    rc = ngx_http_civicgate_redis_ready(cl->seed) ? cl->seed : NULL;

    for (i = 0; i < NGX_HTTP_CIVICGATE_CLUSTER_NODES; i++) {
        node = cl->nodes[i];

        if (node && !node->retired && ngx_http_civicgate_redis_ready(node->rc))
        {
            rc = node->rc;
            break;
        }
    }

    if (rc == NULL) {
        ngx_http_civicgate_cluster_schedule(cl);
        return;
    }

    argv[0] = "CLUSTER";
    lens[0] = 7;
    argv[1] = "SLOTS";
    lens[1] = 5;

    if (ngx_http_civicgate_redis_send(rc, 2, argv, lens,
                                      ngx_http_civicgate_cluster_map_read, cl)
        == NULL)
    {
        ngx_http_civicgate_cluster_schedule(cl);
        return;
    }

    cl->reading = 1;
    cl->asked = ngx_current_msec;
}


static void
ngx_http_civicgate_cluster_map_read(ngx_http_civicgate_redis_cmd_t *cmd,
    redisReply *reply)
{
    static ngx_http_civicgate_log_limit_t  logged;

    ngx_http_civicgate_cluster_t  *cl = cmd->data;

    cl->reading = 0;

    if (cmd->redis->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED
        || cl->router->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED)
    {
        return;
    }

    if (reply != NULL
        && ngx_http_civicgate_cluster_apply(cl, reply) != NGX_OK
        && ngx_http_civicgate_log_due(&logged))
    {
        ngx_log_error(NGX_LOG_ERR, cl->log, 0,
                      "civicgate: redis %V: unusable slot map%s%*s",
                      &cl->conf->url,
                      reply->type == REDIS_REPLY_ERROR ? ": " : "",
                      reply->type == REDIS_REPLY_ERROR ? (size_t) reply->len
                                                       : (size_t) 0,
                      reply->str);
    }

    ngx_http_civicgate_cluster_schedule(cl);
}


/*
 * A CLUSTER SLOTS reply: per range its first slot, its last, and its
 * master as [ip, port, ...], then its replicas.  Slots it leaves out
 * have no node: their commands fail until a map covers them.
 */

static ngx_int_t
ngx_http_civicgate_cluster_apply(ngx_http_civicgate_cluster_t *cl,
    redisReply *reply)
{
    u_char       slots[NGX_HTTP_CIVICGATE_REDIS_SLOTS];
    long long    first, last;
    ngx_int_t    i;
    ngx_uint_t   r;
    redisReply  *range, *master;

    if (reply->type != REDIS_REPLY_ARRAY || reply->elements == 0) {
        return NGX_ERROR;
    }

    ngx_memzero(slots, sizeof(slots));

    for (r = 0; r < reply->elements; r++) {
        range = reply->element[r];

        if (range->type != REDIS_REPLY_ARRAY || range->elements < 3
            || range->element[0]->type != REDIS_REPLY_INTEGER
            || range->element[1]->type != REDIS_REPLY_INTEGER
            || range->element[2]->type != REDIS_REPLY_ARRAY
            || range->element[2]->elements < 2
            || range->element[2]->element[0]->type != REDIS_REPLY_STRING
            || range->element[2]->element[1]->type != REDIS_REPLY_INTEGER)
        {
            return NGX_ERROR;
        }

        first = range->element[0]->integer;
        last = range->element[1]->integer;
        master = range->element[2];

        if (first < 0 || last >= NGX_HTTP_CIVICGATE_REDIS_SLOTS
            || first > last || master->element[1]->integer <= 0
            || master->element[1]->integer > 65535)
        {
            return NGX_ERROR;
        }

        i = ngx_http_civicgate_cluster_node(cl,
                                      (u_char *) master->element[0]->str,
                                      master->element[0]->len,
                                      (ngx_uint_t) master->element[1]->integer);
        if (i == NGX_ERROR) {
            return NGX_ERROR;
        }

        ngx_memset(&slots[first], (int) i + 1, last - first + 1);
    }

    ngx_http_civicgate_cluster_adopt(cl, slots);

    return NGX_OK;
}


/*
 * The new map replaces the old; masters out of it are retired, and the
 * router is ready from the first map on.
 */

static void
ngx_http_civicgate_cluster_adopt(ngx_http_civicgate_cluster_t *cl,
    u_char *slots)
{
    ngx_uint_t                          i, n, covered, used[2], level;
    ngx_http_civicgate_cluster_node_t  *node;

    used[0] = 0;
    used[1] = 0;
    covered = 0;

    for (i = 0; i < NGX_HTTP_CIVICGATE_REDIS_SLOTS; i++) {
        if (slots[i]) {
            covered++;
            n = slots[i] - 1;
            used[n / 32] |= (ngx_uint_t) 1 << (n % 32);
        }
    }

    if (ngx_memcmp(cl->slots, slots, sizeof(cl->slots)) != 0) {
        level = cl->known ? NGX_LOG_NOTICE : NGX_LOG_INFO;

        ngx_log_error(level, cl->log, 0,
                      "civicgate: redis %V: slot map read, %ui of %d slots "
                      "served", &cl->conf->url, covered,
                      NGX_HTTP_CIVICGATE_REDIS_SLOTS);

        ngx_memcpy(cl->slots, slots, sizeof(cl->slots));
    }

    for (i = 0; i < NGX_HTTP_CIVICGATE_CLUSTER_NODES; i++) {
        node = cl->nodes[i];

        if (node == NULL) {
            continue;
        }

        if (used[i / 32] & ((ngx_uint_t) 1 << (i % 32))) {
            node->retired = 0;

        } else if (!node->retired) {
            node->retired = ngx_current_msec ? ngx_current_msec : 1;

            if (!cl->reap.timer_set) {
                ngx_add_timer(&cl->reap, NGX_HTTP_CIVICGATE_CLUSTER_REAP);
            }
        }
    }

    if (!cl->known) {
        cl->known = 1;
        cl->router->state = NGX_HTTP_CIVICGATE_REDIS_READY;

        if (cl->router->on_ready) {
            cl->router->on_ready(cl->router);
        }
    }
}


/* the next map read: soon while a master of the map takes no commands */

static void
ngx_http_civicgate_cluster_schedule(ngx_http_civicgate_cluster_t *cl)
{
    ngx_msec_t                          delay;
    ngx_uint_t                          i;
    ngx_http_civicgate_cluster_node_t  *node;

    delay = cl->known ? NGX_HTTP_CIVICGATE_CLUSTER_IDLE
                      : NGX_HTTP_CIVICGATE_CLUSTER_DOWN;

    for (i = 0; i < NGX_HTTP_CIVICGATE_CLUSTER_NODES; i++) {
        node = cl->nodes[i];

        if (node && !node->retired
            && !ngx_http_civicgate_redis_ready(node->rc))
        {
            delay = NGX_HTTP_CIVICGATE_CLUSTER_DOWN;
            break;
        }
    }

    if (cl->reread.timer_set) {
        if (cl->reread.timer.key <= ngx_current_msec + delay) {
            return;
        }

        ngx_del_timer(&cl->reread);
    }

    ngx_add_timer(&cl->reread, delay);
}


/* the index of the node at ip:port, added (and connected) if new */

static ngx_int_t
ngx_http_civicgate_cluster_node(ngx_http_civicgate_cluster_t *cl, u_char *ip,
    size_t len, ngx_uint_t port)
{
    u_char                              text[NGX_SOCKADDR_STRLEN + 8];
    ngx_str_t                           name;
    ngx_uint_t                          i, free, v6;
    ngx_http_civicgate_cluster_node_t  *node;

    if (len == 0 || len > NGX_SOCKADDR_STRLEN) {
        return NGX_ERROR;
    }

    v6 = ngx_strlchr(ip, ip + len, ':') != NULL;

    name.data = text;
    name.len = ngx_sprintf(text, v6 ? "[%*s]:%ui" : "%*s:%ui", len, ip, port)
               - text;

    free = NGX_HTTP_CIVICGATE_CLUSTER_NODES;

    for (i = 0; i < NGX_HTTP_CIVICGATE_CLUSTER_NODES; i++) {
        node = cl->nodes[i];

        if (node == NULL) {
            free = ngx_min(free, i);
            continue;
        }

        if (node->name.len == name.len
            && ngx_strncmp(node->name.data, name.data, name.len) == 0)
        {
            return i;
        }
    }

    if (free == NGX_HTTP_CIVICGATE_CLUSTER_NODES) {
        ngx_log_error(NGX_LOG_ERR, cl->log, 0,
                      "civicgate: redis %V: more than %d nodes",
                      &cl->conf->url, NGX_HTTP_CIVICGATE_CLUSTER_NODES);
        return NGX_ERROR;
    }

    if (ngx_http_civicgate_cluster_add(cl, free, &name) != NGX_OK) {
        return NGX_ERROR;
    }

    return free;
}


/* a master's connection, with the directive's parameters */

static ngx_int_t
ngx_http_civicgate_cluster_add(ngx_http_civicgate_cluster_t *cl, ngx_uint_t i,
    ngx_str_t *name)
{
    ngx_pool_t                         *pool;
    ngx_http_civicgate_cluster_node_t  *node;

    pool = ngx_create_pool(1024, cl->log);
    if (pool == NULL) {
        return NGX_ERROR;
    }

    node = ngx_pcalloc(pool, sizeof(ngx_http_civicgate_cluster_node_t));
    if (node == NULL) {
        goto failed;
    }

    node->pool = pool;
    node->name.len = name->len;
    node->name.data = ngx_pstrdup(pool, name);

    if (node->name.data == NULL
        || ngx_parse_addr_port(pool, &node->addr, name->data, name->len)
           != NGX_OK)
    {
        goto failed;
    }

    node->addr.name = node->name;

    node->conf = *cl->conf;
    node->conf.mode = NGX_HTTP_CIVICGATE_REDIS_SINGLE;
    node->conf.seeds = NULL;
    node->conf.addrs = &node->addr;
    node->conf.naddrs = 1;
    node->conf.url = node->name;

    node->rc = ngx_http_civicgate_redis_create((ngx_cycle_t *) ngx_cycle,
                                               &node->conf);
    if (node->rc == NULL) {
        goto failed;
    }

    node->rc->cluster = cl;
    node->rc->redirect = ngx_http_civicgate_cluster_redirect;
    node->rc->on_ready = ngx_http_civicgate_cluster_node_ready;
    node->rc->data = node;
    node->rc->metrics = cl->router->metrics;
    node->rc->role = cl->router->role;

    cl->nodes[i] = node;

    ngx_http_civicgate_redis_start(node->rc);

    return NGX_OK;

failed:

    ngx_destroy_pool(pool);
    return NGX_ERROR;
}


static void
ngx_http_civicgate_cluster_remove(ngx_http_civicgate_cluster_t *cl,
    ngx_uint_t i)
{
    ngx_http_civicgate_cluster_node_t  *node;

    node = cl->nodes[i];
    cl->nodes[i] = NULL;

    ngx_http_civicgate_redis_destroy(node->rc);
    ngx_destroy_pool(node->pool);
}


static ngx_http_civicgate_cluster_node_t *
ngx_http_civicgate_cluster_of(ngx_http_civicgate_cluster_t *cl,
    ngx_int_t slot)
{
    ngx_uint_t                          i;
    ngx_http_civicgate_cluster_node_t  *node;

    if (slot >= 0) {
        return cl->slots[slot] ? cl->nodes[cl->slots[slot] - 1] : NULL;
    }

    /* a command without keys: any master that takes commands */
    for (i = 0; i < NGX_HTTP_CIVICGATE_CLUSTER_NODES; i++) {
        node = cl->nodes[i];

        if (node && !node->retired && ngx_http_civicgate_redis_ready(node->rc))
        {
            return node;
        }
    }

    return NULL;
}


static ngx_http_civicgate_redis_cmd_t *
ngx_http_civicgate_cluster_route(ngx_http_civicgate_redis_t *router, int argc,
    const char **argv, const size_t *argvlen,
    ngx_http_civicgate_redis_handler_pt handler, void *data)
{
    ngx_int_t                           slot;
    ngx_http_civicgate_cluster_t       *cl;
    ngx_http_civicgate_redis_cmd_t     *cmd;
    ngx_http_civicgate_cluster_node_t  *node;

    if (router->state != NGX_HTTP_CIVICGATE_REDIS_READY) {
        return NULL;
    }

    cl = router->cluster;
    slot = ngx_http_civicgate_cluster_command_slot(argc, argv, argvlen);
    node = ngx_http_civicgate_cluster_of(cl, slot);

    if (node == NULL) {
        ngx_http_civicgate_cluster_read_map(cl);
        return NULL;
    }

    /* a slot's commands leave in order: behind those that wait */
    if (slot >= 0 && cl->waiting[slot]) {
        cmd = ngx_http_civicgate_redis_prepare(node->rc, argc, argv, argvlen,
                                               handler, data);
        if (cmd == NULL) {
            return NULL;
        }

        cmd->slot = slot;
        ngx_http_civicgate_cluster_park(cl, cmd);

        return cmd;
    }

    cmd = ngx_http_civicgate_redis_send(node->rc, argc, argv, argvlen,
                                        handler, data);
    if (cmd == NULL) {
        /* a master lost: the map may name its replica already */
        if (!ngx_http_civicgate_redis_accepting(node->rc)) {
            ngx_http_civicgate_cluster_read_map(cl);
        }

        return NULL;
    }

    cmd->slot = slot;

    return cmd;
}


/*
 * MOVED: the slot is another master's from now on; ASK: this command
 * only goes there, behind ASKING; TRYAGAIN (keys of a slot in the middle
 * of a move) and CLUSTERDOWN: the command waits and is tried again until
 * its timeout.  Other errors, and a command redirected too often, go to
 * its handler.
 */

static ngx_int_t
ngx_http_civicgate_cluster_redirect(ngx_http_civicgate_redis_t *rc,
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply)
{
    ngx_http_civicgate_cluster_t  *cl;

    cl = rc->cluster;

    if (cmd->redirects >= NGX_HTTP_CIVICGATE_CLUSTER_REDIRECTS
        || cl->router->state == NGX_HTTP_CIVICGATE_REDIS_CLOSED
        || !(ngx_http_civicgate_cluster_is(reply, "MOVED ", 6)
             || ngx_http_civicgate_cluster_is(reply, "ASK ", 4)
             || ngx_http_civicgate_cluster_is(reply, "TRYAGAIN", 8)
             || ngx_http_civicgate_cluster_is(reply, "CLUSTERDOWN", 11)))
    {
        return NGX_DECLINED;
    }

    /* older commands of its slot failed: this one, sent before, fails */
    if (ngx_http_civicgate_cluster_failed(cl, cmd)) {
        ngx_http_civicgate_redis_abandon(cmd, rc);
        return NGX_OK;
    }

    if (reply->str[0] == 'M' || reply->str[0] == 'A') {
        return ngx_http_civicgate_cluster_moved(cl, cmd, reply,
                                                reply->str[0] == 'A');
    }

    if (reply->str[0] == 'C') {
        ngx_http_civicgate_cluster_read_map(cl);
    }

    /* no count: the command's timeout bounds its waits */
    ngx_http_civicgate_cluster_park(cl, cmd);

    return NGX_OK;
}


/* "MOVED 3999 127.0.0.1:6381", "ASK 3999 [::1]:6381" as Redis writes it */

static ngx_int_t
ngx_http_civicgate_cluster_moved(ngx_http_civicgate_cluster_t *cl,
    ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply,
    ngx_uint_t asking)
{
    u_char     *p, *last, *colon, *ip;
    ngx_int_t   slot, port, i;

    last = (u_char *) reply->str + reply->len;
    p = ngx_strlchr((u_char *) reply->str, last, ' ') + 1;
    ip = ngx_strlchr(p, last, ' ');

    if (ip == NULL) {
        return NGX_DECLINED;
    }

    slot = ngx_atoi(p, ip - p);
    ip++;

    for (colon = last - 1; colon > ip && *colon != ':'; colon--) {
        /* void */
    }

    port = ngx_atoi(colon + 1, last - colon - 1);

    if (slot == NGX_ERROR || slot >= NGX_HTTP_CIVICGATE_REDIS_SLOTS
        || colon == ip || port == NGX_ERROR || port == 0 || port > 65535)
    {
        return NGX_DECLINED;
    }

    /* an IPv6 address may come in brackets or bare */
    if (*ip == '[' && colon[-1] == ']') {
        ip++;
        colon--;
    }

    i = ngx_http_civicgate_cluster_node(cl, ip, colon - ip, port);
    if (i == NGX_ERROR) {
        return NGX_DECLINED;
    }

    if (!asking) {
        cl->slots[slot] = (u_char) (i + 1);
        cl->nodes[i]->retired = 0;
        ngx_http_civicgate_cluster_read_map(cl);
    }

    cmd->redirects++;

    /* behind the commands of its slot that wait, if any: in order */
    if (cmd->slot >= 0 && cl->waiting[cmd->slot] && !asking) {
        ngx_http_civicgate_cluster_park(cl, cmd);
        return NGX_OK;
    }

    /* the command is the cluster's: a failed requeue failed it too */
    (void) ngx_http_civicgate_redis_requeue(cl->nodes[i]->rc, cmd, asking);

    return NGX_OK;
}


static void
ngx_http_civicgate_cluster_park(ngx_http_civicgate_cluster_t *cl,
    ngx_http_civicgate_redis_cmd_t *cmd)
{
    /* the node's connection may be gone before the command leaves */
    cmd->redis = cl->router;

    if (cmd->slot >= 0) {
        cl->waiting[cmd->slot]++;
    }

    ngx_queue_insert_tail(&cl->parked, &cmd->queue);

    if (!cl->retry.timer_set) {
        ngx_add_timer(&cl->retry, NGX_HTTP_CIVICGATE_CLUSTER_RETRY);
    }
}


static void
ngx_http_civicgate_cluster_retry(ngx_event_t *ev)
{
    ngx_queue_t                         due, *q;
    ngx_http_civicgate_cluster_t       *cl;
    ngx_http_civicgate_redis_cmd_t     *cmd;
    ngx_http_civicgate_cluster_node_t  *node;

    cl = ev->data;

    if (ngx_queue_empty(&cl->parked)) {
        return;
    }

    /* those parked again while these go wait for the next round */
    ngx_queue_init(&due);
    ngx_queue_add(&due, &cl->parked);
    ngx_queue_init(&cl->parked);

    while (!ngx_queue_empty(&due)) {
        q = ngx_queue_head(&due);
        ngx_queue_remove(q);
        cmd = ngx_queue_data(q, ngx_http_civicgate_redis_cmd_t, queue);

        if (cmd->slot >= 0) {
            cl->waiting[cmd->slot]--;
        }

        /*
         * The oldest of a slot's commands timed out: those behind it fail
         * with it, and those of the slot sent before now fail when they
         * come back redirected, so that none overtakes it.
         */
        if (ngx_current_msec - cmd->began >= cl->conf->timeout
            || ngx_http_civicgate_cluster_failed(cl, cmd))
        {
            ngx_http_civicgate_cluster_fail_slot(cl, cmd->slot);
            ngx_http_civicgate_redis_abandon(cmd, cl->router);
            continue;
        }

        node = ngx_http_civicgate_cluster_of(cl, cmd->slot);

        if (node == NULL) {
            ngx_http_civicgate_cluster_park(cl, cmd);
            continue;
        }

        (void) ngx_http_civicgate_redis_requeue(node->rc, cmd, 0);
    }
}


static void
ngx_http_civicgate_cluster_fail_slot(ngx_http_civicgate_cluster_t *cl,
    ngx_int_t slot)
{
    ngx_uint_t  i;

    if (slot < 0) {
        return;
    }

    i = cl->nfailed++ % NGX_HTTP_CIVICGATE_CLUSTER_FAILED;

    cl->failed[i].slot = slot;
    cl->failed[i].at = ngx_current_msec;
}


/* a command of a slot that failed since the command was first sent */

static ngx_uint_t
ngx_http_civicgate_cluster_failed(ngx_http_civicgate_cluster_t *cl,
    ngx_http_civicgate_redis_cmd_t *cmd)
{
    ngx_uint_t  i, n;

    if (cmd->slot < 0) {
        return 0;
    }

    n = ngx_min(cl->nfailed, NGX_HTTP_CIVICGATE_CLUSTER_FAILED);

    for (i = 0; i < n; i++) {
        if (cl->failed[i].slot == cmd->slot
            && (ngx_msec_int_t) (cl->failed[i].at - cmd->began) >= 0)
        {
            return 1;
        }
    }

    return 0;
}


static void
ngx_http_civicgate_cluster_reread(ngx_event_t *ev)
{
    ngx_http_civicgate_cluster_read_map(ev->data);
}


/* masters left out of the map for the reap interval are let go */

static void
ngx_http_civicgate_cluster_reap(ngx_event_t *ev)
{
    ngx_uint_t                          i, waiting;
    ngx_http_civicgate_cluster_t       *cl;
    ngx_http_civicgate_cluster_node_t  *node;

    cl = ev->data;
    waiting = 0;

    for (i = 0; i < NGX_HTTP_CIVICGATE_CLUSTER_NODES; i++) {
        node = cl->nodes[i];

        if (node == NULL || !node->retired) {
            continue;
        }

        if (ngx_current_msec - node->retired < NGX_HTTP_CIVICGATE_CLUSTER_REAP)
        {
            waiting = 1;
            continue;
        }

        ngx_log_error(NGX_LOG_INFO, cl->log, 0,
                      "civicgate: redis %V: %V serves no slot, "
                      "disconnected", &cl->conf->url, &node->name);

        ngx_http_civicgate_cluster_remove(cl, i);
    }

    if (waiting) {
        ngx_add_timer(&cl->reap, NGX_HTTP_CIVICGATE_CLUSTER_REAP);
    }
}


static ngx_uint_t
ngx_http_civicgate_cluster_is(redisReply *reply, const char *word, size_t len)
{
    return reply->len >= len && ngx_strncmp(reply->str, word, len) == 0;
}


/*
 * EVALSHA and EVAL: the first of their KEYS; the commands the gateway
 * sends without a key; every other: its first argument.
 */

ngx_int_t
ngx_http_civicgate_cluster_command_slot(int argc, const char **argv,
    const size_t *argvlen)
{
    ngx_int_t          nkeys;
    ngx_uint_t         i;
    const u_char      *name;

    static ngx_str_t   keyless[] = {
        ngx_string("PING"), ngx_string("PUBLISH"), ngx_string("SCRIPT"),
        ngx_string("CLUSTER"), ngx_string("INFO"), ngx_string("CLIENT"),
        ngx_string("ROLE"), ngx_string("ASKING")
    };

    name = (const u_char *) argv[0];

    if ((argvlen[0] == 7 && ngx_strncasecmp((u_char *) name,
                                            (u_char *) "EVALSHA", 7) == 0)
        || (argvlen[0] == 4 && ngx_strncasecmp((u_char *) name,
                                               (u_char *) "EVAL", 4) == 0))
    {
        if (argc < 4) {
            return -1;
        }

        nkeys = ngx_atoi((u_char *) argv[2], argvlen[2]);

        return nkeys > 0 ? (ngx_int_t) ngx_http_civicgate_key_slot(
                                           (const u_char *) argv[3],
                                           argvlen[3])
                         : -1;
    }

    for (i = 0; i < sizeof(keyless) / sizeof(ngx_str_t); i++) {
        if (argvlen[0] == keyless[i].len
            && ngx_strncasecmp((u_char *) name, keyless[i].data,
                               keyless[i].len) == 0)
        {
            return -1;
        }
    }

    if (argc < 2) {
        return -1;
    }

    return ngx_http_civicgate_key_slot((const u_char *) argv[1], argvlen[1]);
}
