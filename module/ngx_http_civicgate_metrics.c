
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_metrics.h"


/* fixed, so that counters survive reloads that add labels */
#define NGX_HTTP_CIVICGATE_METRICS_ZONE_SIZE  (256 * 1024)

/* families of series, allocated once (they are referenced by pointer) */
#define NGX_HTTP_CIVICGATE_METRICS_FAMILIES   32

/* process slots whose gauge contributions are kept in shared memory */
#define NGX_HTTP_CIVICGATE_METRICS_SLOTS      128


/*
 * The cells of one label layout: the series, then per process slot its
 * pid and what it added to each gauge series, so that what a worker held
 * when it exited, or crashed, can be taken back.
 */
typedef struct {
    uint32_t                       signature;
    ngx_uint_t                     ncells;
    ngx_uint_t                     ngauges;
    ngx_atomic_t                   cells[1];
} ngx_http_civicgate_metrics_block_t;


struct ngx_http_civicgate_metrics_sh_s {
    ngx_atomic_t                   maintenance;
    ngx_http_civicgate_metrics_block_t  *block;
    ngx_http_civicgate_metrics_block_t  *previous;  /* old workers' */
};


static ngx_int_t ngx_http_civicgate_metrics_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static ngx_int_t ngx_http_civicgate_metrics_requests(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf);
static ngx_int_t ngx_http_civicgate_metrics_redis(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m);
static ngx_int_t ngx_http_civicgate_metrics_labels(ngx_conf_t *cf,
    ngx_http_civicgate_family_t *f, const char *name, const char **values);
static uint32_t ngx_http_civicgate_metrics_signature(
    ngx_http_civicgate_metrics_t *m);
static size_t ngx_http_civicgate_metrics_block_size(ngx_uint_t ncells,
    ngx_uint_t ngauges);
static void ngx_http_civicgate_metrics_reclaim(ngx_http_civicgate_metrics_t *m);
static void ngx_http_civicgate_metrics_release(ngx_http_civicgate_metrics_t *m,
    ngx_atomic_t *gauges);
static size_t ngx_http_civicgate_metrics_size(ngx_http_civicgate_metrics_t *m);
static u_char *ngx_http_civicgate_metrics_write(u_char *p,
    ngx_http_civicgate_metrics_t *m);
static u_char *ngx_http_civicgate_metrics_write_histogram(u_char *p,
    ngx_http_civicgate_family_t *f, ngx_str_t *label, ngx_atomic_t *cells);


static ngx_str_t  ngx_http_civicgate_metrics_zone_name =
    ngx_string("civicgate_metrics");


static const uint64_t  ngx_http_civicgate_request_bounds[] = {
    5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000, 2500000,
    5000000, 10000000
};

static const char  *ngx_http_civicgate_request_le[] = {
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5",
    "10"
};

static ngx_http_civicgate_buckets_t  ngx_http_civicgate_request_buckets = {
    sizeof(ngx_http_civicgate_request_bounds) / sizeof(uint64_t),
    ngx_http_civicgate_request_bounds,
    ngx_http_civicgate_request_le
};


static const uint64_t  ngx_http_civicgate_redis_bounds[] = {
    100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000
};

static const char  *ngx_http_civicgate_redis_le[] = {
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01",
    "0.025", "0.05", "0.1", "0.25"
};

static ngx_http_civicgate_buckets_t  ngx_http_civicgate_redis_buckets = {
    sizeof(ngx_http_civicgate_redis_bounds) / sizeof(uint64_t),
    ngx_http_civicgate_redis_bounds,
    ngx_http_civicgate_redis_le
};


static const char  *ngx_http_civicgate_journey_results[] = {
    "minted", "reused", "forged", NULL
};

static const char  *ngx_http_civicgate_event_results[] = {
    "written", "spooled", "dropped", "failed", NULL
};

static const char  *ngx_http_civicgate_redis_kinds[] = {
    "timeout", "connection", "reply", NULL
};

static const char  *ngx_http_civicgate_redis_roles[] = {
    "command", "subscriber", "sentinel", NULL
};


ngx_http_civicgate_metrics_t *
ngx_http_civicgate_metrics_create(ngx_conf_t *cf)
{
    ngx_http_civicgate_metrics_t  *m;

    m = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_metrics_t));
    if (m == NULL) {
        return NULL;
    }

    if (ngx_array_init(&m->families, cf->pool,
                       NGX_HTTP_CIVICGATE_METRICS_FAMILIES,
                       sizeof(ngx_http_civicgate_family_t))
        != NGX_OK)
    {
        return NULL;
    }

    m->slot = -1;

    return m;
}


ngx_http_civicgate_family_t *
ngx_http_civicgate_metrics_family(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m, char *name, const char *help,
    ngx_uint_t type)
{
    ngx_http_civicgate_family_t  *f;

    /* concerns keep pointers to their families: the array must not move */
    if (m->families.nelts == m->families.nalloc) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "too many metrics families for \"%s\"", name);
        return NULL;
    }

    f = ngx_array_push(&m->families);
    if (f == NULL) {
        return NULL;
    }

    ngx_memzero(f, sizeof(ngx_http_civicgate_family_t));

    f->name.data = (u_char *) name;
    f->name.len = ngx_strlen(name);
    f->help = help;
    f->type = type;
    f->cells = (type == NGX_HTTP_CIVICGATE_STATE
                || type == NGX_HTTP_CIVICGATE_SAMPLED) ? 0 : 1;

    if (ngx_array_init(&f->labels, cf->pool, 8, sizeof(ngx_str_t)) != NGX_OK) {
        return NULL;
    }

    return f;
}


/* per label set: a cell per bucket, one for +Inf, one for the sum */

ngx_http_civicgate_family_t *
ngx_http_civicgate_metrics_histogram(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m, char *name, const char *help,
    ngx_http_civicgate_buckets_t *buckets)
{
    ngx_http_civicgate_family_t  *f;

    f = ngx_http_civicgate_metrics_family(cf, m, name, help,
                                          NGX_HTTP_CIVICGATE_HISTOGRAM);
    if (f == NULL) {
        return NULL;
    }

    f->buckets = buckets;
    f->cells = buckets->n + 2;

    return f;
}


/*
 * A gauge without labels whose value another concern reads when the
 * metrics are scraped (what it measures lives in that concern's memory).
 */

ngx_int_t
ngx_http_civicgate_metrics_sampled(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m, char *name, const char *help,
    ngx_http_civicgate_sample_pt sample)
{
    ngx_http_civicgate_family_t  *f;

    f = ngx_http_civicgate_metrics_family(cf, m, name, help,
                                          NGX_HTTP_CIVICGATE_SAMPLED);
    if (f == NULL) {
        return NGX_ERROR;
    }

    f->sample = sample;

    return ngx_http_civicgate_metrics_label(cf, f, "");
}


/* label sets are formatted once, from configured names only */

ngx_int_t
ngx_http_civicgate_metrics_label(ngx_conf_t *cf, ngx_http_civicgate_family_t *f,
    const char *fmt, ...)
{
    u_char      buf[512], *p;
    va_list     args;
    ngx_str_t  *label;

    va_start(args, fmt);
    p = ngx_vslprintf(buf, buf + sizeof(buf), fmt, args);
    va_end(args);

    label = ngx_array_push(&f->labels);
    if (label == NULL) {
        return NGX_ERROR;
    }

    label->len = p - buf;
    label->data = ngx_pstrdup(cf->pool, &(ngx_str_t) { p - buf, buf });
    if (label->data == NULL) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* one label, one series per value */

static ngx_int_t
ngx_http_civicgate_metrics_labels(ngx_conf_t *cf,
    ngx_http_civicgate_family_t *f, const char *name, const char **values)
{
    if (f == NULL) {
        return NGX_ERROR;
    }

    if (name == NULL) {
        return ngx_http_civicgate_metrics_label(cf, f, "");
    }

    for ( /* void */ ; *values; values++) {
        if (ngx_http_civicgate_metrics_label(cf, f, "{%s=\"%s\"}", name,
                                             *values)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_civicgate_metrics_init_conf(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf)
{
    ngx_http_civicgate_metrics_t  *m;

    m = cgmcf->metrics;

    m->journeys = ngx_http_civicgate_metrics_family(cf, m,
                      "civicgate_journeys_total",
                      "Journey IDs by outcome: minted, reused, or forged "
                      "(presented but invalid, then replaced).",
                      NGX_HTTP_CIVICGATE_COUNTER);

    if (ngx_http_civicgate_metrics_labels(cf, m->journeys, "result",
                                          ngx_http_civicgate_journey_results)
        != NGX_OK
        || ngx_http_civicgate_metrics_requests(cf, cgmcf) != NGX_OK)
    {
        return NGX_ERROR;
    }

    m->events = ngx_http_civicgate_metrics_family(cf, m,
                    "civicgate_events_total",
                    "Journey events: written to Redis, spooled while Redis "
                    "was unreachable, dropped from a full spool, and write "
                    "attempts that failed (then spooled or retried).",
                    NGX_HTTP_CIVICGATE_COUNTER);

    if (ngx_http_civicgate_metrics_labels(cf, m->events, "result",
                                          ngx_http_civicgate_event_results)
        != NGX_OK
        || ngx_http_civicgate_metrics_redis(cf, m) != NGX_OK)
    {
        return NGX_ERROR;
    }

    m->maintenance = ngx_http_civicgate_metrics_family(cf, m,
                         "civicgate_maintenance",
                         "1 while this gateway is in maintenance (its health "
                         "endpoints answer 503), else 0.",
                         NGX_HTTP_CIVICGATE_STATE);

    return ngx_http_civicgate_metrics_labels(cf, m->maintenance, NULL, NULL);
}


/* channel x service x status class, and the latency by service */

static ngx_int_t
ngx_http_civicgate_metrics_requests(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf)
{
    ngx_str_t                     *service, none = ngx_string("none");
    ngx_uint_t                     i, j, k;
    ngx_http_civicgate_bytes_t     unknown = { 7, (u_char *) "unknown" };
    ngx_http_civicgate_bytes_t    *channel;
    ngx_http_civicgate_metrics_t  *m;

    m = cgmcf->metrics;
    service = cgmcf->services.elts;
    m->nservices = cgmcf->services.nelts;

    m->requests = ngx_http_civicgate_metrics_family(cf, m,
                      "civicgate_requests_total",
                      "Requests by channel, service and status class.",
                      NGX_HTTP_CIVICGATE_COUNTER);
    m->duration = ngx_http_civicgate_metrics_histogram(cf, m,
                      "civicgate_request_duration_seconds",
                      "Request time by service, from the first byte read "
                      "to the log phase.",
                      &ngx_http_civicgate_request_buckets);

    if (m->requests == NULL || m->duration == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i <= cgmcf->nchannels; i++) {
        channel = (i < cgmcf->nchannels) ? &cgmcf->channels[i] : &unknown;

        for (j = 0; j <= m->nservices; j++) {
            for (k = 1; k <= NGX_HTTP_CIVICGATE_STATUS_CLASSES; k++) {
                if (ngx_http_civicgate_metrics_label(cf, m->requests,
                        "{channel=\"%*s\",service=\"%V\",status=\"%uixx\"}",
                        channel->len, channel->data,
                        j < m->nservices ? &service[j] : &none, k)
                    != NGX_OK)
                {
                    return NGX_ERROR;
                }
            }
        }
    }

    for (j = 0; j <= m->nservices; j++) {
        if (ngx_http_civicgate_metrics_label(cf, m->duration,
                "{service=\"%V\"}", j < m->nservices ? &service[j] : &none)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_metrics_redis(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m)
{
    m->redis_commands = ngx_http_civicgate_metrics_family(cf, m,
                            "civicgate_redis_commands_total",
                            "Commands sent to Redis, connection setup "
                            "included.", NGX_HTTP_CIVICGATE_COUNTER);
    m->redis_errors = ngx_http_civicgate_metrics_family(cf, m,
                            "civicgate_redis_errors_total",
                            "Redis failures: commands timed out, connections "
                            "failed or lost, error replies.",
                            NGX_HTTP_CIVICGATE_COUNTER);
    m->redis_reconnects = ngx_http_civicgate_metrics_family(cf, m,
                            "civicgate_redis_reconnects_total",
                            "Attempts to connect to Redis again after a "
                            "failure.", NGX_HTTP_CIVICGATE_COUNTER);
    m->redis_duration = ngx_http_civicgate_metrics_histogram(cf, m,
                            "civicgate_redis_command_duration_seconds",
                            "Time from queueing a Redis command to its "
                            "reply.", &ngx_http_civicgate_redis_buckets);
    m->redis_connections = ngx_http_civicgate_metrics_family(cf, m,
                            "civicgate_redis_connections",
                            "Redis connections open and set up, summed over "
                            "the worker processes.",
                            NGX_HTTP_CIVICGATE_GAUGE);
    m->redis_failovers = ngx_http_civicgate_metrics_family(cf, m,
                            "civicgate_redis_failovers_total",
                            "Changes of the Redis master seen through the "
                            "Sentinels.", NGX_HTTP_CIVICGATE_COUNTER);

    if (ngx_http_civicgate_metrics_labels(cf, m->redis_commands, NULL, NULL)
        != NGX_OK
        || ngx_http_civicgate_metrics_labels(cf, m->redis_errors, "kind",
                                             ngx_http_civicgate_redis_kinds)
           != NGX_OK
        || ngx_http_civicgate_metrics_labels(cf, m->redis_reconnects, NULL,
                                             NULL)
           != NGX_OK
        || ngx_http_civicgate_metrics_labels(cf, m->redis_duration, NULL, NULL)
           != NGX_OK
        || ngx_http_civicgate_metrics_labels(cf, m->redis_connections, "role",
                                             ngx_http_civicgate_redis_roles)
           != NGX_OK
        || ngx_http_civicgate_metrics_labels(cf, m->redis_failovers, NULL,
                                             NULL)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_civicgate_metrics_zone(ngx_conf_t *cf, ngx_http_civicgate_metrics_t *m)
{
    ngx_uint_t                    i, n, g;
    ngx_http_civicgate_family_t  *f;

    f = m->families.elts;
    n = 0;
    g = 0;

    for (i = 0; i < m->families.nelts; i++) {
        f[i].offset = n;
        n += f[i].labels.nelts * f[i].cells;

        if (f[i].type == NGX_HTTP_CIVICGATE_GAUGE) {
            f[i].gauge = g;
            g += f[i].labels.nelts;
        }
    }

    m->ncells = n;
    m->ngauges = g;
    m->signature = ngx_http_civicgate_metrics_signature(m);

    /* room for the layout of the old workers and the new, across a reload */
    if (ngx_http_civicgate_metrics_block_size(n, g)
        > NGX_HTTP_CIVICGATE_METRICS_ZONE_SIZE / 3)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "too many metrics series: %ui cells", n);
        return NGX_ERROR;
    }

    m->zone = ngx_shared_memory_add(cf, &ngx_http_civicgate_metrics_zone_name,
                                    NGX_HTTP_CIVICGATE_METRICS_ZONE_SIZE,
                                    &ngx_http_civicgate_module);
    if (m->zone == NULL) {
        return NGX_ERROR;
    }

    m->zone->init = ngx_http_civicgate_metrics_init_zone;
    m->zone->data = m;
    m->zone->noreuse = 0;

    return NGX_OK;
}


static size_t
ngx_http_civicgate_metrics_block_size(ngx_uint_t ncells, ngx_uint_t ngauges)
{
    return offsetof(ngx_http_civicgate_metrics_block_t, cells)
           + (ncells + NGX_HTTP_CIVICGATE_METRICS_SLOTS * (1 + ngauges))
             * sizeof(ngx_atomic_t);
}


/*
 * The header (the maintenance flag) lives as long as the zone.  A reload
 * that keeps the label layout keeps the counters; one that changes it
 * starts a new block, and the old workers go on with theirs until they
 * exit (the block before that is freed only if room runs out).
 */

static ngx_int_t
ngx_http_civicgate_metrics_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_civicgate_metrics_t  *m = shm_zone->data;

    size_t                               size;
    ngx_slab_pool_t                     *shpool;
    ngx_http_civicgate_metrics_sh_t     *sh;
    ngx_http_civicgate_metrics_block_t  *b;

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists || data != NULL) {
        sh = shpool->data;

    } else {
        sh = ngx_slab_calloc(shpool, sizeof(ngx_http_civicgate_metrics_sh_t));
        if (sh == NULL) {
            return NGX_ERROR;
        }

        shpool->data = sh;
    }

    m->sh = sh;
    b = sh->block;

    if (b != NULL && b->signature == m->signature
        && b->ncells == m->ncells && b->ngauges == m->ngauges)
    {
        m->counters = b->cells;
        return NGX_OK;
    }

    /* the label layout changed: old counters would be misattributed */

    size = ngx_http_civicgate_metrics_block_size(m->ncells, m->ngauges);

    b = ngx_slab_calloc(shpool, size);

    if (b == NULL && sh->previous != NULL) {
        ngx_slab_free(shpool, sh->previous);
        sh->previous = NULL;
        b = ngx_slab_calloc(shpool, size);
    }

    if (b == NULL) {
        return NGX_ERROR;
    }

    b->signature = m->signature;
    b->ncells = m->ncells;
    b->ngauges = m->ngauges;

    if (sh->previous != NULL) {
        ngx_slab_free(shpool, sh->previous);
    }

    sh->previous = sh->block;
    sh->block = b;
    m->counters = b->cells;

    return NGX_OK;
}


static uint32_t
ngx_http_civicgate_metrics_signature(ngx_http_civicgate_metrics_t *m)
{
    uint32_t                      crc;
    ngx_str_t                    *label;
    ngx_uint_t                    i, j;
    ngx_http_civicgate_family_t  *f;

    ngx_crc32_init(crc);

    f = m->families.elts;

    for (i = 0; i < m->families.nelts; i++) {
        ngx_crc32_update(&crc, f[i].name.data, f[i].name.len);
        ngx_crc32_update(&crc, (u_char *) &f[i].cells, sizeof(ngx_uint_t));

        label = f[i].labels.elts;
        for (j = 0; j < f[i].labels.nelts; j++) {
            ngx_crc32_update(&crc, label[j].data, label[j].len);
        }
    }

    ngx_crc32_final(crc);

    return crc;
}


/*
 * A worker's gauge contributions are kept in the slot of its process: a
 * worker that takes a slot over after a crash first gives back what the
 * crashed one held, and slots of processes gone are given back too.
 */

void
ngx_http_civicgate_metrics_init_worker(ngx_http_civicgate_metrics_t *m)
{
    ngx_atomic_t     *slot;
    ngx_slab_pool_t  *shpool;

    if (m->counters == NULL || m->ngauges == 0) {
        return;
    }

    shpool = (ngx_slab_pool_t *) m->zone->shm.addr;

    ngx_shmtx_lock(&shpool->mutex);

    ngx_http_civicgate_metrics_reclaim(m);

    if (ngx_process_slot >= 0
        && ngx_process_slot < NGX_HTTP_CIVICGATE_METRICS_SLOTS)
    {
        slot = &m->counters[m->ncells + ngx_process_slot * (1 + m->ngauges)];

        if (slot[0] != 0) {
            ngx_http_civicgate_metrics_release(m, slot);
        }

        slot[0] = ngx_pid;
        m->slot = ngx_process_slot;
        m->mine = slot + 1;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    if (m->mine == NULL) {
        /* without a slot, only a clean exit gives the gauges back */
        slot = ngx_calloc((1 + m->ngauges) * sizeof(ngx_atomic_t),
                          ngx_cycle->log);
        m->mine = slot ? slot + 1 : NULL;
    }
}


void
ngx_http_civicgate_metrics_exit_worker(ngx_http_civicgate_metrics_t *m)
{
    ngx_slab_pool_t  *shpool;

    if (m->mine == NULL) {
        return;
    }

    if (m->slot < 0) {
        ngx_http_civicgate_metrics_release(m, m->mine - 1);
        ngx_free((void *) (m->mine - 1));
        m->mine = NULL;
        return;
    }

    shpool = (ngx_slab_pool_t *) m->zone->shm.addr;

    ngx_shmtx_lock(&shpool->mutex);
    ngx_http_civicgate_metrics_release(m, m->mine - 1);
    ngx_shmtx_unlock(&shpool->mutex);

    m->mine = NULL;
}


/* under the zone's mutex: slots of processes that no longer exist */

static void
ngx_http_civicgate_metrics_reclaim(ngx_http_civicgate_metrics_t *m)
{
    ngx_pid_t      pid;
    ngx_uint_t     s;
    ngx_atomic_t  *slot;

    for (s = 0; s < NGX_HTTP_CIVICGATE_METRICS_SLOTS; s++) {
        slot = &m->counters[m->ncells + s * (1 + m->ngauges)];
        pid = (ngx_pid_t) slot[0];

        if (pid == 0 || pid == ngx_pid) {
            continue;
        }

        if (kill(pid, 0) == -1 && ngx_errno == NGX_ESRCH) {
            ngx_http_civicgate_metrics_release(m, slot);
        }
    }
}


/* gauges[0] is the pid (unused without a slot), then one per gauge series */

static void
ngx_http_civicgate_metrics_release(ngx_http_civicgate_metrics_t *m,
    ngx_atomic_t *gauges)
{
    ngx_uint_t                    i, j;
    ngx_atomic_t                  n;
    ngx_http_civicgate_family_t  *f;

    f = m->families.elts;

    for (i = 0; i < m->families.nelts; i++) {
        if (f[i].type != NGX_HTTP_CIVICGATE_GAUGE) {
            continue;
        }

        for (j = 0; j < f[i].labels.nelts; j++) {
            n = gauges[1 + f[i].gauge + j];

            if (n != 0) {
                (void) ngx_atomic_fetch_add(&m->counters[f[i].offset + j],
                                            -(ngx_atomic_int_t) n);
                gauges[1 + f[i].gauge + j] = 0;
            }
        }
    }

    gauges[0] = 0;
}


/*
 * Adds n to the series "label" (an index in the family's label sets) of f.
 * Counters take n > 0.  Gauges take +n and -n from worker processes: what
 * a worker added and did not take back is taken back when it exits, or
 * when it is found dead.  Families and their labels are declared at
 * configuration, before ngx_http_civicgate_metrics_zone().
 */

void
ngx_http_civicgate_metrics_add(ngx_http_civicgate_metrics_t *m,
    ngx_http_civicgate_family_t *f, ngx_uint_t label, ngx_atomic_int_t n)
{
    if (m->counters == NULL || label >= f->labels.nelts) {
        return;
    }

    (void) ngx_atomic_fetch_add(&m->counters[f->offset + label], n);

    /* only this process writes its own contributions */
    if (f->type == NGX_HTTP_CIVICGATE_GAUGE && m->mine != NULL) {
        m->mine[f->gauge + label] += n;
    }
}


/* a bucket and the sum in microseconds: the count is the buckets' sum */

void
ngx_http_civicgate_metrics_observe(ngx_http_civicgate_metrics_t *m,
    ngx_http_civicgate_family_t *f, ngx_uint_t label, uint64_t us)
{
    ngx_uint_t     i;
    ngx_atomic_t  *cells;

    if (m->counters == NULL || label >= f->labels.nelts) {
        return;
    }

    for (i = 0; i < f->buckets->n && us > f->buckets->bounds[i]; i++) {
        /* void */
    }

    cells = &m->counters[f->offset + label * f->cells];

    (void) ngx_atomic_fetch_add(&cells[i], 1);
    (void) ngx_atomic_fetch_add(&cells[f->buckets->n + 1], us);
}


/* set: 1 on, 0 off, -1 to read only; returns the flag */

ngx_uint_t
ngx_http_civicgate_metrics_maintenance(ngx_http_civicgate_metrics_t *m,
    ngx_int_t set)
{
    if (m->sh == NULL) {
        return 0;
    }

    if (set >= 0) {
        m->sh->maintenance = set ? 1 : 0;
        ngx_memory_barrier();
    }

    return m->sh->maintenance ? 1 : 0;
}


/* the Prometheus text of every series, for the metrics endpoint */

ngx_int_t
ngx_http_civicgate_metrics_handler(ngx_http_request_t *r)
{
    ngx_int_t                        rc;
    ngx_buf_t                       *b;
    ngx_chain_t                      out;
    ngx_slab_pool_t                 *shpool;
    ngx_http_civicgate_metrics_t    *m;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    m = cgmcf->metrics;

    /* gauges held by processes that died without exiting */
    if (m->counters != NULL && m->ngauges) {
        shpool = (ngx_slab_pool_t *) m->zone->shm.addr;

        ngx_shmtx_lock(&shpool->mutex);
        ngx_http_civicgate_metrics_reclaim(m);
        ngx_shmtx_unlock(&shpool->mutex);
    }

    ngx_str_set(&r->headers_out.content_type,
                "text/plain; version=0.0.4; charset=utf-8");
    r->headers_out.content_type_len = sizeof("text/plain") - 1;
    r->headers_out.content_type_lowcase = NULL;

    b = ngx_create_temp_buf(r->pool, ngx_http_civicgate_metrics_size(m));
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_http_civicgate_metrics_write(b->last, m);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = b->last - b->pos;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


static size_t
ngx_http_civicgate_metrics_size(ngx_http_civicgate_metrics_t *m)
{
    size_t                        size, line;
    ngx_str_t                    *label;
    ngx_uint_t                    i, j;
    ngx_http_civicgate_family_t  *f;

    size = 0;
    f = m->families.elts;

    for (i = 0; i < m->families.nelts; i++) {
        size += sizeof("# HELP  \n# TYPE  histogram\n") - 1
                + 2 * f[i].name.len + ngx_strlen(f[i].help);

        label = f[i].labels.elts;
        for (j = 0; j < f[i].labels.nelts; j++) {

            /* name, suffix, labels, le="...", a value */
            line = f[i].name.len + label[j].len + 48 + 2 * NGX_ATOMIC_T_LEN;

            size += (f[i].type == NGX_HTTP_CIVICGATE_HISTOGRAM)
                    ? line * (f[i].buckets->n + 3) : line;
        }
    }

    return size;
}


static u_char *
ngx_http_civicgate_metrics_write(u_char *p, ngx_http_civicgate_metrics_t *m)
{
    ngx_str_t                    *label;
    ngx_uint_t                    i, j;
    ngx_atomic_t                 *cell;
    ngx_http_civicgate_family_t  *f;

    static const char  *types[] = { "counter", "gauge", "histogram", "gauge",
                                    "gauge" };

    f = m->families.elts;

    for (i = 0; i < m->families.nelts; i++) {
        p = ngx_sprintf(p, "# HELP %V %s\n# TYPE %V %s\n",
                        &f[i].name, f[i].help, &f[i].name, types[f[i].type]);

        label = f[i].labels.elts;
        for (j = 0; j < f[i].labels.nelts; j++) {
            cell = m->counters ? &m->counters[f[i].offset + j * f[i].cells]
                               : NULL;

            switch (f[i].type) {

            case NGX_HTTP_CIVICGATE_HISTOGRAM:
                p = ngx_http_civicgate_metrics_write_histogram(p, &f[i],
                                                               &label[j],
                                                               cell);
                break;

            case NGX_HTTP_CIVICGATE_GAUGE:
                p = ngx_sprintf(p, "%V%V %A\n", &f[i].name, &label[j],
                                cell ? (ngx_atomic_int_t) *cell : 0);
                break;

            case NGX_HTTP_CIVICGATE_STATE:
                p = ngx_sprintf(p, "%V%V %ui\n", &f[i].name, &label[j],
                                ngx_http_civicgate_metrics_maintenance(m, -1));
                break;

            case NGX_HTTP_CIVICGATE_SAMPLED:
                p = ngx_sprintf(p, "%V%V %ui\n", &f[i].name, &label[j],
                                f[i].sample());
                break;

            default:
                p = ngx_sprintf(p, "%V%V %uA\n", &f[i].name, &label[j],
                                cell ? *cell : 0);
            }
        }
    }

    return p;
}


/* cumulative buckets from one reading of each cell; _count is +Inf's */

static u_char *
ngx_http_civicgate_metrics_write_histogram(u_char *p,
    ngx_http_civicgate_family_t *f, ngx_str_t *label, ngx_atomic_t *cells)
{
    ngx_str_t      open;
    ngx_uint_t     i, n;
    ngx_atomic_t   total, sum;
    const char    *sep;

    n = f->buckets->n;
    total = 0;

    /* "{a=\"b\"}" becomes "{a=\"b\",le=...}" */
    open.data = label->len ? label->data : (u_char *) "{";
    open.len = label->len ? label->len - 1 : 1;
    sep = label->len ? "," : "";

    for (i = 0; i <= n; i++) {
        total += cells ? cells[i] : 0;

        p = ngx_sprintf(p, "%V_bucket%V%sle=\"%s\"} %uA\n", &f->name, &open,
                        sep, i < n ? f->buckets->le[i] : "+Inf", total);
    }

    sum = cells ? cells[n + 1] : 0;

    return ngx_sprintf(p, "%V_sum%V %uA.%06uA\n%V_count%V %uA\n",
                       &f->name, label, sum / 1000000, sum % 1000000,
                       &f->name, label, total);
}
