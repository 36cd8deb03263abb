
/*
 * Copyright (C) civicgate authors
 */


/*
 * Last-Event-ID, as a reconnecting EventSource sends it: the input is the
 * header's value, found and parsed by the module as for a request.  An ID
 * that parses is a Redis stream ID "MS-SEQ" and must read back the same
 * from its formatted text.
 */

#include "fuzz.h"
#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_status.h"


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char                    *copy, text[NGX_INT64_LEN * 2 + 2], *last;
    ngx_pool_t                *pool;
    ngx_table_elt_t           *h;
    ngx_http_request_t        *r;
    ngx_http_civicgate_sid_t   sid, again;

    fuzz_init();

    pool = fuzz_pool();

    r = ngx_pcalloc(pool, sizeof(ngx_http_request_t));

    if (r == NULL
        || ngx_list_init(&r->headers_in.headers, pool, 2,
                         sizeof(ngx_table_elt_t))
           != NGX_OK)
    {
        abort();
    }

    /*
     * the input's bytes and the NUL nginx ends header values with: a read
     * past them is an ASan report
     */
    copy = malloc(size + 1);
    h = ngx_list_push(&r->headers_in.headers);

    if (copy == NULL || h == NULL) {
        abort();
    }

    ngx_memcpy(copy, data, size);
    copy[size] = '\0';
    ngx_memzero(h, sizeof(ngx_table_elt_t));
    h->hash = 1;
    ngx_str_set(&h->key, "last-event-id");
    h->value.data = copy;
    h->value.len = size;

    if (ngx_http_civicgate_last_event_id(r, &sid) == NGX_OK) {
        last = ngx_http_civicgate_sid_format(text, &sid);

        if (last > text + sizeof(text)
            || ngx_http_civicgate_sid_parse(text, last - text, &again)
               != NGX_OK
            || ngx_http_civicgate_sid_cmp(&sid, &again) != 0)
        {
            abort();
        }
    }

    free(copy);
    ngx_destroy_pool(pool);

    return 0;
}
