
/*
 * Copyright (C) civicgate authors
 */


/*
 * RFC 3339 date-times as the status and consent bodies give them: what
 * parses formats back to 20 bytes that parse to the same time.  An offset
 * that carries the time out of the years 0000 to 9999 is refused: such a
 * time has no 4-digit year to be written back with (found by
 * fuzz/status_body.c and fuzz/consent_body.c).
 */

#include "ngx_http_civicgate_codec.h"
#include "tap.h"
#include "util.h"


static void
parse_is(const char *in, int ok, const char *desc)
{
    int64_t  t;
    int      rc;

    rc = ngx_http_civicgate_rfc3339_parse((const u_char *) in, strlen(in),
                                          &t);

    if (!tap_ok((rc == 0) == ok, "%s: \"%s\"", desc, in)) {
        tap_diag("parse returned %d", rc);
    }
}


static void
roundtrip_is(const char *in, const char *want)
{
    int64_t  t, again;
    u_char   out[NGX_HTTP_CIVICGATE_RFC3339_LEN + 1];

    if (!tap_ok(ngx_http_civicgate_rfc3339_parse((const u_char *) in,
                                                 strlen(in), &t) == 0,
                "parses: \"%s\"", in))
    {
        return;
    }

    ngx_http_civicgate_rfc3339_format(t, out);
    out[NGX_HTTP_CIVICGATE_RFC3339_LEN] = '\0';

    if (!tap_ok(strcmp((char *) out, want) == 0, "formats as %s", want)) {
        tap_diag("got \"%s\"", out);
    }

    tap_ok(ngx_http_civicgate_rfc3339_parse(out,
                                            NGX_HTTP_CIVICGATE_RFC3339_LEN,
                                            &again) == 0
           && again == t, "\"%s\" reads back", want);
}


int
main(void)
{
    roundtrip_is("2026-11-29T22:13:49Z", "2026-11-29T22:13:49Z");
    roundtrip_is("2026-11-30T05:13:49.5+07:00", "2026-11-29T22:13:49Z");
    roundtrip_is("0000-01-01T00:00:00Z", "0000-01-01T00:00:00Z");
    roundtrip_is("9999-12-31T23:59:59Z", "9999-12-31T23:59:59Z");
    roundtrip_is("9999-12-31T23:59:59+23:59", "9999-12-31T00:00:59Z");
    roundtrip_is("0000-01-01T00:00:00-01:00", "0000-01-01T01:00:00Z");

    /* past the last second of 9999, before the first of 0000 */
    parse_is("9999-12-31T23:59:59-00:01", 0, "after 9999");
    parse_is("9999-12-31T23:59:59-23:59", 0, "after 9999");
    parse_is("0000-01-01T00:00:00+00:01", 0, "before 0000");
    parse_is("0000-01-01T00:59:59+01:00", 0, "before 0000");

    parse_is("2026-02-29T00:00:00Z", 0, "no leap day");
    parse_is("2026-11-29T22:13:49", 0, "no offset");

    return tap_done();
}
