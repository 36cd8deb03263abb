
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
