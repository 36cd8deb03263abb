
/*
 * Copyright (C) civicgate authors
 */


/*
 * Channel and citizen input.  The input is, at once: the value of the
 * request's channel (matched against the default allowlist, and against
 * an allowlist from the civicgate_channels directive), the arguments of
 * that directive (split at spaces, through the directive's handler), and
 * a raw citizen identifier (pseudonymised).  A configured name must match
 * itself in any letter case; a pseudonym is 32 lowercase hex digits.
 */

#include "fuzz.h"
#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_conf.h"
#include "ngx_http_civicgate_codec.h"


static const char  fuzz_keys[] =
    "k1 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";

static ngx_http_civicgate_keyring_t  fuzz_ring;


static void
fuzz_channels(ngx_pool_t *pool, const uint8_t *data, size_t size)
{
    u_char                          *p, *end, *word, upper[32];
    ngx_uint_t                       i, j;
    ngx_conf_t                       cf;
    ngx_str_t                       *name;
    ngx_http_civicgate_main_conf_t   cgmcf;

    fuzz_conf(&cf, pool, 8);
    (void) fuzz_conf_arg(&cf, (u_char *) "civicgate_channels", 18);

    p = (u_char *) data;
    end = p + size;

    while (p < end) {
        word = p;
        while (p < end && *p != ' ') {
            p++;
        }

        if (p > word) {
            (void) fuzz_conf_arg(&cf, word, p - word);
        }

        p++;
    }

    ngx_memzero(&cgmcf, sizeof(cgmcf));

    if (ngx_http_civicgate_channels(&cf, NULL, &cgmcf) != NGX_CONF_OK) {
        return;
    }

    name = cf.args->elts;

    for (i = 0; i < cgmcf.nchannels; i++) {
        if (name[i + 1].len > sizeof(upper)) {
            abort();
        }

        for (j = 0; j < name[i + 1].len; j++) {
            upper[j] = ngx_toupper(name[i + 1].data[j]);
        }

        if (ngx_http_civicgate_channel_match(upper, name[i + 1].len,
                                             cgmcf.channels, cgmcf.nchannels)
            != (int) i)
        {
            abort();
        }
    }

    (void) ngx_http_civicgate_channel_match(data, size, cgmcf.channels,
                                            cgmcf.nchannels);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int                              n;
    char                             err[256];
    size_t                           i;
    u_char                           pseudonym[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN];
    ngx_conf_t                       cf;
    ngx_pool_t                      *pool;
    ngx_http_civicgate_main_conf_t   cgmcf;

    fuzz_init();

    if (fuzz_ring.nkeys == 0
        && ngx_http_civicgate_keyring_parse(&fuzz_ring,
                                            (u_char *) fuzz_keys,
                                            sizeof(fuzz_keys) - 1, NULL, 0,
                                            err, sizeof(err))
           != 0)
    {
        abort();
    }

    pool = fuzz_pool();

    fuzz_conf(&cf, pool, 1);
    ngx_memzero(&cgmcf, sizeof(cgmcf));

    if (ngx_http_civicgate_default_channels(&cf, &cgmcf) != NGX_OK) {
        abort();
    }

    n = ngx_http_civicgate_channel_match(data, size, cgmcf.channels,
                                         cgmcf.nchannels);

    if (n >= 0 && cgmcf.channels[n].len != size) {
        abort();
    }

    fuzz_channels(pool, data, size);

    if (ngx_http_civicgate_pseudonym(&fuzz_ring, data, size, pseudonym) == 0)
    {
        for (i = 0; i < sizeof(pseudonym); i++) {
            if (!((pseudonym[i] >= '0' && pseudonym[i] <= '9')
                  || (pseudonym[i] >= 'a' && pseudonym[i] <= 'f')))
            {
                abort();
            }
        }
    }

    ngx_destroy_pool(pool);

    return 0;
}
