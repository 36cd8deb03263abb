
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_METRICS_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_METRICS_H_INCLUDED_


#include "ngx_http_civicgate_core.h"


#define NGX_HTTP_CIVICGATE_COUNTER    0
#define NGX_HTTP_CIVICGATE_GAUGE      1
#define NGX_HTTP_CIVICGATE_HISTOGRAM  2
#define NGX_HTTP_CIVICGATE_STATE      3     /* a 0/1 gauge of the zone's */
#define NGX_HTTP_CIVICGATE_SAMPLED    4     /* a gauge read when scraped */


/* the value of a sampled gauge, asked of the concern that owns it */
typedef ngx_uint_t (*ngx_http_civicgate_sample_pt)(void);


/* a histogram's upper bounds, in microseconds, and as printed in "le" */
typedef struct {
    ngx_uint_t                     n;
    const uint64_t                *bounds;
    const char                   **le;
} ngx_http_civicgate_buckets_t;


typedef struct {
    ngx_str_t                      name;
    const char                    *help;
    ngx_uint_t                     type;
    ngx_array_t                    labels;   /* of ngx_str_t, "{a=\"b\"}" */
    ngx_uint_t                     offset;   /* of the first cell */
    ngx_uint_t                     cells;    /* per label set */
    ngx_uint_t                     gauge;    /* among the gauge series */
    ngx_http_civicgate_buckets_t  *buckets;  /* histograms */
    ngx_http_civicgate_sample_pt   sample;   /* sampled gauges */
} ngx_http_civicgate_family_t;


typedef struct ngx_http_civicgate_metrics_sh_s  ngx_http_civicgate_metrics_sh_t;


struct ngx_http_civicgate_metrics_s {
    ngx_shm_zone_t                *zone;
    ngx_http_civicgate_metrics_sh_t  *sh;    /* in shared memory */
    ngx_array_t                    families; /* of family_t */
    ngx_uint_t                     ncells;
    ngx_uint_t                     ngauges;
    uint32_t                       signature;
    ngx_atomic_t                  *counters; /* in shared memory */
    ngx_atomic_t                  *mine;     /* this worker's gauges */
    ngx_int_t                      slot;     /* of mine; -1: not shared */

    ngx_uint_t                     nservices; /* configured; "none" after */

    ngx_http_civicgate_family_t   *journeys;
    ngx_http_civicgate_family_t   *requests;
    ngx_http_civicgate_family_t   *duration;
    ngx_http_civicgate_family_t   *events;
    ngx_http_civicgate_family_t   *limit;
    ngx_http_civicgate_family_t   *limit_fallbacks;
    ngx_http_civicgate_family_t   *consent;
    ngx_http_civicgate_family_t   *status_clients;
    ngx_http_civicgate_family_t   *consent_changes;
    ngx_http_civicgate_family_t   *consent_cache;
    ngx_http_civicgate_family_t   *redis_commands;
    ngx_http_civicgate_family_t   *redis_errors;
    ngx_http_civicgate_family_t   *redis_reconnects;
    ngx_http_civicgate_family_t   *redis_duration;
    ngx_http_civicgate_family_t   *redis_connections;
    ngx_http_civicgate_family_t   *redis_failovers;
    ngx_http_civicgate_family_t   *maintenance;
};


/* indexes in the journeys family */
#define NGX_HTTP_CIVICGATE_JOURNEY_MINTED  0
#define NGX_HTTP_CIVICGATE_JOURNEY_REUSED  1
#define NGX_HTTP_CIVICGATE_JOURNEY_FORGED  2

/* indexes in the events family */
#define NGX_HTTP_CIVICGATE_EVENTS_WRITTEN  0
#define NGX_HTTP_CIVICGATE_EVENTS_SPOOLED  1
#define NGX_HTTP_CIVICGATE_EVENTS_DROPPED  2
#define NGX_HTTP_CIVICGATE_EVENTS_FAILED   3

/* results in the consent family, per purpose */
#define NGX_HTTP_CIVICGATE_CHECK_RESULTS      3
#define NGX_HTTP_CIVICGATE_CHECK_GRANTED      0
#define NGX_HTTP_CIVICGATE_CHECK_DENIED       1
#define NGX_HTTP_CIVICGATE_CHECK_UNAVAILABLE  2

/* indexes in the redis errors family */
#define NGX_HTTP_CIVICGATE_REDIS_ERR_TIMEOUT     0
#define NGX_HTTP_CIVICGATE_REDIS_ERR_CONNECTION  1
#define NGX_HTTP_CIVICGATE_REDIS_ERR_REPLY       2

/* status classes per channel and service in the requests family */
#define NGX_HTTP_CIVICGATE_STATUS_CLASSES  5


ngx_http_civicgate_metrics_t *ngx_http_civicgate_metrics_create(ngx_conf_t *cf);
ngx_http_civicgate_family_t *ngx_http_civicgate_metrics_family(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m, char *name, const char *help,
    ngx_uint_t type);
ngx_http_civicgate_family_t *ngx_http_civicgate_metrics_histogram(
    ngx_conf_t *cf, ngx_http_civicgate_metrics_t *m, char *name,
    const char *help, ngx_http_civicgate_buckets_t *buckets);
ngx_int_t ngx_http_civicgate_metrics_label(ngx_conf_t *cf,
    ngx_http_civicgate_family_t *f, const char *fmt, ...);
ngx_int_t ngx_http_civicgate_metrics_sampled(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m, char *name, const char *help,
    ngx_http_civicgate_sample_pt sample);
ngx_int_t ngx_http_civicgate_metrics_init_conf(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf);
ngx_int_t ngx_http_civicgate_metrics_zone(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m);
void ngx_http_civicgate_metrics_init_worker(ngx_http_civicgate_metrics_t *m);
void ngx_http_civicgate_metrics_exit_worker(ngx_http_civicgate_metrics_t *m);
void ngx_http_civicgate_metrics_add(ngx_http_civicgate_metrics_t *m,
    ngx_http_civicgate_family_t *f, ngx_uint_t label, ngx_atomic_int_t n);
void ngx_http_civicgate_metrics_observe(ngx_http_civicgate_metrics_t *m,
    ngx_http_civicgate_family_t *f, ngx_uint_t label, uint64_t us);
ngx_uint_t ngx_http_civicgate_metrics_maintenance(
    ngx_http_civicgate_metrics_t *m, ngx_int_t set);
ngx_int_t ngx_http_civicgate_metrics_handler(ngx_http_request_t *r);


#define ngx_http_civicgate_metrics_inc(m, f, label)                           \
    ngx_http_civicgate_metrics_add(m, f, label, 1)

/* the series of a request: channel, then service, then status class */
#define ngx_http_civicgate_metrics_request(m, channel, service, status)      \
    (((channel) * ((m)->nservices + 1) + (service))                           \
     * NGX_HTTP_CIVICGATE_STATUS_CLASSES                                      \
     + ((status) >= 100 && (status) < 600 ? (status) / 100 - 1 : 4))


#endif /* _NGX_HTTP_CIVICGATE_METRICS_H_INCLUDED_ */
