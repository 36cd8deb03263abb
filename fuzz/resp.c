
/*
 * Copyright (C) civicgate authors
 */


/*
 * RESP replies through the client's reply path: the input's first byte
 * says how many commands wait for a reply (bits 0-2) and whether Redis
 * closes the connection after its bytes (bit 3); the rest is what Redis
 * sends.  The bytes arrive on a real socket and the module's read handler
 * feeds them to its hiredis reader, hands the replies to the waiting
 * commands in order and what is left over to the subscriber's message
 * handler; a protocol error or the close drops the connection as in a
 * worker.  Every waiting command is answered exactly once.
 */

#include "fuzz.h"
#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_redis.h"
#include "ngx_http_civicgate_consent.h"


#define FUZZ_COMMANDS  8


static ngx_connection_t   fuzz_connection;
static ngx_event_t        fuzz_read, fuzz_write;
static ngx_uint_t         fuzz_answered[FUZZ_COMMANDS];

static ngx_http_civicgate_redis_conf_t    *fuzz_rcf;
static ngx_http_civicgate_main_conf_t      fuzz_cgmcf;
static ngx_http_civicgate_consent_conf_t   fuzz_consent;
static ngx_http_conf_ctx_t                 fuzz_http;


/*
 * The http block's main configurations, as the modules find them: the
 * core's registry of channels, with consent's invalidation channel in it
 * as consent's postconfiguration puts it, and consent's own (no cache:
 * the invalidations are parsed, nothing to evict).
 */

static void
fuzz_http_conf(ngx_conf_t *cf)
{
    void        ****conf_ctx;
    ngx_uint_t      n;

    if (ngx_preinit_modules() != NGX_OK
        || ngx_cycle_modules(&fuzz_cycle) != NGX_OK)
    {
        abort();
    }

    n = ngx_count_modules(&fuzz_cycle, NGX_HTTP_MODULE);

    fuzz_http.main_conf = ngx_pcalloc(fuzz_cycle.pool, n * sizeof(void *));
    conf_ctx = ngx_pcalloc(fuzz_cycle.pool, ngx_max_module * sizeof(void *));

    if (fuzz_http.main_conf == NULL || conf_ctx == NULL
        || ngx_array_init(&fuzz_cgmcf.subscriptions, fuzz_cycle.pool, 2,
                          sizeof(ngx_http_civicgate_subscription_t))
           != NGX_OK)
    {
        abort();
    }

    fuzz_http.main_conf[ngx_http_civicgate_module.ctx_index] = &fuzz_cgmcf;
    fuzz_http.main_conf[ngx_http_civicgate_consent_module.ctx_index] =
                                                                &fuzz_consent;
    conf_ctx[ngx_http_module.index] = (void ***) &fuzz_http;
    fuzz_cycle.conf_ctx = conf_ctx;

    cf->ctx = &fuzz_http;

    if (ngx_http_civicgate_subscribe(cf,
                                     NGX_HTTP_CIVICGATE_KEY_CONSENT_CHANNEL,
                                     ngx_http_civicgate_consent_message, NULL)
        != NGX_OK)
    {
        abort();
    }
}


static void
fuzz_setup(void)
{
    ngx_conf_t     cf;
    ngx_command_t  cmd;

    fuzz_init();

    if (fuzz_rcf != NULL) {
        return;
    }

    /* one connection slot, as ngx_get_connection() takes them */
    fuzz_connection.read = &fuzz_read;
    fuzz_connection.write = &fuzz_write;
    fuzz_cycle.free_connections = &fuzz_connection;
    fuzz_cycle.free_connection_n = 1;

    if (ngx_event_timer_init(&fuzz_log) != NGX_OK) {
        abort();
    }

    fuzz_conf(&cf, fuzz_cycle.pool, 2);
    (void) fuzz_conf_arg(&cf, (u_char *) "civicgate_redis", 15);
    (void) fuzz_conf_arg(&cf, (u_char *) "redis://127.0.0.1:6379", 22);

    ngx_memzero(&cmd, sizeof(cmd));

    if (ngx_http_civicgate_redis(&cf, &cmd, &fuzz_rcf) != NGX_CONF_OK) {
        abort();
    }

    fuzz_http_conf(&cf);
}


static void
fuzz_reply(ngx_http_civicgate_redis_cmd_t *cmd, redisReply *reply)
{
    ngx_uint_t  *answered = cmd->data;

    (*answered)++;
}


static ngx_connection_t *
fuzz_connect(ngx_http_civicgate_redis_t *rc, int fd)
{
    ngx_connection_t  *c;

    c = ngx_get_connection(fd, &fuzz_log);

    if (c == NULL || ngx_nonblocking(fd) == -1) {
        abort();
    }

    c->recv = ngx_recv;
    c->data = rc;

    /* as ngx_http_civicgate_redis_connect() once the peer answered */
    rc->pool = ngx_create_pool(1024, &fuzz_log);
    rc->reader = redisReaderCreate();

    if (rc->pool == NULL || rc->reader == NULL) {
        abort();
    }

    c->pool = rc->pool;
    rc->peer.connection = c;
    rc->state = NGX_HTTP_CIVICGATE_REDIS_READY;
    rc->connected = 1;

    return c;
}


static void
fuzz_queue(ngx_http_civicgate_redis_t *rc, ngx_uint_t n)
{
    ngx_uint_t                       i;
    ngx_http_civicgate_redis_cmd_t  *cmd;

    for (i = 0; i < n; i++) {
        cmd = ngx_alloc(sizeof(ngx_http_civicgate_redis_cmd_t), &fuzz_log);
        if (cmd == NULL) {
            abort();
        }

        ngx_memzero(cmd, sizeof(ngx_http_civicgate_redis_cmd_t));
        cmd->handler = fuzz_reply;
        cmd->data = &fuzz_answered[i];
        cmd->redis = rc;

        fuzz_answered[i] = 0;
        ngx_queue_insert_tail(&rc->sent, &cmd->queue);
        rc->nsent++;
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int                          fds[2];
    ssize_t                      n;
    ngx_uint_t                   i, ncmds;
    ngx_connection_t            *c;
    ngx_http_civicgate_redis_t  *rc;

    fuzz_setup();

    if (size == 0) {
        return 0;
    }

    if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0
        || ngx_nonblocking(fds[1]) == -1)
    {
        abort();
    }

    /* what does not fit the socket's buffer at once is not sent */
    n = size > 1 ? write(fds[1], data + 1, size - 1) : 0;
    (void) n;

    if (data[0] & 0x08) {
        close(fds[1]);
        fds[1] = -1;
    }

    rc = ngx_http_civicgate_redis_create(&fuzz_cycle, fuzz_rcf);
    if (rc == NULL) {
        abort();
    }

    rc->on_message = ngx_http_civicgate_pubsub_message;
    rc->data = &fuzz_cgmcf;

    c = fuzz_connect(rc, fds[0]);

    ncmds = data[0] & 0x07;
    fuzz_queue(rc, ncmds);

    ngx_http_civicgate_redis_read(c->read);

    /* what is still waiting fails now, as when a worker exits */
    ngx_http_civicgate_redis_destroy(rc);

    for (i = 0; i < ncmds; i++) {
        if (fuzz_answered[i] != 1) {
            abort();
        }
    }

    if (fds[1] != -1) {
        close(fds[1]);
    }

    return 0;
}
