
/*
 * Copyright (C) civicgate authors
 */


#include "ngx_http_civicgate_gcra.h"


uint64_t
ngx_http_civicgate_gcra_excess(uint64_t tat, uint64_t now)
{
    return tat > now ? tat - now : 0;
}


void
ngx_http_civicgate_gcra_decide(const ngx_http_civicgate_gcra_limit_t *l,
    uint64_t excess, ngx_http_civicgate_gcra_result_t *res)
{
    uint64_t  tolerance, after;

    tolerance = l->burst * l->interval;

    res->excess = excess;
    res->delay_us = 0;
    res->retry_us = 0;

    if (excess > tolerance) {
        res->admitted = 0;
        res->remaining = 0;
        res->retry_us = excess - tolerance;
        res->reset_us = excess;
        return;
    }

    res->admitted = 1;

    if (excess > l->delay * l->interval) {
        res->delay_us = excess - l->delay * l->interval;
    }

    after = excess + l->interval;
    res->reset_us = after;
    res->remaining = after > tolerance + l->interval
                     ? 0 : (tolerance + l->interval - after) / l->interval;
}


uint64_t
ngx_http_civicgate_gcra_next(const ngx_http_civicgate_gcra_limit_t *l,
    uint64_t tat, uint64_t now)
{
    return (tat > now ? tat : now) + l->interval;
}


/* the local TAT: the shared backlog, and what was admitted here since */

uint64_t
ngx_http_civicgate_gcra_adopt(const ngx_http_civicgate_gcra_limit_t *l,
    uint64_t excess, uint64_t pending, uint64_t now)
{
    return now + excess + pending * l->interval;
}


/* n admitted requests, charged at once to the shared state */

uint64_t
ngx_http_civicgate_gcra_add(const ngx_http_civicgate_gcra_limit_t *l,
    uint64_t tat, uint64_t n, uint64_t now)
{
    return (tat > now ? tat : now) + n * l->interval;
}


/*
 * A count that could not be sent is kept only as far as it still weighs
 * in the key's backlog: requests whose intervals have drained no longer
 * change any decision, and a long outage does not lock the key out later.
 */

uint64_t
ngx_http_civicgate_gcra_kept(const ngx_http_civicgate_gcra_limit_t *l,
    uint64_t count, uint64_t tat, uint64_t now)
{
    uint64_t  backlog;

    backlog = tat > now ? (tat - now + l->interval - 1) / l->interval : 0;

    return count < backlog ? count : backlog;
}
