
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_JOURNEY_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_JOURNEY_H_INCLUDED_


#include "ngx_http_civicgate_core.h"


/*
 * The journey concern's narrow interface: a request's channel, journey ID
 * and citizen pseudonym, each resolved on first use.  A subrequest has
 * the main request's journey (minted once) and, once known, its citizen.
 */

/* the consent purposes a request passed, recorded with its journey event */
#define NGX_HTTP_CIVICGATE_USES_MAX    8


typedef struct {
    ngx_uint_t                     channel;      /* index; nchannels: unknown */
    u_char                         journey_id[NGX_HTTP_CIVICGATE_JID_LEN];
    u_char                         citizen[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN];

    /* set by the consent check; names live as long as the configuration */
    ngx_str_t                     *uses[NGX_HTTP_CIVICGATE_USES_MAX];
    ngx_uint_t                     nuses;
    time_t                         uses_retention;   /* seconds */

    unsigned                       channel_done:1;
    unsigned                       journey_done:1;
    unsigned                       journey_on:1;
    unsigned                       journey_new:1;
    unsigned                       citizen_done:1;
    unsigned                       citizen_set:1;
    unsigned                       headers_done:1;
} ngx_http_civicgate_journey_t;


/* what is known so far, nothing resolved: NULL if nothing asked yet */
ngx_http_civicgate_journey_t *ngx_http_civicgate_journey_get(
    ngx_http_request_t *r);

/* NULL on an error; the part asked for is resolved in what is returned */
ngx_http_civicgate_journey_t *ngx_http_civicgate_journey_channel(
    ngx_http_request_t *r);
ngx_http_civicgate_journey_t *ngx_http_civicgate_journey_id(
    ngx_http_request_t *r);
ngx_http_civicgate_journey_t *ngx_http_civicgate_journey_citizen(
    ngx_http_request_t *r);

void ngx_http_civicgate_journey_channel_name(ngx_http_request_t *r,
    ngx_http_civicgate_journey_t *j, ngx_str_t *name);
time_t ngx_http_civicgate_journey_ttl(ngx_http_request_t *r);
ngx_str_t *ngx_http_civicgate_journey_challenge(ngx_http_request_t *r);
ngx_uint_t ngx_http_civicgate_journey_has_citizen(ngx_conf_t *cf);

/* the presented journey ID, not checked; for fuzz/journey_id.c */
ngx_int_t ngx_http_civicgate_journey_input(ngx_http_request_t *r,
    ngx_str_t *header, ngx_str_t *cookie, ngx_str_t *value);


extern ngx_module_t  ngx_http_civicgate_journey_module;


#endif /* _NGX_HTTP_CIVICGATE_JOURNEY_H_INCLUDED_ */
