
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_METRICS_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_METRICS_H_INCLUDED_


#include "ngx_http_civicgate_module.h"


#define NGX_HTTP_CIVICGATE_COUNTER  0
#define NGX_HTTP_CIVICGATE_GAUGE    1


typedef struct {
    ngx_str_t                      name;
    const char                    *help;
    ngx_uint_t                     type;
    ngx_array_t                    labels;   /* of ngx_str_t, "{a=\"b\"}" */
    ngx_uint_t                     offset;
} ngx_http_civicgate_family_t;


struct ngx_http_civicgate_metrics_s {
    ngx_shm_zone_t                *zone;
    ngx_array_t                    families; /* of family_t */
    ngx_uint_t                     ncounters;
    uint32_t                       signature;
    ngx_atomic_t                  *counters; /* in shared memory */

    ngx_http_civicgate_family_t   *journeys;
    ngx_http_civicgate_family_t   *requests;
    ngx_http_civicgate_family_t   *events;
    ngx_http_civicgate_family_t   *limit;
    ngx_http_civicgate_family_t   *limit_fallbacks;
    ngx_http_civicgate_family_t   *consent;
    ngx_http_civicgate_family_t   *status_clients;
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


ngx_http_civicgate_metrics_t *ngx_http_civicgate_metrics_create(ngx_conf_t *cf);
ngx_http_civicgate_family_t *ngx_http_civicgate_metrics_family(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m, char *name, const char *help,
    ngx_uint_t type);
ngx_int_t ngx_http_civicgate_metrics_label(ngx_conf_t *cf,
    ngx_http_civicgate_family_t *f, const char *fmt, ...);
ngx_int_t ngx_http_civicgate_metrics_init_conf(ngx_conf_t *cf,
    ngx_http_civicgate_main_conf_t *cgmcf);
ngx_int_t ngx_http_civicgate_metrics_zone(ngx_conf_t *cf,
    ngx_http_civicgate_metrics_t *m);
void ngx_http_civicgate_metrics_add(ngx_http_civicgate_metrics_t *m,
    ngx_http_civicgate_family_t *f, ngx_uint_t label, ngx_atomic_int_t n);
char *ngx_http_civicgate_metrics(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);


#define ngx_http_civicgate_metrics_inc(m, f, label)                           \
    ngx_http_civicgate_metrics_add(m, f, label, 1)


#endif /* _NGX_HTTP_CIVICGATE_METRICS_H_INCLUDED_ */
