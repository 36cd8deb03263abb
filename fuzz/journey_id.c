
/*
 * Copyright (C) civicgate authors
 */


/*
 * Journey IDs as clients present them: the first input byte picks the
 * X-Journey-ID header (odd) or the Cookie header (even), the rest is its
 * value.  The module's own lookup (header first, then the cg_journey
 * cookie) hands the value to the decoder and the verifier, as for a
 * request.  An ID that verifies must read back the same from its
 * canonical form.
 */

#include "fuzz.h"
#include "ngx_http_civicgate_journey.h"
#include "ngx_http_civicgate_codec.h"


/* two keys, as during a rotation; the seeds are signed by both */
static const char  fuzz_keys[] =
    "k2 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n"
    "k1 ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n";

static ngx_http_civicgate_keyring_t  fuzz_ring;

/* civicgate_journey's defaults */
static ngx_str_t  fuzz_header = ngx_string("X-Journey-ID");
static ngx_str_t  fuzz_cookie = ngx_string("cg_journey");


static void
fuzz_verify(const u_char *value, size_t len)
{
    int     key;
    u_char  raw[NGX_HTTP_CIVICGATE_JID_RAW], again[NGX_HTTP_CIVICGATE_JID_RAW];
    u_char  id[NGX_HTTP_CIVICGATE_JID_LEN];

    if (ngx_http_civicgate_jid_parse(value, len, raw) != 0) {
        return;
    }

    key = ngx_http_civicgate_jid_verify(&fuzz_ring, raw);

    if (key < 0) {
        return;
    }

    ngx_http_civicgate_jid_format(raw, id);

    if (ngx_http_civicgate_jid_parse(id, sizeof(id), again) != 0
        || ngx_memcmp(raw, again, sizeof(raw)) != 0
        || ngx_http_civicgate_jid_verify(&fuzz_ring, again) != key)
    {
        abort();
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char                 err[256];
    u_char              *copy;
    ngx_str_t            value;
    ngx_pool_t          *pool;
    ngx_table_elt_t     *h, **cookie;
    ngx_http_request_t  *r;

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

    if (size == 0) {
        return 0;
    }

    pool = fuzz_pool();

    r = ngx_pcalloc(pool, sizeof(ngx_http_request_t));

    if (r == NULL
        || ngx_list_init(&r->headers_in.headers, pool, 2,
                         sizeof(ngx_table_elt_t))
           != NGX_OK
        || ngx_array_init(&r->headers_in.cookies, pool, 2,
                          sizeof(ngx_table_elt_t *))
           != NGX_OK)
    {
        abort();
    }

    /*
     * the input's bytes and the NUL nginx ends header values with: a read
     * past them is an ASan report
     */
    copy = malloc(size);
    h = ngx_list_push(&r->headers_in.headers);

    if (copy == NULL || h == NULL) {
        abort();
    }

    ngx_memcpy(copy, data + 1, size - 1);
    copy[size - 1] = '\0';
    ngx_memzero(h, sizeof(ngx_table_elt_t));
    h->hash = 1;
    h->value.data = copy;
    h->value.len = size - 1;

    if (data[0] & 1) {
        ngx_str_set(&h->key, "X-Journey-ID");

    } else {
        ngx_str_set(&h->key, "Cookie");

        cookie = ngx_array_push(&r->headers_in.cookies);
        if (cookie == NULL) {
            abort();
        }

        *cookie = h;
    }

    if (ngx_http_civicgate_journey_input(r, &fuzz_header, &fuzz_cookie,
                                         &value)
        == NGX_OK)
    {
        fuzz_verify(value.data, value.len);
    }

    free(copy);
    ngx_destroy_pool(pool);

    return 0;
}
