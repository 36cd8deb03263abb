
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_GCRA_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_GCRA_H_INCLUDED_


/*
 * Pure GCRA arithmetic, shared by the shared-memory store and the reading
 * of the Redis script's answer; libc only, for lua-free-tests/.
 *
 * Times are in microseconds.  "interval" is the emission interval (1/rate),
 * "excess" the backlog a request finds: max(tat, now) - now.  A request is
 * admitted when excess <= burst * interval, as limit_req admits burst + 1
 * requests at once; an admitted request moves tat to max(tat, now) +
 * interval.
 */

#include <stdint.h>


typedef struct {
    uint64_t    interval;
    uint64_t    burst;
    uint64_t    delay;          /* requests let through undelayed */
} ngx_http_civicgate_gcra_limit_t;


typedef struct {
    int         admitted;
    uint64_t    excess;         /* as found, before this request */
    uint64_t    delay_us;       /* to wait before passing, if admitted */
    uint64_t    remaining;      /* further requests admitted at once */
    uint64_t    reset_us;       /* until the backlog drains entirely */
    uint64_t    retry_us;       /* until a rejected request would pass */
} ngx_http_civicgate_gcra_result_t;


uint64_t ngx_http_civicgate_gcra_excess(uint64_t tat, uint64_t now);
void ngx_http_civicgate_gcra_decide(const ngx_http_civicgate_gcra_limit_t *l,
    uint64_t excess, ngx_http_civicgate_gcra_result_t *res);
uint64_t ngx_http_civicgate_gcra_next(const ngx_http_civicgate_gcra_limit_t *l,
    uint64_t tat, uint64_t now);

/*
 * Synchronised limits: each gateway decides locally and sends, per key and
 * interval, the number of requests it admitted; the shared state adds them
 * (tat = max(tat, now) + n * interval) and answers the key's backlog, which
 * the gateway adopts with what it admitted since it sent its count.
 */
uint64_t ngx_http_civicgate_gcra_adopt(const ngx_http_civicgate_gcra_limit_t *l,
    uint64_t excess, uint64_t pending, uint64_t now);
uint64_t ngx_http_civicgate_gcra_add(const ngx_http_civicgate_gcra_limit_t *l,
    uint64_t tat, uint64_t n, uint64_t now);
uint64_t ngx_http_civicgate_gcra_kept(const ngx_http_civicgate_gcra_limit_t *l,
    uint64_t count, uint64_t tat, uint64_t now);


#endif /* _NGX_HTTP_CIVICGATE_GCRA_H_INCLUDED_ */
