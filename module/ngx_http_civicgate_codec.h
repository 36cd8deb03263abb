
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_CODEC_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_CODEC_H_INCLUDED_


/* Pure parts: journey ID codec and channel matching; no nginx headers. */

#include <stdint.h>

#include "ngx_http_civicgate_crypto.h"


/*
 * A journey ID is 100 bits: a 64-bit random unique part followed by the
 * first 36 bits of HMAC-SHA256(journey subkey, "civicgate-journey" || unique),
 * written as 20 Crockford base32 symbols in four groups of five.
 */
#define NGX_HTTP_CIVICGATE_JID_UNIQUE    8
#define NGX_HTTP_CIVICGATE_JID_RAW       13       /* 100 bits, padded */
#define NGX_HTTP_CIVICGATE_JID_SYMBOLS   20
#define NGX_HTTP_CIVICGATE_JID_LEN       23       /* with hyphens */
#define NGX_HTTP_CIVICGATE_JID_INPUT_MAX 64


typedef struct {
    size_t         len;
    const u_char  *data;
} ngx_http_civicgate_bytes_t;


size_t ngx_http_civicgate_base32_encode(const u_char *in, size_t nbits,
    u_char *out);
int ngx_http_civicgate_base32_decode(const u_char *in, size_t nsymbols,
    u_char *out);
int ngx_http_civicgate_base32_value(u_char c);

int ngx_http_civicgate_jid_parse(const u_char *in, size_t len, u_char *raw);
void ngx_http_civicgate_jid_format(const u_char *raw, u_char *out);
int ngx_http_civicgate_jid_mint(const ngx_http_civicgate_keyring_t *ring,
    u_char *raw);
int ngx_http_civicgate_jid_verify(const ngx_http_civicgate_keyring_t *ring,
    const u_char *raw);

int ngx_http_civicgate_channel_match(const u_char *value, size_t len,
    const ngx_http_civicgate_bytes_t *names, size_t n);
int ngx_http_civicgate_name_valid(const u_char *name, size_t len,
    size_t max);

/* RFC 3339 date-time: "2027-01-31T12:00:00Z", fractions and offsets ok */
#define NGX_HTTP_CIVICGATE_RFC3339_LEN  20

int ngx_http_civicgate_rfc3339_parse(const u_char *in, size_t len,
    int64_t *t);
void ngx_http_civicgate_rfc3339_format(int64_t t, u_char *out);


#endif /* _NGX_HTTP_CIVICGATE_CODEC_H_INCLUDED_ */
