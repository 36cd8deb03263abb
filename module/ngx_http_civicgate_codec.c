
/*
 * Copyright (C) civicgate authors
 */


#include <stdio.h>
#include <string.h>
#include <time.h>
#include <openssl/crypto.h>

#include "ngx_http_civicgate_codec.h"


#define NGX_HTTP_CIVICGATE_JID_CONTEXT  "civicgate-journey"
#define NGX_HTTP_CIVICGATE_JID_GROUP    5


static void ngx_http_civicgate_jid_tag(const ngx_http_civicgate_mac_t *mac,
    const u_char *unique, u_char *tag);
static int ngx_http_civicgate_digits(const u_char *p, size_t n, int *v);
static int64_t ngx_http_civicgate_days(int64_t y, int m, int d);


static const u_char  ngx_http_civicgate_crockford[] =
    "0123456789ABCDEFGHJKMNPQRSTVWXYZ";


/* bits move through an accumulator: a byte in, a symbol out */

size_t
ngx_http_civicgate_base32_encode(const u_char *in, size_t nbits, u_char *out)
{
    size_t    i, n, have, next;
    uint32_t  acc, byte;

    n = (nbits + 4) / 5;
    acc = 0;
    have = 0;
    next = 0;

    for (i = 0; i < n; i++) {
        if (have < 5) {
            byte = 0;

            if (next * 8 < nbits) {
                byte = in[next];

                /* bits past nbits must not show */
                if ((next + 1) * 8 > nbits) {
                    byte &= 0xff << ((next + 1) * 8 - nbits);
                }
            }

            acc = (acc << 8) | byte;
            next++;
            have += 8;
        }

        have -= 5;
        out[i] = ngx_http_civicgate_crockford[(acc >> have) & 0x1f];
    }

    return n;
}


/* out must hold (nsymbols * 5 + 7) / 8 bytes; trailing pad bits are zero */

int
ngx_http_civicgate_base32_decode(const u_char *in, size_t nsymbols,
    u_char *out)
{
    int       v;
    size_t    i, have, o;
    uint32_t  acc;

    acc = 0;
    have = 0;
    o = 0;

    for (i = 0; i < nsymbols; i++) {
        v = ngx_http_civicgate_base32_value(in[i]);
        if (v < 0) {
            return -1;
        }

        acc = (acc << 5) | (uint32_t) v;
        have += 5;

        if (have >= 8) {
            have -= 8;
            out[o++] = (u_char) (acc >> have);
        }
    }

    if (have) {
        out[o] = (u_char) (acc << (8 - have));
    }

    return 0;
}


static const signed char  ngx_http_civicgate_crockford_values[256] = {
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
     0,  1,  2,  3,  4,  5,  6,  7,  8,  9, -1, -1, -1, -1, -1, -1,
    /* @ A   B   C   D   E   F   G   H   I   J   K   L   M   N   O */
    -1, 10, 11, 12, 13, 14, 15, 16, 17,  1, 18, 19,  1, 20, 21,  0,
    /* P Q   R   S   T   U   V   W   X   Y   Z */
    22, 23, 24, 25, 26, -1, 27, 28, 29, 30, 31, -1, -1, -1, -1, -1,
    -1, 10, 11, 12, 13, 14, 15, 16, 17,  1, 18, 19,  1, 20, 21,  0,
    22, 23, 24, 25, 26, -1, 27, 28, 29, 30, 31, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1
};


/* Crockford: case-insensitive, I and L read as 1, O as 0, no U */

int
ngx_http_civicgate_base32_value(u_char c)
{
    return ngx_http_civicgate_crockford_values[c];
}


int
ngx_http_civicgate_jid_parse(const u_char *in, size_t len, u_char *raw)
{
    size_t  i, n;
    u_char  symbols[NGX_HTTP_CIVICGATE_JID_SYMBOLS];

    if (len > NGX_HTTP_CIVICGATE_JID_INPUT_MAX) {
        return -1;
    }

    n = 0;

    for (i = 0; i < len; i++) {
        if (in[i] == '-') {
            continue;
        }

        if (n == NGX_HTTP_CIVICGATE_JID_SYMBOLS) {
            return -1;
        }

        symbols[n++] = in[i];
    }

    if (n != NGX_HTTP_CIVICGATE_JID_SYMBOLS) {
        return -1;
    }

    if (ngx_http_civicgate_base32_decode(symbols, n, raw) != 0) {
        return -1;
    }

    /* 20 symbols are exactly 100 bits: the pad nibble is always zero */

    return 0;
}


void
ngx_http_civicgate_jid_format(const u_char *raw, u_char *out)
{
    size_t  i;
    u_char  symbols[NGX_HTTP_CIVICGATE_JID_SYMBOLS];

    ngx_http_civicgate_base32_encode(raw, NGX_HTTP_CIVICGATE_JID_SYMBOLS * 5,
                                     symbols);

    for (i = 0; i < NGX_HTTP_CIVICGATE_JID_SYMBOLS; i++) {
        if (i && i % NGX_HTTP_CIVICGATE_JID_GROUP == 0) {
            *out++ = '-';
        }

        *out++ = symbols[i];
    }
}


int
ngx_http_civicgate_jid_mint(const ngx_http_civicgate_keyring_t *ring,
    u_char *raw)
{
    if (ring->nkeys == 0
        || ngx_http_civicgate_random(raw, NGX_HTTP_CIVICGATE_JID_UNIQUE) != 0)
    {
        return -1;
    }

    ngx_http_civicgate_jid_tag(&ring->keys[0].journey_mac, raw,
                               raw + NGX_HTTP_CIVICGATE_JID_UNIQUE);
    return 0;
}


/* returns the index of the key that signed raw, or -1 */

int
ngx_http_civicgate_jid_verify(const ngx_http_civicgate_keyring_t *ring,
    const u_char *raw)
{
    size_t  i;
    u_char  tag[NGX_HTTP_CIVICGATE_JID_RAW - NGX_HTTP_CIVICGATE_JID_UNIQUE];

    for (i = 0; i < ring->nkeys; i++) {
        ngx_http_civicgate_jid_tag(&ring->keys[i].journey_mac, raw, tag);

        if (CRYPTO_memcmp(tag, raw + NGX_HTTP_CIVICGATE_JID_UNIQUE,
                          sizeof(tag))
            == 0)
        {
            return (int) i;
        }
    }

    return -1;
}


static void
ngx_http_civicgate_jid_tag(const ngx_http_civicgate_mac_t *mac,
    const u_char *unique, u_char *tag)
{
    size_t  n;
    u_char  msg[sizeof(NGX_HTTP_CIVICGATE_JID_CONTEXT) - 1
                + NGX_HTTP_CIVICGATE_JID_UNIQUE];
    u_char  out[NGX_HTTP_CIVICGATE_SHA256_LEN];

    n = sizeof(NGX_HTTP_CIVICGATE_JID_CONTEXT) - 1;
    memcpy(msg, NGX_HTTP_CIVICGATE_JID_CONTEXT, n);
    memcpy(msg + n, unique, NGX_HTTP_CIVICGATE_JID_UNIQUE);

    ngx_http_civicgate_mac(mac, msg, sizeof(msg), out);

    memcpy(tag, out,
           NGX_HTTP_CIVICGATE_JID_RAW - NGX_HTTP_CIVICGATE_JID_UNIQUE);
    tag[NGX_HTTP_CIVICGATE_JID_RAW - NGX_HTTP_CIVICGATE_JID_UNIQUE - 1] &= 0xf0;
}


int
ngx_http_civicgate_channel_match(const u_char *value, size_t len,
    const ngx_http_civicgate_bytes_t *names, size_t n)
{
    size_t  i, j;
    u_char  c;

    for (i = 0; i < n; i++) {
        if (names[i].len != len) {
            continue;
        }

        for (j = 0; j < len; j++) {
            c = value[j];

            if (c >= 'A' && c <= 'Z') {
                c |= 0x20;
            }

            if (c != names[i].data[j]) {
                break;
            }
        }

        if (j == len) {
            return (int) i;
        }
    }

    return -1;
}


/* a configured name: [a-z0-9_-], 1 to max bytes */

int
ngx_http_civicgate_name_valid(const u_char *name, size_t len, size_t max)
{
    size_t  i;

    if (len == 0 || len > max) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if (!((name[i] >= 'a' && name[i] <= 'z')
              || (name[i] >= '0' && name[i] <= '9')
              || name[i] == '_' || name[i] == '-'))
        {
            return 0;
        }
    }

    return 1;
}


static int
ngx_http_civicgate_digits(const u_char *p, size_t n, int *v)
{
    size_t  i;

    *v = 0;

    for (i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return -1;
        }

        *v = *v * 10 + (p[i] - '0');
    }

    return 0;
}


/* days since 1970-01-01 of a proleptic Gregorian date */

static int64_t
ngx_http_civicgate_days(int64_t y, int m, int d)
{
    int64_t  era, yoe, doy, doe;

    y -= (m <= 2);
    era = (y >= 0 ? y : y - 399) / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;

    return era * 146097 + doe - 719468;
}


int
ngx_http_civicgate_rfc3339_parse(const u_char *in, size_t len, int64_t *t)
{
    int            y, mo, d, h, mi, s, oh, om, sign;
    size_t         i;
    int64_t        utc;
    static const   int mdays[] = { 31, 29, 31, 30, 31, 30, 31, 31, 30, 31,
                                   30, 31 };

    if (len < 20 || in[4] != '-' || in[7] != '-'
        || (in[10] != 'T' && in[10] != 't') || in[13] != ':' || in[16] != ':'
        || ngx_http_civicgate_digits(in, 4, &y) != 0
        || ngx_http_civicgate_digits(in + 5, 2, &mo) != 0
        || ngx_http_civicgate_digits(in + 8, 2, &d) != 0
        || ngx_http_civicgate_digits(in + 11, 2, &h) != 0
        || ngx_http_civicgate_digits(in + 14, 2, &mi) != 0
        || ngx_http_civicgate_digits(in + 17, 2, &s) != 0)
    {
        return -1;
    }

    if (mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] || h > 23
        || mi > 59 || s > 60
        || (mo == 2 && d == 29
            && !(y % 4 == 0 && (y % 100 != 0 || y % 400 == 0))))
    {
        return -1;
    }

    i = 19;

    if (in[i] == '.') {
        for (i++; i < len && in[i] >= '0' && in[i] <= '9'; i++) {
            /* fractions of a second are dropped */
        }

        if (i == 20) {
            return -1;
        }
    }

    oh = 0;
    om = 0;
    sign = 1;

    if (i + 1 == len && (in[i] == 'Z' || in[i] == 'z')) {
        /* UTC */

    } else if (i + 6 == len && (in[i] == '+' || in[i] == '-')
               && in[i + 3] == ':'
               && ngx_http_civicgate_digits(in + i + 1, 2, &oh) == 0
               && ngx_http_civicgate_digits(in + i + 4, 2, &om) == 0
               && oh <= 23 && om <= 59)
    {
        sign = (in[i] == '-') ? -1 : 1;

    } else {
        return -1;
    }

    utc = ngx_http_civicgate_days(y, mo, d) * 86400
          + h * 3600 + mi * 60 + (s == 60 ? 59 : s)
          - sign * (oh * 3600 + om * 60);

    /* an offset past the years 0000-9999: no 4-digit year to write back */
    if (utc < ngx_http_civicgate_days(0, 1, 1) * 86400
        || utc >= ngx_http_civicgate_days(10000, 1, 1) * 86400)
    {
        return -1;
    }

    *t = utc;

    return 0;
}


void
ngx_http_civicgate_rfc3339_format(int64_t t, u_char *out)
{
    char       buf[80];
    time_t     tt;
    struct tm  tm;

    tt = (time_t) t;
    gmtime_r(&tt, &tm);

    snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02dZ",
             tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
             tm.tm_hour, tm.tm_min, tm.tm_sec);

    memcpy(out, buf, NGX_HTTP_CIVICGATE_RFC3339_LEN);
}
