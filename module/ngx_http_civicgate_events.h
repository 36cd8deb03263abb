
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_EVENTS_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_EVENTS_H_INCLUDED_


#include "ngx_http_civicgate_core.h"


/* the events concern's narrow interface, for health checks and metrics */

ngx_uint_t ngx_http_civicgate_events_spool_high(void);
ngx_uint_t ngx_http_civicgate_events_spool_usage(ngx_uint_t *capacity);
/* how journeys map to streams, for the readers of timelines */
ngx_http_civicgate_shards_t *ngx_http_civicgate_events_shards(void);


#endif /* _NGX_HTTP_CIVICGATE_EVENTS_H_INCLUDED_ */
