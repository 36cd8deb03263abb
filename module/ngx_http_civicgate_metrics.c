
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_metrics.h"


/* fixed, so that counters survive reloads that add labels */
#define NGX_HTTP_CIVICGATE_METRICS_ZONE_SIZE  (256 * 1024)


typedef struct {
    uint32_t                       signature;
    ngx_uint_t                     ncounters;
    ngx_atomic_t                   counters[1];
} ngx_http_civicgate_metrics_sh_t;


static ngx_int_t ngx_http_civicgate_metrics_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static uint32_t ngx_http_civicgate_metrics_signature(
    ngx_http_civicgate_metrics_t *m);
static ngx_int_t ngx_http_civicgate_metrics_handler(ngx_http_request_t *r);
static size_t ngx_http_civicgate_metrics_size(ngx_http_civicgate_metrics_t *m);
static u_char *ngx_http_civicgate_metrics_write(u_char *p,
    ngx_http_civicgate_metrics_t *m);


static ngx_str_t  ngx_http_civicgate_metrics_zone_name =
    ngx_string("civicgate_metrics");


ngx_http_civicgate_metrics_t *
ngx_http_civicgate_metrics_create(ngx_conf_t *cf)
{
    ngx_http_civicgate_metrics_t  *m;

    m = ngx_pcalloc(cf->pool, sizeof(ngx_http_civicgate_metrics_t));
    if (m == NULL) {
        return NULL;
    }

    if (ngx_array_init(&m->families, cf->pool, 16,
                       sizeof(ngx_http_civicgate_family_t))
        != NGX_OK)
    {
        return NULL;
    }

    return m;
}


ngx_http_civicgate_family_t *
ngx_http_civicgate_metrics_family(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m, char *name, const char *help,
    ngx_uint_t type)
{
    ngx_http_civicgate_family_t  *f;

    f = ngx_array_push(&m->families);
    if (f == NULL) {
        return NULL;
    }

    f->name.data = (u_char *) name;
    f->name.len = ngx_strlen(name);
    f->help = help;
    f->type = type;
    f->offset = 0;

    if (ngx_array_init(&f->labels, cf->pool, 8, sizeof(ngx_str_t)) != NGX_OK) {
        return NULL;
    }

    return f;
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


ngx_int_t
ngx_http_civicgate_metrics_init_conf(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf)
{
    ngx_uint_t                     i;
    ngx_http_civicgate_metrics_t  *m;

    m = cgmcf->metrics;

    m->journeys = ngx_http_civicgate_metrics_family(cf, m,
                      "civicgate_journeys_total",
                      "Journey IDs by outcome: minted, reused, or forged "
                      "(presented but invalid, then replaced).",
                      NGX_HTTP_CIVICGATE_COUNTER);
    if (m->journeys == NULL
        || ngx_http_civicgate_metrics_label(cf, m->journeys,
                                            "{result=\"minted\"}") != NGX_OK
        || ngx_http_civicgate_metrics_label(cf, m->journeys,
                                            "{result=\"reused\"}") != NGX_OK
        || ngx_http_civicgate_metrics_label(cf, m->journeys,
                                            "{result=\"forged\"}") != NGX_OK)
    {
        return NGX_ERROR;
    }

    m->requests = ngx_http_civicgate_metrics_family(cf, m,
                      "civicgate_requests_total",
                      "Requests by channel.", NGX_HTTP_CIVICGATE_COUNTER);
    if (m->requests == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i <= cgmcf->nchannels; i++) {
        if (ngx_http_civicgate_metrics_label(cf, m->requests,
                "{channel=\"%*s\"}",
                i < cgmcf->nchannels ? cgmcf->channels[i].len : 7,
                i < cgmcf->nchannels ? cgmcf->channels[i].data
                                     : (u_char *) "unknown")
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    m->events = ngx_http_civicgate_metrics_family(cf, m,
                    "civicgate_events_total",
                    "Journey events: written to Redis, spooled while Redis "
                    "was unreachable, dropped from a full spool, and write "
                    "attempts that failed (then spooled or retried).",
                    NGX_HTTP_CIVICGATE_COUNTER);
    if (m->events == NULL
        || ngx_http_civicgate_metrics_label(cf, m->events,
                                            "{result=\"written\"}") != NGX_OK
        || ngx_http_civicgate_metrics_label(cf, m->events,
                                            "{result=\"spooled\"}") != NGX_OK
        || ngx_http_civicgate_metrics_label(cf, m->events,
                                            "{result=\"dropped\"}") != NGX_OK
        || ngx_http_civicgate_metrics_label(cf, m->events,
                                            "{result=\"failed\"}") != NGX_OK)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


ngx_int_t
ngx_http_civicgate_metrics_zone(ngx_conf_t *cf, ngx_http_civicgate_metrics_t *m)
{
    ngx_uint_t                    i, n;
    ngx_http_civicgate_family_t  *f;

    f = m->families.elts;
    n = 0;

    for (i = 0; i < m->families.nelts; i++) {
        f[i].offset = n;
        n += f[i].labels.nelts;
    }

    m->ncounters = n;
    m->signature = ngx_http_civicgate_metrics_signature(m);

    if (sizeof(ngx_http_civicgate_metrics_sh_t) + n * sizeof(ngx_atomic_t)
        > NGX_HTTP_CIVICGATE_METRICS_ZONE_SIZE / 2)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "too many metrics labels: %ui", n);
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


static ngx_int_t
ngx_http_civicgate_metrics_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_civicgate_metrics_t  *m = shm_zone->data;

    size_t                            size;
    ngx_slab_pool_t                  *shpool;
    ngx_http_civicgate_metrics_sh_t  *sh;

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists || data != NULL) {
        sh = shpool->data;

        if (sh->signature == m->signature && sh->ncounters == m->ncounters) {
            m->counters = sh->counters;
            return NGX_OK;
        }

        /* the label layout changed: old counters would be misattributed */
        ngx_slab_free(shpool, sh);
    }

    size = sizeof(ngx_http_civicgate_metrics_sh_t)
           + m->ncounters * sizeof(ngx_atomic_t);

    sh = ngx_slab_calloc(shpool, size);
    if (sh == NULL) {
        return NGX_ERROR;
    }

    sh->signature = m->signature;
    sh->ncounters = m->ncounters;

    shpool->data = sh;
    m->counters = sh->counters;

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

        label = f[i].labels.elts;
        for (j = 0; j < f[i].labels.nelts; j++) {
            ngx_crc32_update(&crc, label[j].data, label[j].len);
        }
    }

    ngx_crc32_final(crc);

    return crc;
}


void
ngx_http_civicgate_metrics_add(ngx_http_civicgate_metrics_t *m,
    ngx_http_civicgate_family_t *f, ngx_uint_t label, ngx_atomic_int_t n)
{
    if (m->counters == NULL || label >= f->labels.nelts) {
        return;
    }

    (void) ngx_atomic_fetch_add(&m->counters[f->offset + label], n);
}


char *
ngx_http_civicgate_metrics(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_civicgate_metrics_handler;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_civicgate_metrics_handler(ngx_http_request_t *r)
{
    ngx_int_t                        rc;
    ngx_buf_t                       *b;
    ngx_chain_t                      out;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);

    ngx_str_set(&r->headers_out.content_type,
                "text/plain; version=0.0.4; charset=utf-8");
    r->headers_out.content_type_len = sizeof("text/plain") - 1;
    r->headers_out.content_type_lowcase = NULL;

    b = ngx_create_temp_buf(r->pool,
                            ngx_http_civicgate_metrics_size(cgmcf->metrics));
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_http_civicgate_metrics_write(b->last, cgmcf->metrics);
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
    size_t                        size;
    ngx_str_t                    *label;
    ngx_uint_t                    i, j;
    ngx_http_civicgate_family_t  *f;

    size = 0;
    f = m->families.elts;

    for (i = 0; i < m->families.nelts; i++) {
        size += sizeof("# HELP  \n# TYPE  counter\n") - 1
                + 2 * f[i].name.len + ngx_strlen(f[i].help);

        label = f[i].labels.elts;
        for (j = 0; j < f[i].labels.nelts; j++) {
            size += f[i].name.len + label[j].len + 1 + NGX_ATOMIC_T_LEN + 1;
        }
    }

    return size;
}


static u_char *
ngx_http_civicgate_metrics_write(u_char *p, ngx_http_civicgate_metrics_t *m)
{
    ngx_str_t                    *label;
    ngx_uint_t                    i, j;
    ngx_http_civicgate_family_t  *f;

    f = m->families.elts;

    for (i = 0; i < m->families.nelts; i++) {
        p = ngx_sprintf(p, "# HELP %V %s\n# TYPE %V %s\n",
                        &f[i].name, f[i].help, &f[i].name,
                        f[i].type == NGX_HTTP_CIVICGATE_GAUGE ? "gauge"
                                                              : "counter");

        label = f[i].labels.elts;
        for (j = 0; j < f[i].labels.nelts; j++) {
            p = ngx_sprintf(p, "%V%V %uA\n", &f[i].name, &label[j],
                            m->counters ? m->counters[f[i].offset + j] : 0);
        }
    }

    return p;
}
