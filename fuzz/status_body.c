
/*
 * Copyright (C) civicgate authors
 */


/*
 * The body of PUT /civicgate/admin/services/NAME: the input is the body,
 * loaded as the module loads request bodies, then checked and turned into
 * the service's record by the module.  A record it accepts holds a known
 * state, and RFC 3339 times that read back, "until" not before "since".
 */

#include "fuzz.h"
#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_codec.h"
#include "ngx_http_civicgate_status.h"


static int64_t
fuzz_time(json_t *record, const char *name)
{
    int64_t      t;
    json_t      *v;
    const char  *s;

    v = json_object_get(record, name);

    if (json_is_null(v)) {
        return -1;
    }

    s = json_string_value(v);

    if (s == NULL
        || ngx_http_civicgate_rfc3339_parse((u_char *) s,
                                            json_string_length(v), &t)
           != 0)
    {
        abort();
    }

    return t;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    u_char        detail[128];
    json_t       *body, *record;
    int64_t       since, until;
    const char   *error;
    json_error_t  jerr;

    fuzz_init();

    /* as ngx_http_civicgate_read_json() */
    body = json_loadb((const char *) data, size, JSON_REJECT_DUPLICATES,
                      &jerr);

    if (!json_is_object(body)) {
        json_decref(body);
        return 0;
    }

    error = NULL;
    record = ngx_http_civicgate_status_body(body, detail, sizeof(detail),
                                            &error);
    json_decref(body);

    if (record == NULL) {
        if (error == NULL) {
            abort();
        }

        return 0;
    }

    if (json_string_value(json_object_get(record, "state")) == NULL
        || json_object_get(record, "message") == NULL)
    {
        abort();
    }

    since = fuzz_time(record, "since");
    until = fuzz_time(record, "until");

    if (since == -1 || (until != -1 && until < since)) {
        abort();
    }

    json_decref(record);

    return 0;
}
