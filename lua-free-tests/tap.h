
/*
 * Copyright (C) civicgate authors
 */


#ifndef _CIVICGATE_TAP_H_INCLUDED_
#define _CIVICGATE_TAP_H_INCLUDED_


/*
 * A tiny TAP producer: tests print "ok N - desc" or "not ok N - desc",
 * and tap_done() prints the plan "1..N" (at the end, which TAP allows)
 * and returns the process exit status.  Header-only; every test binary
 * includes it from exactly one file.
 */

#include <stdarg.h>
#include <stdio.h>
#include <string.h>


static int  tap_count;
static int  tap_failed;


static inline void
tap_vreport(int pass, const char *fmt, va_list ap)
{
    tap_count++;

    if (!pass) {
        tap_failed++;
    }

    printf("%sok %d - ", pass ? "" : "not ", tap_count);
    vprintf(fmt, ap);
    printf("\n");
    fflush(stdout);
}


/* records one test; returns pass so callers can print diagnostics */
static inline int
tap_ok(int pass, const char *fmt, ...)
{
    va_list  ap;

    va_start(ap, fmt);
    tap_vreport(pass, fmt, ap);
    va_end(ap);

    return pass;
}


static inline void
tap_diag(const char *fmt, ...)
{
    va_list  ap;

    printf("# ");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}


/* integers: reports "got X, expected Y" on failure */
static inline int
tap_is_int(long got, long expected, const char *fmt, ...)
{
    va_list  ap;
    int      pass;

    pass = (got == expected);

    va_start(ap, fmt);
    tap_vreport(pass, fmt, ap);
    va_end(ap);

    if (!pass) {
        tap_diag("  got:      %ld", got);
        tap_diag("  expected: %ld", expected);
    }

    return pass;
}


/* byte strings compared as printable text */
static inline int
tap_is_str(const void *got, size_t got_len, const char *expected,
    const char *fmt, ...)
{
    va_list  ap;
    size_t   exp_len;
    int      pass;

    exp_len = strlen(expected);
    pass = (got_len == exp_len && memcmp(got, expected, exp_len) == 0);

    va_start(ap, fmt);
    tap_vreport(pass, fmt, ap);
    va_end(ap);

    if (!pass) {
        tap_diag("  got:      \"%.*s\" (%zu bytes)", (int) got_len,
                 (const char *) got, got_len);
        tap_diag("  expected: \"%s\" (%zu bytes)", expected, exp_len);
    }

    return pass;
}


static inline void
tap_hexdump(const char *label, const unsigned char *p, size_t len)
{
    size_t  i;

    printf("#   %s", label);

    for (i = 0; i < len; i++) {
        printf("%02x", p[i]);
    }

    printf("\n");
}


/* binary buffers: reports both sides in hex on failure */
static inline int
tap_is_mem(const void *got, const void *expected, size_t len,
    const char *fmt, ...)
{
    va_list  ap;
    int      pass;

    pass = (memcmp(got, expected, len) == 0);

    va_start(ap, fmt);
    tap_vreport(pass, fmt, ap);
    va_end(ap);

    if (!pass) {
        tap_hexdump("got:      ", got, len);
        tap_hexdump("expected: ", expected, len);
    }

    return pass;
}


static inline int
tap_done(void)
{
    printf("1..%d\n", tap_count);

    if (tap_failed) {
        tap_diag("failed %d of %d tests", tap_failed, tap_count);
        return 1;
    }

    return 0;
}


#endif /* _CIVICGATE_TAP_H_INCLUDED_ */
