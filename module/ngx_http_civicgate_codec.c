
/*
 * Copyright (C) civicgate authors
 */


#include <string.h>
#include <openssl/crypto.h>

#include "ngx_http_civicgate_codec.h"


#define NGX_HTTP_CIVICGATE_JID_CONTEXT  "civicgate-journey"
#define NGX_HTTP_CIVICGATE_JID_GROUP    5


static void ngx_http_civicgate_jid_tag(const u_char *subkey,
    const u_char *unique, u_char *tag);


static const u_char  ngx_http_civicgate_crockford[] =
    "0123456789ABCDEFGHJKMNPQRSTVWXYZ";


size_t
ngx_http_civicgate_base32_encode(const u_char *in, size_t nbits, u_char *out)
{
    size_t  i, n, bit, v;

    n = (nbits + 4) / 5;

    for (i = 0; i < n; i++) {
        v = 0;

        for (bit = i * 5; bit < i * 5 + 5; bit++) {
            v <<= 1;

            if (bit < nbits) {
                v |= (in[bit / 8] >> (7 - bit % 8)) & 1;
            }
        }

        out[i] = ngx_http_civicgate_crockford[v];
    }

    return n;
}


/* out must hold (nsymbols * 5 + 7) / 8 bytes; trailing pad bits are zero */

int
ngx_http_civicgate_base32_decode(const u_char *in, size_t nsymbols,
    u_char *out)
{
    int     v;
    size_t  i, bit, b;

    memset(out, 0, (nsymbols * 5 + 7) / 8);

    for (i = 0; i < nsymbols; i++) {
        v = ngx_http_civicgate_base32_value(in[i]);
        if (v < 0) {
            return -1;
        }

        for (b = 0; b < 5; b++) {
            bit = i * 5 + b;

            if (v & (0x10 >> b)) {
                out[bit / 8] |= (u_char) (0x80 >> (bit % 8));
            }
        }
    }

    return 0;
}


int
ngx_http_civicgate_base32_value(u_char c)
{
    if (c >= 'a' && c <= 'z') {
        c -= 'a' - 'A';
    }

    switch (c) {
    case 'O':
        return 0;
    case 'I':
    case 'L':
        return 1;
    case 'U':
        return -1;
    }

    if (c >= '0' && c <= '9') {
        return c - '0';
    }

    if (c >= 'A' && c <= 'Z') {
        return (int) (strchr((const char *) ngx_http_civicgate_crockford, c)
                      - (const char *) ngx_http_civicgate_crockford);
    }

    return -1;
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

    ngx_http_civicgate_jid_tag(ring->keys[0].journey, raw,
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
        ngx_http_civicgate_jid_tag(ring->keys[i].journey, raw, tag);

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
ngx_http_civicgate_jid_tag(const u_char *subkey, const u_char *unique,
    u_char *tag)
{
    size_t  n;
    u_char  msg[sizeof(NGX_HTTP_CIVICGATE_JID_CONTEXT) - 1
                + NGX_HTTP_CIVICGATE_JID_UNIQUE];
    u_char  mac[NGX_HTTP_CIVICGATE_SHA256_LEN];

    n = sizeof(NGX_HTTP_CIVICGATE_JID_CONTEXT) - 1;
    memcpy(msg, NGX_HTTP_CIVICGATE_JID_CONTEXT, n);
    memcpy(msg + n, unique, NGX_HTTP_CIVICGATE_JID_UNIQUE);

    if (ngx_http_civicgate_hmac_sha256(subkey, NGX_HTTP_CIVICGATE_SUBKEY_LEN,
                                       msg, sizeof(msg), mac)
        != 0)
    {
        /* an all-ones tag never matches a computed one by design */
        memset(mac, 0xff, sizeof(mac));
    }

    memcpy(tag, mac, NGX_HTTP_CIVICGATE_JID_RAW - NGX_HTTP_CIVICGATE_JID_UNIQUE);
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
