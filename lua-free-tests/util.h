
/*
 * Copyright (C) civicgate authors
 */


#ifndef _CIVICGATE_TEST_UTIL_H_INCLUDED_
#define _CIVICGATE_TEST_UTIL_H_INCLUDED_


/*
 * Helpers the unit tests share.  A test that draws random numbers defines
 * RNG_SEED before including this file: its sequence is then fixed, so a
 * failure reproduces.
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>


#ifdef RNG_SEED

static uint64_t  rng_state = RNG_SEED;


/* xorshift64 */

static inline uint32_t
rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;

    return (uint32_t) (rng_state >> 32);
}

#endif


static inline void
unhex(const char *hex, u_char *out)
{
    size_t        i, n;
    unsigned int  v;

    n = strlen(hex) / 2;

    for (i = 0; i < n; i++) {
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) {
            abort();
        }

        out[i] = (u_char) v;
    }
}


#endif /* _CIVICGATE_TEST_UTIL_H_INCLUDED_ */
