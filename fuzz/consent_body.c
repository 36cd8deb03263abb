
/*
 * Copyright (C) civicgate authors
 */


/*
 * Consent bodies: the input is the body of a grant or withdrawal (PUT or
 * DELETE /consents/PURPOSE), loaded as the module loads request bodies
 * and checked by the module into the record it stores; and, as it is,
 * a record read back from Redis by the consent check.  A grant the module
 * accepts must be a valid consent when checked right away.
 */

#include "fuzz.h"
#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_consent.h"


static void
fuzz_change(json_t *body, ngx_uint_t grant)
{
    json_t      *record;
    const char  *error;

    record = json_pack("{s:s, s:s, s:n}", "status",
                       grant ? "granted" : "withdrawn", "channel", "web",
                       "journey");
    if (record == NULL) {
        abort();
    }

    error = NULL;

    if (ngx_http_civicgate_consent_options(body, grant, record, &error)
        != NGX_OK)
    {
        if (error == NULL) {
            abort();
        }

    } else if (grant
               && ngx_http_civicgate_consent_record_valid(record, ngx_time())
                  < 0)
    {
        abort();
    }

    json_decref(record);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_t       *body;
    json_error_t  jerr;

    fuzz_init();

    /* as ngx_http_civicgate_read_json() */
    body = json_loadb((const char *) data, size, JSON_REJECT_DUPLICATES,
                      &jerr);

    if (!json_is_object(body)) {
        json_decref(body);
        return 0;
    }

    (void) ngx_http_civicgate_consent_record_valid(body, ngx_time());

    fuzz_change(body, 1);
    fuzz_change(body, 0);

    json_decref(body);

    return 0;
}
