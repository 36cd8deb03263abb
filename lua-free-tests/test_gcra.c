
/*
 * Copyright (C) civicgate authors
 */


/*
 * Unit tests for module/ngx_http_civicgate_gcra.c: the GCRA arithmetic of
 * the rate limits (spec: burst + 1 requests at once, then one per
 * interval; remaining/reset/retry; delay thresholds; a rejected request
 * leaves the TAT alone, i.e. the caller calls _next() only for admitted
 * requests).
 *
 * The last part runs random arrival sequences (millisecond clock, as the
 * shared-memory store uses) through the module's functions and through an
 * independent reimplementation of nginx limit_req's integer arithmetic
 * (ngx_http_limit_req_lookup/_account of nginx 1.22):
 *
 *     excess in 1/1000 requests, rate in 1/1000 requests per second
 *     (N r/s -> N * 1000, N r/m -> N * 1000 / 60, integer division);
 *     existing key:  ms = now - last;
 *                    excess = prev - rate * ms / 1000 + 1000, at least 0;
 *                    rejected when excess > burst * 1000;
 *                    admitted: prev = excess, last = now (if ms != 0);
 *     new key:       excess 0 (always admitted), last = now;
 *     delay (ms):    excess <= delay * 1000 ? 0
 *                                          : (excess - delay*1000) * 1000 / rate.
 *
 * For rates whose interval is a whole number of 1/1000 request units
 * (N r/s with N dividing 1000; N r/m with N a multiple of 60 dividing
 * 60000) both are exact and must agree on every decision, on the excess
 * (module µs == nginx units * interval / 1000) and on the delay.
 *
 * Tolerance for the other rates (documented, checked): neither side is
 * exact there.  The module floors the interval to whole µs (error < 1 µs
 * per interval charged); nginx truncates every drain (rate * ms / 1000) to
 * whole units of interval/1000, losing up to one unit per update.  A third,
 * exact model (rational GCRA in integer units of 1/N ms) runs alongside,
 * counting "run": the requests admitted since its bucket was last empty.
 * Then:
 *   - module vs exact: a disagreement is tolerated only when the exact
 *     excess is within (run + 1) µs of the admission threshold;
 *   - module vs limit_req: only within TOL_MS (2 ms) + (run + 1) units
 *     (interval/1000) of it;
 *   - at most 1% of the decisions disagree.
 * After any disagreement the three models restart from a fresh key (their
 * states diverged by one request).  The rates used there have an exact
 * nginx rate (N * 1000 / window is an integer), so only the truncations
 * above play a part.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ngx_http_civicgate_gcra.h"
#include "tap.h"

#define RNG_SEED  0x2545f4914f6cdd1dULL
#include "util.h"


#define SEC        1000000ULL
#define NODELAY    0x7fffffffULL      /* what "nodelay" stores (NGX_MAX_INT32_VALUE) */
#define T0         1700000000000000ULL   /* an arbitrary "now", µs */
#define TOL_MS     2

typedef ngx_http_civicgate_gcra_limit_t   limit_t;
typedef ngx_http_civicgate_gcra_result_t  result_t;


static uint64_t
rng_below(uint64_t n)
{
    uint64_t  v;

    if (n == 0) {
        return 0;
    }

    v = ((uint64_t) rng() << 32) | rng();

    return v % n;
}


static limit_t
mk(uint64_t interval, uint64_t burst, uint64_t delay)
{
    limit_t  l;

    l.interval = interval;
    l.burst = burst;
    l.delay = delay;

    return l;
}


/* decide() on a result pre-filled with garbage: every field must be set */
static void
decide(const limit_t *l, uint64_t excess, result_t *res)
{
    memset(res, 0xA5, sizeof(*res));
    ngx_http_civicgate_gcra_decide(l, excess, res);
}


/*
 * One request of a key at "now" the way the stores use the functions:
 * a key without state finds excess 0 (tat = now); only an admitted
 * request moves the tat.
 */
static int
request(const limit_t *l, uint64_t *tat, int *exists, uint64_t now,
    result_t *res)
{
    uint64_t  excess;

    excess = *exists ? ngx_http_civicgate_gcra_excess(*tat, now) : 0;

    decide(l, excess, res);

    if (res->admitted) {
        *tat = ngx_http_civicgate_gcra_next(l, *exists ? *tat : now, now);
        *exists = 1;
    }

    return res->admitted;
}


static void
test_excess(void)
{
    tap_is_int((long) ngx_http_civicgate_gcra_excess(T0 + 5, T0), 5,
               "excess: tat ahead of now by 5 us");
    tap_is_int((long) ngx_http_civicgate_gcra_excess(T0, T0), 0,
               "excess: tat == now -> 0");
    tap_is_int((long) ngx_http_civicgate_gcra_excess(T0, T0 + 1), 0,
               "excess: tat 1 us in the past -> 0");
    tap_is_int((long) ngx_http_civicgate_gcra_excess(0, T0), 0,
               "excess: tat 0 (drained long ago) -> 0");
    tap_ok(ngx_http_civicgate_gcra_excess(T0 + 3600 * SEC, T0)
           == 3600 * SEC, "excess: an hour ahead");
}


static void
test_next(void)
{
    limit_t  l = mk(500000, 3, 0);

    tap_ok(ngx_http_civicgate_gcra_next(&l, T0, T0) == T0 + 500000,
           "next: tat == now -> now + interval");
    tap_ok(ngx_http_civicgate_gcra_next(&l, T0 - 7 * SEC, T0)
           == T0 + 500000, "next: tat in the past -> now + interval");
    tap_ok(ngx_http_civicgate_gcra_next(&l, T0 + 1234, T0)
           == T0 + 1234 + 500000, "next: tat ahead -> tat + interval");
}


/* burst + 1 at once, then one per interval */
static void
test_burst(void)
{
    static const struct {
        uint64_t  interval;
        uint64_t  burst;
        uint64_t  delay;
    } cases[] = {
        { SEC / 2, 0, NODELAY },
        { SEC / 2, 1, NODELAY },
        { SEC / 2, 4, NODELAY },
        { SEC / 10, 5, 0 },
        { SEC / 10, 20, 2 },
        { 60 * SEC, 3, NODELAY },         /* 1r/m */
        { SEC / 1000, 100, NODELAY },
        { 333333, 7, NODELAY },           /* 3r/s, floored */
    };

    int          exists, prefix, ok;
    uint64_t     tat, now, admitted, i, k;
    limit_t      l;
    result_t     res;
    unsigned     c;

    for (c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        l = mk(cases[c].interval, cases[c].burst, cases[c].delay);
        exists = 0;
        tat = 0;
        now = T0;

        /* 3 * (burst + 1) requests in the same microsecond */
        admitted = 0;
        prefix = 1;

        for (i = 0; i < 3 * (l.burst + 1); i++) {
            if (request(&l, &tat, &exists, now, &res)) {
                admitted++;
                prefix &= (i == admitted - 1);
            }
        }

        tap_is_int((long) admitted, (long) (l.burst + 1),
                   "burst: interval %llu us, burst %llu: burst + 1 admitted "
                   "at once", (unsigned long long) l.interval,
                   (unsigned long long) l.burst);
        tap_ok(prefix, "burst: interval %llu us, burst %llu: the first ones",
               (unsigned long long) l.interval, (unsigned long long) l.burst);

        /* then exactly one per interval, none in between */
        ok = 1;

        for (k = 0; k < 5; k++) {
            if (request(&l, &tat, &exists, now + l.interval - 1, &res)) {
                ok = 0;
            }

            now += l.interval;

            if (!request(&l, &tat, &exists, now, &res)) {
                ok = 0;
            }

            if (request(&l, &tat, &exists, now, &res)) {
                ok = 0;
            }
        }

        tap_ok(ok, "burst: interval %llu us, burst %llu: then exactly one "
               "per interval (not 1 us earlier)",
               (unsigned long long) l.interval, (unsigned long long) l.burst);

        /* after the backlog drained: burst + 1 at once again */
        now = tat + 10 * l.interval;
        admitted = 0;

        for (i = 0; i < 2 * (l.burst + 1); i++) {
            admitted += request(&l, &tat, &exists, now, &res);
        }

        tap_is_int((long) admitted, (long) (l.burst + 1),
                   "burst: interval %llu us, burst %llu: burst + 1 again "
                   "after idling", (unsigned long long) l.interval,
                   (unsigned long long) l.burst);
    }
}


/* the numbers behind the RateLimit fields and Retry-After */
static void
test_values(void)
{
    uint64_t  T = 500000, B = 3, k;
    limit_t   l = mk(T, B, NODELAY);
    result_t  res;
    int       ok;

    /* the k-th request of a burst finds excess k * T */
    for (k = 0; k <= B; k++) {
        decide(&l, k * T, &res);
        ok = res.admitted == 1 && res.excess == k * T && res.delay_us == 0
             && res.remaining == B - k && res.reset_us == (k + 1) * T
             && res.retry_us == 0;
        if (!tap_ok(ok, "values: request %llu of a burst of %llu: admitted, "
                    "remaining %llu, reset %llu us, retry 0",
                    (unsigned long long) k + 1,
                    (unsigned long long) B + 1,
                    (unsigned long long) (B - k),
                    (unsigned long long) (k + 1) * T))
        {
            tap_diag("got admitted %d excess %llu delay %llu remaining %llu "
                     "reset %llu retry %llu", res.admitted,
                     (unsigned long long) res.excess,
                     (unsigned long long) res.delay_us,
                     (unsigned long long) res.remaining,
                     (unsigned long long) res.reset_us,
                     (unsigned long long) res.retry_us);
        }
    }

    /* the next one is rejected: one interval to wait */
    decide(&l, (B + 1) * T, &res);
    ok = res.admitted == 0 && res.excess == (B + 1) * T && res.delay_us == 0
         && res.remaining == 0 && res.retry_us == T
         && res.reset_us == (B + 1) * T;
    tap_ok(ok, "values: request burst + 2: rejected, remaining 0, retry = "
           "interval, reset = backlog");

    /* 200 ms later: still rejected, 300 ms to wait */
    decide(&l, (B + 1) * T - 200000, &res);
    ok = res.admitted == 0 && res.retry_us == 300000 && res.remaining == 0
         && res.reset_us == (B + 1) * T - 200000 && res.delay_us == 0;
    tap_ok(ok, "values: 200 ms later: rejected, retry 300 ms");

    /* exactly on the threshold: admitted, nothing remains */
    decide(&l, B * T, &res);
    tap_ok(res.admitted && res.remaining == 0 && res.reset_us == (B + 1) * T,
           "values: excess == burst * interval is admitted (<=), remaining 0");

    decide(&l, B * T + 1, &res);
    tap_ok(!res.admitted && res.retry_us == 1,
           "values: 1 us over the threshold: rejected, retry 1 us");

    /* part of an interval drained: remaining rounds down */
    decide(&l, T / 2, &res);
    tap_ok(res.admitted && res.remaining == B - 1
           && res.reset_us == T / 2 + T,
           "values: half an interval of backlog: remaining %llu",
           (unsigned long long) B - 1);

    /* burst 0 */
    l = mk(T, 0, NODELAY);
    decide(&l, 0, &res);
    tap_ok(res.admitted && res.remaining == 0 && res.reset_us == T,
           "values: burst 0, idle: admitted, remaining 0, reset = interval");
    decide(&l, 1, &res);
    tap_ok(!res.admitted && res.retry_us == 1 && res.reset_us == 1,
           "values: burst 0, 1 us of backlog: rejected");
}


/*
 * remaining, reset and retry against a brute force over the future:
 * remaining = how many more requests at the same instant are admitted,
 * retry = the smallest wait after which the request is admitted,
 * reset = how long until the key is drained (excess 0 again).
 */
static void
test_values_brute(void)
{
    static const uint64_t  intervals[] = { SEC, SEC / 2, SEC / 10, 333333,
                                           60 * SEC, 1000 };
    int        bad_rem, bad_retry, bad_reset, exists;
    uint64_t   T, B, excess, tat, tat2, now, n, lo, hi, mid;
    limit_t    l;
    result_t   res, r2;
    unsigned   i, j;

    bad_rem = bad_retry = bad_reset = 0;

    for (i = 0; i < sizeof(intervals) / sizeof(intervals[0]); i++) {
        for (j = 0; j < 400; j++) {
            T = intervals[i];
            B = rng_below(12);
            l = mk(T, B, NODELAY);
            excess = rng_below((B + 3) * T);

            /* a key whose tat lies "excess" ahead */
            now = T0;
            tat = now + excess;
            exists = 1;

            decide(&l, ngx_http_civicgate_gcra_excess(tat, now), &res);

            if (res.admitted) {
                /* charge it, then count what passes at the same instant */
                tat2 = ngx_http_civicgate_gcra_next(&l, tat, now);
                n = 0;

                while (request(&l, &tat2, &exists, now, &r2)) {
                    n++;
                }

                bad_rem += (n != res.remaining);
                bad_reset += (res.reset_us
                              != ngx_http_civicgate_gcra_excess(
                                     ngx_http_civicgate_gcra_next(&l, tat, now),
                                     now));
                bad_retry += (res.retry_us != 0);

            } else {
                /* smallest wait admitting it: binary search */
                lo = 0;
                hi = excess;

                while (lo < hi) {
                    mid = lo + (hi - lo) / 2;
                    decide(&l, ngx_http_civicgate_gcra_excess(tat, now + mid),
                           &r2);
                    if (r2.admitted) {
                        hi = mid;
                    } else {
                        lo = mid + 1;
                    }
                }

                bad_retry += (res.retry_us != lo);
                bad_rem += (res.remaining != 0);
                /* unchanged backlog: drained after "excess" */
                bad_reset += (res.reset_us != excess);
            }
        }
    }

    tap_is_int(bad_rem, 0, "brute force: remaining = further requests "
               "admitted at the same instant (2400 random states)");
    tap_is_int(bad_retry, 0, "brute force: retry = smallest wait until "
               "admitted");
    tap_is_int(bad_reset, 0, "brute force: reset = time until the backlog "
               "drains");
}


static void
test_delay(void)
{
    uint64_t  T = SEC / 10, B = 5, k, want;
    limit_t   l;
    result_t  res;
    int       ok;

    /* delay=0 (the default): every excess request waits for its excess */
    l = mk(T, B, 0);
    ok = 1;

    for (k = 0; k <= B; k++) {
        decide(&l, k * T, &res);
        ok &= res.admitted && res.delay_us == k * T;
    }

    tap_ok(ok, "delay=0: request k of a burst is delayed by k intervals");

    decide(&l, 1, &res);
    tap_ok(res.admitted && res.delay_us == 1,
           "delay=0: 1 us of excess -> 1 us of delay");
    decide(&l, B * T + 1, &res);
    tap_ok(!res.admitted && res.delay_us == 0,
           "delay=0: a rejected request is not delayed");

    /* delay=2: the first 2 excess requests (3 in all) go undelayed */
    l = mk(T, B, 2);
    ok = 1;

    for (k = 0; k <= B; k++) {
        decide(&l, k * T, &res);
        want = k <= 2 ? 0 : (k - 2) * T;
        ok &= res.admitted && res.delay_us == want;
    }

    tap_ok(ok, "delay=2: requests 1-3 undelayed, then (k-2) intervals");

    decide(&l, 2 * T, &res);
    tap_is_int((long) res.delay_us, 0, "delay=2: excess == 2 intervals -> 0");
    decide(&l, 2 * T + 1, &res);
    tap_is_int((long) res.delay_us, 1, "delay=2: 1 us beyond -> 1 us");

    /* delay == burst: nothing admitted is delayed */
    l = mk(T, B, B);
    ok = 1;

    for (k = 0; k <= B * T; k += 997) {
        decide(&l, k, &res);
        ok &= res.admitted && res.delay_us == 0;
    }

    tap_ok(ok, "delay=burst: no admitted request is delayed");

    /* nodelay as stored by the directive (huge), also with a long interval */
    l = mk(60 * SEC, 1000, NODELAY);
    ok = 1;

    for (k = 0; k <= 1000; k++) {
        decide(&l, k * 60 * SEC, &res);
        ok &= res.admitted && res.delay_us == 0;
    }

    decide(&l, 1000 * 60 * SEC + 1, &res);
    ok &= !res.admitted && res.delay_us == 0;

    tap_ok(ok, "nodelay (delay 2^31-1): never delayed, no overflow at 1r/m "
           "burst 1000");
}


/* rejected requests do not move the tat: retry counts down in real time */
static void
test_rejected_keeps_tat(void)
{
    uint64_t  T = SEC / 2, B = 2, tat, tat_full, now, retry0, t;
    limit_t   l = mk(T, B, NODELAY);
    result_t  res;
    int       exists = 0, i, ok;

    now = T0;

    for (i = 0; i < 3; i++) {
        request(&l, &tat, &exists, now, &res);
    }

    tat_full = tat;

    /* 50 rejected requests, 1 ms apart */
    ok = 1;
    retry0 = 0;

    for (i = 0; i < 50; i++) {
        t = now + (uint64_t) i * 1000;

        if (request(&l, &tat, &exists, t, &res)) {
            ok = 0;
            break;
        }

        if (i == 0) {
            retry0 = res.retry_us;
        }

        ok &= (res.retry_us == retry0 - (uint64_t) i * 1000);
        ok &= (tat == tat_full);
    }

    tap_ok(ok && retry0 == T, "rejected: tat unchanged, retry counts down "
           "by the time elapsed (50 rejections)");

    /* admitted exactly after the first retry, not 1 us before */
    tap_ok(!request(&l, &tat, &exists, now + retry0 - 1, &res),
           "rejected: still rejected 1 us before the first Retry time");
    tap_ok(request(&l, &tat, &exists, now + retry0, &res),
           "rejected: admitted exactly at the first Retry time");
    tap_ok(tat == tat_full + T, "rejected: the admitted one moved tat by "
           "one interval");
}


/* nginx limit_req, the integer arithmetic, one key */

typedef struct {
    int        exists;
    int64_t    excess;        /* 1/1000 requests */
    uint64_t   last;          /* ms */
} lr_t;


static int
lr_request(lr_t *s, uint64_t now_ms, int64_t rate, int64_t burst,
    int64_t delay, int64_t *excess_out, int64_t *delay_ms)
{
    int64_t  ms, excess;

    if (!s->exists) {
        excess = 0;
        ms = 0;

    } else {
        ms = (int64_t) (now_ms - s->last);

        if (ms < -60000) {
            ms = 1;

        } else if (ms < 0) {
            ms = 0;
        }

        excess = s->excess - rate * ms / 1000 + 1000;

        if (excess < 0) {
            excess = 0;
        }
    }

    *excess_out = excess;
    *delay_ms = 0;

    if (excess > burst * 1000) {
        return 0;
    }

    if (!s->exists) {
        s->exists = 1;
        s->excess = 0;
        s->last = now_ms;

    } else {
        s->excess = excess;

        if (ms) {
            s->last = now_ms;
        }
    }

    if (excess > delay * 1000) {
        *delay_ms = (excess - delay * 1000) * 1000 / rate;
    }

    return 1;
}


/* exact GCRA in integer units of 1/N ms (an interval is window*1000 units) */

typedef struct {
    int        exists;
    uint64_t   tat;
    uint64_t   run;           /* admitted since the bucket was last empty */
} exact_t;


static int
exact_request(exact_t *s, uint64_t now_u, uint64_t T_u, uint64_t burst,
    int64_t *dist_u)
{
    uint64_t  excess;

    excess = (s->exists && s->tat > now_u) ? s->tat - now_u : 0;

    if (excess == 0) {
        s->run = 0;
    }

    /* signed distance from the threshold */
    *dist_u = (int64_t) excess - (int64_t) (burst * T_u);

    if (excess > burst * T_u) {
        return 0;
    }

    s->tat = (excess ? s->tat : now_u) + T_u;
    s->exists = 1;
    s->run++;

    return 1;
}


static uint64_t
next_gap_ms(uint64_t T_ms, uint64_t burst)
{
    uint32_t  p = rng() % 100;

    if (p < 30) {
        return 0;                                  /* a burst */
    }

    if (p < 60) {
        return rng_below(T_ms / 2 + 2);            /* faster than the rate */
    }

    if (p < 85) {
        return T_ms - T_ms / 4 + rng_below(T_ms / 2 + 2);   /* around it */
    }

    return rng_below((burst + 3) * T_ms + 2);      /* up to fully drained */
}


static void
compare_limit_req(unsigned rate, unsigned window, uint64_t burst,
    uint64_t delay, unsigned n, int exact)
{
    int        m_ok, l_ok, e_ok, mism, bad_tol, bad_excess, bad_delay;
    int        mism_exact, bad_exact, exists, first;
    int64_t    lr_rate, lr_excess, lr_delay, dist_u;
    uint64_t   T, T_u, T_ms, now_ms, tat, unit, i, mdelay, run, adist;
    lr_t       lr;
    exact_t    ex;
    limit_t    l;
    result_t   res;

    T = (uint64_t) window * SEC / rate;            /* as the module computes */
    T_u = (uint64_t) window * 1000;                /* in 1/N ms */
    T_ms = (uint64_t) window * 1000 / rate;
    lr_rate = (int64_t) rate * 1000 / window;
    unit = T / 1000;                               /* µs per 1/1000 request */

    l = mk(T, burst, delay > burst ? burst : delay);

    memset(&lr, 0, sizeof(lr));
    memset(&ex, 0, sizeof(ex));
    exists = 0;
    tat = 0;
    now_ms = 1700000000000ULL;

    mism = bad_tol = bad_excess = bad_delay = 0;
    mism_exact = bad_exact = 0;
    first = 1;

    for (i = 0; i < n; i++) {
        now_ms += next_gap_ms(T_ms ? T_ms : 1, burst);

        m_ok = request(&l, &tat, &exists, now_ms * 1000, &res);
        l_ok = lr_request(&lr, now_ms, lr_rate, (int64_t) burst,
                          (int64_t) (delay > burst ? NODELAY : delay),
                          &lr_excess, &lr_delay);
        run = (ex.exists && ex.tat > now_ms * rate) ? ex.run : 0;
        e_ok = exact_request(&ex, now_ms * rate, T_u, burst, &dist_u);

        if (exact) {
            if (m_ok != l_ok) {
                mism++;
                if (first) {
                    first = 0;
                    tap_diag("first mismatch at request %llu: module %s "
                             "(excess %llu us), limit_req %s (excess %lld)",
                             (unsigned long long) i,
                             m_ok ? "admits" : "rejects",
                             (unsigned long long) res.excess,
                             l_ok ? "admits" : "rejects",
                             (long long) lr_excess);
                }
                /* resynchronise */
                memset(&lr, 0, sizeof(lr));
                memset(&ex, 0, sizeof(ex));
                exists = 0;
                continue;
            }

            /* the excess each found, in the same unit */
            if (res.excess != (uint64_t) lr_excess * unit) {
                bad_excess++;
            }

            /* nginx truncates its delay to whole ms */
            mdelay = res.delay_us / 1000;

            if (m_ok && (mdelay != (uint64_t) lr_delay
                         || (res.delay_us != 0) != (lr_excess
                                                    > (int64_t) l.delay * 1000)))
            {
                bad_delay++;
            }

            continue;
        }

        if (m_ok == l_ok && m_ok == e_ok) {
            continue;
        }

        /* |dist| in 1/N ms; run as counted before this request */
        adist = dist_u < 0 ? (uint64_t) -dist_u : (uint64_t) dist_u;

        if (m_ok != e_ok) {
            mism_exact++;

            /* within (run + 1) µs: adist * 1000 / N <= run + 1 */
            if (adist * 1000 > (run + 1) * rate) {
                bad_exact++;
                tap_diag("module vs exact off a boundary at request %llu: "
                         "distance %lld/%u ms, run %llu",
                         (unsigned long long) i, (long long) dist_u, rate,
                         (unsigned long long) run);
            }
        }

        if (m_ok != l_ok) {
            mism++;

            /*
             * within TOL_MS + (run + 1) units of interval/1000 ms
             * (= window/N ms); adist is in 1/N ms
             */
            if (adist > TOL_MS * rate + (run + 1) * window) {
                bad_tol++;
                if (first) {
                    first = 0;
                    tap_diag("module vs limit_req off a boundary at request "
                             "%llu: exact distance %lld/%u ms, run %llu",
                             (unsigned long long) i, (long long) dist_u,
                             rate, (unsigned long long) run);
                }
            }
        }

        memset(&lr, 0, sizeof(lr));
        memset(&ex, 0, sizeof(ex));
        exists = 0;
    }

    if (exact) {
        tap_is_int(mism, 0, "limit_req: %u r/%s burst %llu delay %s: %u "
                   "decisions identical", rate, window == 1 ? "s" : "m",
                   (unsigned long long) burst,
                   delay > burst ? "nodelay" : (delay ? "N" : "0"), n);
        tap_is_int(bad_excess, 0, "limit_req: %u r/%s burst %llu: same excess "
                   "(us == units * %llu)", rate, window == 1 ? "s" : "m",
                   (unsigned long long) burst, (unsigned long long) unit);
        tap_is_int(bad_delay, 0, "limit_req: %u r/%s burst %llu: same delays "
                   "(whole ms)", rate, window == 1 ? "s" : "m",
                   (unsigned long long) burst);
        return;
    }

    tap_is_int(bad_exact, 0, "exact GCRA (tolerance): %u r/%s burst %llu: "
               "disagreements only within (run + 1) us of a boundary "
               "(%d of %u)", rate, window == 1 ? "s" : "m",
               (unsigned long long) burst, mism_exact, n);
    tap_is_int(bad_tol, 0, "limit_req (tolerance): %u r/%s burst %llu: "
               "disagreements only within %d ms + (run + 1) units of a "
               "boundary (%d of %u)", rate, window == 1 ? "s" : "m",
               (unsigned long long) burst, TOL_MS, mism, n);
    tap_ok((unsigned) mism * 100 <= n, "limit_req (tolerance): %u r/%s "
           "burst %llu: at most 1%% disagree (%d)", rate,
           window == 1 ? "s" : "m", (unsigned long long) burst, mism);
}


static void
test_vs_limit_req(void)
{
    /* exact: N r/s with N | 1000, N r/m with 60 | N and N | 60000 */
    static const unsigned  rps[] = { 1, 2, 4, 5, 8, 10, 20, 25, 50, 100,
                                     1000 };
    static const unsigned  rpm[] = { 60, 120, 300, 600 };
    static const uint64_t  bursts[] = { 0, 1, 2, 5, 20 };
    static const struct {
        unsigned  rate;
        unsigned  window;
    } approx[] = {
        { 3, 1 }, { 7, 1 }, { 30, 60 }, { 45, 60 }
    };

    unsigned  i, j;

    for (i = 0; i < sizeof(rps) / sizeof(rps[0]); i++) {
        for (j = 0; j < sizeof(bursts) / sizeof(bursts[0]); j++) {
            compare_limit_req(rps[i], 1, bursts[j], NODELAY, 20000, 1);
        }

        compare_limit_req(rps[i], 1, 5, 0, 20000, 1);
        compare_limit_req(rps[i], 1, 5, 2, 20000, 1);
    }

    for (i = 0; i < sizeof(rpm) / sizeof(rpm[0]); i++) {
        compare_limit_req(rpm[i], 60, 0, NODELAY, 20000, 1);
        compare_limit_req(rpm[i], 60, 3, NODELAY, 20000, 1);
        compare_limit_req(rpm[i], 60, 3, 1, 20000, 1);
    }

    for (i = 0; i < sizeof(approx) / sizeof(approx[0]); i++) {
        for (j = 0; j < sizeof(bursts) / sizeof(bursts[0]); j++) {
            compare_limit_req(approx[i].rate, approx[i].window, bursts[j],
                              NODELAY, 20000, 0);
        }
    }
}


/*
 * Synchronised limits: the arithmetic of a reconciliation, then a
 * simulation of N gateways deciding locally and reconciling through a
 * shared state the way the module does (counts sent every S, charged at
 * once when they arrive, the backlog answered and adopted with what was
 * admitted since the call went), checked against the documented bound:
 * within any window of W µs, at most
 *     b + 1 + W / T + (N - 1) * (b + 1 + 2 * (S + d) / T)
 * admissions, d being the longest delay of a reconciliation.
 */

static void
test_sync_arith(void)
{
    limit_t  l = mk(100, 5, NODELAY);

    tap_is_int(ngx_http_civicgate_gcra_add(&l, T0 - 50, 3, T0), T0 + 300,
               "add: a drained tat starts from now");
    tap_is_int(ngx_http_civicgate_gcra_add(&l, T0 + 70, 3, T0), T0 + 370,
               "add: a backlog grows by n intervals");
    tap_is_int(ngx_http_civicgate_gcra_add(&l, T0 + 70, 0, T0), T0 + 70,
               "add: n = 0 leaves the tat");
    tap_is_int(ngx_http_civicgate_gcra_adopt(&l, 250, 2, T0), T0 + 450,
               "adopt: the shared backlog and two intervals admitted since");
    tap_is_int(ngx_http_civicgate_gcra_adopt(&l, 0, 0, T0), T0,
               "adopt: nothing anywhere is at rest");
    tap_is_int(ngx_http_civicgate_gcra_kept(&l, 10, T0 + 350, T0), 4,
               "kept: a count is cut to the intervals still in the backlog");
    tap_is_int(ngx_http_civicgate_gcra_kept(&l, 2, T0 + 350, T0), 2,
               "kept: a count within the backlog is kept whole");
    tap_is_int(ngx_http_civicgate_gcra_kept(&l, 7, T0 - 1, T0), 0,
               "kept: nothing of a drained key");
}


#define GW        3
#define SIM_MAX   20000

typedef struct {
    uint64_t  tat;
    int       exists;
    uint64_t  count;        /* admitted since the call went */
    uint64_t  sent;         /* in the call out */
    uint64_t  next_sync;
    uint64_t  arrives;      /* the call reaches the shared state */
    uint64_t  answered;     /* its answer comes back */
    uint64_t  excess;
    int       out;
} gw_t;


static int
sim_sync(uint64_t T, uint64_t burst, uint64_t S, uint64_t dmax,
    unsigned load, uint64_t span, unsigned *admitted)
{
    int       bad;
    uint64_t  now, shared, w, *at, i, j, n;
    gw_t      g[GW];
    limit_t   l = mk(T, burst, NODELAY);
    result_t  res;
    double    bound;

    at = malloc(SIM_MAX * sizeof(uint64_t));
    if (at == NULL) {
        return 0;
    }

    memset(g, 0, sizeof(g));
    shared = 0;
    n = 0;

    for (i = 0; i < GW; i++) {
        g[i].next_sync = T0 + rng_below(S);
    }

    for (now = T0; now < T0 + span; now += 1000) {
        for (i = 0; i < GW; i++) {
            if (g[i].out && now >= g[i].arrives && g[i].arrives) {
                shared = ngx_http_civicgate_gcra_add(&l, shared, g[i].sent,
                                                     g[i].arrives);
                g[i].excess = ngx_http_civicgate_gcra_excess(shared,
                                                             g[i].arrives);
                g[i].arrives = 0;
            }

            if (g[i].out && !g[i].arrives && now >= g[i].answered) {
                g[i].tat = ngx_http_civicgate_gcra_adopt(&l, g[i].excess,
                                                         g[i].count, now);
                g[i].exists = 1;
                g[i].out = 0;
            }

            if (!g[i].out && now >= g[i].next_sync) {
                g[i].next_sync += S;

                if (g[i].count) {
                    w = rng_below(dmax + 1);
                    g[i].sent = g[i].count;
                    g[i].count = 0;
                    g[i].arrives = now + w / 2;
                    g[i].answered = now + w;
                    g[i].out = 1;
                }
            }

            if (rng_below(100) < load && n < SIM_MAX
                && request(&l, &g[i].tat, &g[i].exists, now, &res))
            {
                g[i].count++;
                at[n++] = now;
            }
        }
    }

    /* every window from one admission to another */
    bad = 0;

    for (i = 0; i < n && !bad; i++) {
        for (j = i; j < n; j++) {
            w = at[j] - at[i];
            bound = burst + 1 + (double) w / T
                    + (GW - 1) * (burst + 1 + 2.0 * (S + dmax) / T);

            if (j - i + 1 > bound) {
                tap_diag("window %llu us: %llu admitted > bound %.1f",
                         (unsigned long long) w,
                         (unsigned long long) (j - i + 1), bound);
                bad = 1;
                break;
            }
        }
    }

    *admitted = n;
    free(at);

    return !bad;
}


static void
test_sync_bound(void)
{
    int        ok;
    unsigned   n, exact, k;
    static const struct {
        uint64_t  T, burst, S, dmax;
        unsigned  load;
    } c[] = {
        { 50000, 5, 100000, 20000, 30 },     /* 20r/s burst=5 sync=100ms */
        { 50000, 5, 100000, 200000, 90 },    /* a 200 ms round trip */
        { 10000, 0, 50000, 5000, 60 },       /* 100r/s, no burst */
        { 1000000, 3, 100000, 10000, 5 },    /* 1r/s, sparse */
        { 5000, 20, 250000, 50000, 100 },    /* 200r/s, every ms */
    };

    for (k = 0; k < sizeof(c) / sizeof(c[0]); k++) {
        ok = sim_sync(c[k].T, c[k].burst, c[k].S, c[k].dmax, c[k].load,
                      10 * SEC, &n);

        tap_ok(ok, "sync: %d gateways, interval %llu us, burst %llu, sync %llu "
               "us, delay <= %llu us: every window within the bound "
               "(%u admitted in 10 s)", GW,
               (unsigned long long) c[k].T, (unsigned long long) c[k].burst,
               (unsigned long long) c[k].S, (unsigned long long) c[k].dmax,
               n);

        /* shared: about one limit, far below three independent ones */
        exact = c[k].burst + 1 + 10 * SEC / c[k].T;
        if (c[k].load >= 30) {
            tap_ok(n < 2 * exact, "sync: %u admitted, under twice one "
                   "limit's %u (independent gateways: up to %u)", n, exact,
                   GW * exact);
        }
    }
}


int
main(void)
{
    test_excess();
    test_next();
    test_burst();
    test_values();
    test_values_brute();
    test_delay();
    test_rejected_keeps_tat();
    test_vs_limit_req();
    test_sync_arith();
    test_sync_bound();

    return tap_done();
}
