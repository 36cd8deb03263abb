
/*
 * Copyright (C) civicgate authors
 */


/* the SHA256_* block functions make a keyed HMAC a copy and two blocks */
#define OPENSSL_SUPPRESS_DEPRECATED

#include <string.h>
#include <stdio.h>
#include <unistd.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>

#include "ngx_http_civicgate_crypto.h"


#define NGX_HTTP_CIVICGATE_INFO_JOURNEY   "civicgate journey id v1"
#define NGX_HTTP_CIVICGATE_INFO_RECEIPT   "civicgate consent receipt v1"
#define NGX_HTTP_CIVICGATE_INFO_CITIZEN   "civicgate citizen pseudonym v1"
#define NGX_HTTP_CIVICGATE_INFO_LIMIT     "civicgate limit key v1"


static int ngx_http_civicgate_keyring_line(ngx_http_civicgate_keyring_t *ring,
    const u_char *p, const u_char *end, size_t line, char *err,
    size_t err_len);
static int ngx_http_civicgate_keyring_room(ngx_http_civicgate_keyring_t *ring,
    const u_char *id, size_t id_len, size_t hex_len, size_t line, char *err,
    size_t err_len);
static int ngx_http_civicgate_key_derive(ngx_http_civicgate_key_t *key);
static int ngx_http_civicgate_unhex(const u_char *in, size_t len,
    u_char *out);


int
ngx_http_civicgate_hmac_sha256(const u_char *key, size_t key_len,
    const u_char *msg, size_t msg_len, u_char *out)
{
    unsigned int  len;

    len = NGX_HTTP_CIVICGATE_SHA256_LEN;

    if (HMAC(EVP_sha256(), key, (int) key_len, msg, msg_len, out, &len)
        == NULL)
    {
        return -1;
    }

    return 0;
}


int
ngx_http_civicgate_hkdf_sha256(const u_char *ikm, size_t ikm_len,
    const char *info, u_char *out, size_t out_len)
{
    int            rc;
    EVP_PKEY_CTX  *pctx;

    pctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, NULL);
    if (pctx == NULL) {
        return -1;
    }

    rc = -1;

    if (EVP_PKEY_derive_init(pctx) > 0
        && EVP_PKEY_CTX_set_hkdf_md(pctx, EVP_sha256()) > 0
        && EVP_PKEY_CTX_set1_hkdf_key(pctx, ikm, (int) ikm_len) > 0
        && EVP_PKEY_CTX_add1_hkdf_info(pctx, (const u_char *) info,
                                       (int) strlen(info)) > 0
        && EVP_PKEY_derive(pctx, out, &out_len) > 0)
    {
        rc = 0;
    }

    EVP_PKEY_CTX_free(pctx);

    return rc;
}


/*
 * Small draws come from a buffer refilled from OpenSSL's RNG, and never
 * from one filled before a fork.
 */

int
ngx_http_civicgate_random(u_char *buf, size_t len)
{
    pid_t          pid;
    static u_char  pool[512];
    static size_t  pos = sizeof(pool);
    static pid_t   owner;

    if (len > sizeof(pool) / 4) {
        return RAND_bytes(buf, (int) len) == 1 ? 0 : -1;
    }

    pid = getpid();

    if (pid != owner || pos + len > sizeof(pool)) {
        if (RAND_bytes(pool, sizeof(pool)) != 1) {
            return -1;
        }

        pos = 0;
        owner = pid;
    }

    memcpy(buf, pool + pos, len);
    OPENSSL_cleanse(pool + pos, len);
    pos += len;

    return 0;
}


void
ngx_http_civicgate_mac_init(ngx_http_civicgate_mac_t *mac, const u_char *key,
    size_t key_len)
{
    size_t  i;
    u_char  pad[SHA256_CBLOCK], digest[SHA256_DIGEST_LENGTH];

    if (key_len > SHA256_CBLOCK) {
        SHA256(key, key_len, digest);
        key = digest;
        key_len = sizeof(digest);
    }

    memset(pad, 0, sizeof(pad));
    memcpy(pad, key, key_len);

    for (i = 0; i < sizeof(pad); i++) {
        pad[i] ^= 0x36;
    }

    SHA256_Init(&mac->inner);
    SHA256_Update(&mac->inner, pad, sizeof(pad));

    for (i = 0; i < sizeof(pad); i++) {
        pad[i] ^= 0x36 ^ 0x5c;
    }

    SHA256_Init(&mac->outer);
    SHA256_Update(&mac->outer, pad, sizeof(pad));

    OPENSSL_cleanse(pad, sizeof(pad));
    OPENSSL_cleanse(digest, sizeof(digest));
}


void
ngx_http_civicgate_mac(const ngx_http_civicgate_mac_t *mac, const u_char *msg,
    size_t msg_len, u_char *out)
{
    SHA256_CTX  ctx;

    ctx = mac->inner;
    SHA256_Update(&ctx, msg, msg_len);
    SHA256_Final(out, &ctx);

    ctx = mac->outer;
    SHA256_Update(&ctx, out, SHA256_DIGEST_LENGTH);
    SHA256_Final(out, &ctx);

    OPENSSL_cleanse(&ctx, sizeof(ctx));
}


int
ngx_http_civicgate_keyring_parse(ngx_http_civicgate_keyring_t *ring,
    const u_char *text, size_t len, const u_char *pseudonym_id,
    size_t pseudonym_id_len, char *err, size_t err_len)
{
    size_t         i, line;
    const u_char  *p, *end, *eol;

    memset(ring, 0, sizeof(ngx_http_civicgate_keyring_t));

    p = text;
    end = text + len;

    for (line = 1; p < end; line++) {
        eol = memchr(p, '\n', end - p);
        if (eol == NULL) {
            eol = end;
        }

        if (ngx_http_civicgate_keyring_line(ring, p, eol, line, err, err_len)
            != 0)
        {
            return -1;
        }

        p = eol + 1;
    }

    if (ring->nkeys == 0) {
        snprintf(err, err_len, "no key found");
        return -1;
    }

    ring->pseudonym = ring->nkeys - 1;

    if (pseudonym_id != NULL) {
        for (i = 0; i < ring->nkeys; i++) {
            if (ring->keys[i].id_len == pseudonym_id_len
                && memcmp(ring->keys[i].id, pseudonym_id, pseudonym_id_len)
                   == 0)
            {
                break;
            }
        }

        if (i == ring->nkeys) {
            snprintf(err, err_len, "pseudonym key \"%.*s\" not found",
                     (int) pseudonym_id_len, pseudonym_id);
            return -1;
        }

        ring->pseudonym = i;
    }

    if (ngx_http_civicgate_hkdf_sha256(ring->keys[ring->pseudonym].secret,
                                       ring->keys[ring->pseudonym].secret_len,
                                       NGX_HTTP_CIVICGATE_INFO_CITIZEN,
                                       ring->citizen,
                                       NGX_HTTP_CIVICGATE_SUBKEY_LEN)
        != 0
        || ngx_http_civicgate_hkdf_sha256(ring->keys[ring->pseudonym].secret,
                                       ring->keys[ring->pseudonym].secret_len,
                                       NGX_HTTP_CIVICGATE_INFO_LIMIT,
                                       ring->limit,
                                       NGX_HTTP_CIVICGATE_SUBKEY_LEN)
           != 0)
    {
        snprintf(err, err_len, "key derivation failed");
        return -1;
    }

    ngx_http_civicgate_mac_init(&ring->citizen_mac, ring->citizen,
                                NGX_HTTP_CIVICGATE_SUBKEY_LEN);
    ngx_http_civicgate_mac_init(&ring->limit_mac, ring->limit,
                                NGX_HTTP_CIVICGATE_SUBKEY_LEN);

    return 0;
}


static int
ngx_http_civicgate_keyring_line(ngx_http_civicgate_keyring_t *ring,
    const u_char *p, const u_char *end, size_t line, char *err,
    size_t err_len)
{
    size_t                     id_len, hex_len;
    const u_char              *id, *hex;
    ngx_http_civicgate_key_t  *key;

    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r')) {
        p++;
    }

    while (end > p && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r')) {
        end--;
    }

    if (p == end || *p == '#') {
        return 0;
    }

    id = p;
    while (p < end && *p != ' ' && *p != '\t') {
        p++;
    }
    id_len = p - id;

    while (p < end && (*p == ' ' || *p == '\t')) {
        p++;
    }

    hex = p;
    hex_len = end - p;

    if (ngx_http_civicgate_keyring_room(ring, id, id_len, hex_len, line, err,
                                        err_len)
        != 0)
    {
        return -1;
    }

    key = &ring->keys[ring->nkeys];

    if (ngx_http_civicgate_unhex(hex, hex_len, key->secret) != 0) {
        snprintf(err, err_len, "line %zu: key \"%.*s\" is not valid hex",
                 line, (int) id_len, id);
        return -1;
    }

    memcpy(key->id, id, id_len);
    key->id_len = id_len;
    key->secret_len = hex_len / 2;

    if (ngx_http_civicgate_key_derive(key) != 0) {
        snprintf(err, err_len, "line %zu: key derivation failed", line);
        return -1;
    }

    ring->nkeys++;

    return 0;
}


/* a new key's ID and length, before it is added: 0, or -1 and err */

static int
ngx_http_civicgate_keyring_room(ngx_http_civicgate_keyring_t *ring,
    const u_char *id, size_t id_len, size_t hex_len, size_t line, char *err,
    size_t err_len)
{
    size_t  i;

    for (i = 0; i < id_len; i++) {
        if (!((id[i] >= 'a' && id[i] <= 'z') || (id[i] >= 'A' && id[i] <= 'Z')
              || (id[i] >= '0' && id[i] <= '9')
              || id[i] == '.' || id[i] == '_' || id[i] == '-'))
        {
            break;
        }
    }

    if (id_len > NGX_HTTP_CIVICGATE_KEY_ID_MAX || i != id_len || hex_len == 0) {
        snprintf(err, err_len, "line %zu: expected \"ID HEX\"", line);
        return -1;
    }

    if (ring->nkeys == NGX_HTTP_CIVICGATE_KEYS_MAX) {
        snprintf(err, err_len, "line %zu: more than %d keys",
                 line, NGX_HTTP_CIVICGATE_KEYS_MAX);
        return -1;
    }

    for (i = 0; i < ring->nkeys; i++) {
        if (ring->keys[i].id_len == id_len
            && memcmp(ring->keys[i].id, id, id_len) == 0)
        {
            snprintf(err, err_len, "line %zu: duplicate key id \"%.*s\"",
                     line, (int) id_len, id);
            return -1;
        }
    }

    if (hex_len % 2 || hex_len / 2 > NGX_HTTP_CIVICGATE_KEY_MAX) {
        snprintf(err, err_len, "line %zu: key \"%.*s\" is not 32 to %d bytes "
                 "of hex", line, (int) id_len, id, NGX_HTTP_CIVICGATE_KEY_MAX);
        return -1;
    }

    if (hex_len / 2 < NGX_HTTP_CIVICGATE_KEY_MIN) {
        snprintf(err, err_len, "line %zu: key \"%.*s\" is shorter than %d "
                 "bytes", line, (int) id_len, id, NGX_HTTP_CIVICGATE_KEY_MIN);
        return -1;
    }

    return 0;
}


static int
ngx_http_civicgate_key_derive(ngx_http_civicgate_key_t *key)
{
    if (ngx_http_civicgate_hkdf_sha256(key->secret, key->secret_len,
                                       NGX_HTTP_CIVICGATE_INFO_JOURNEY,
                                       key->journey,
                                       NGX_HTTP_CIVICGATE_SUBKEY_LEN)
        != 0)
    {
        return -1;
    }

    if (ngx_http_civicgate_hkdf_sha256(key->secret, key->secret_len,
                                       NGX_HTTP_CIVICGATE_INFO_RECEIPT,
                                       key->receipt,
                                       NGX_HTTP_CIVICGATE_SUBKEY_LEN)
        != 0)
    {
        return -1;
    }

    ngx_http_civicgate_mac_init(&key->journey_mac, key->journey,
                                NGX_HTTP_CIVICGATE_SUBKEY_LEN);

    return 0;
}


static int
ngx_http_civicgate_unhex(const u_char *in, size_t len, u_char *out)
{
    size_t  i;
    int     v, nibble;

    v = 0;

    for (i = 0; i < len; i++) {
        if (in[i] >= '0' && in[i] <= '9') {
            nibble = in[i] - '0';

        } else if ((in[i] | 0x20) >= 'a' && (in[i] | 0x20) <= 'f') {
            nibble = (in[i] | 0x20) - 'a' + 10;

        } else {
            return -1;
        }

        if (i % 2 == 0) {
            v = nibble << 4;

        } else {
            out[i / 2] = (u_char) (v | nibble);
        }
    }

    return 0;
}


int
ngx_http_civicgate_pseudonym(const ngx_http_civicgate_keyring_t *ring,
    const u_char *raw, size_t raw_len, u_char *out)
{
    u_char  mac[NGX_HTTP_CIVICGATE_SHA256_LEN];

    ngx_http_civicgate_mac(&ring->citizen_mac, raw, raw_len, mac);

    ngx_http_civicgate_hex(mac, NGX_HTTP_CIVICGATE_PSEUDONYM_LEN / 2, out);

    OPENSSL_cleanse(mac, sizeof(mac));

    return 0;
}


void
ngx_http_civicgate_hex(const u_char *in, size_t len, u_char *out)
{
    static const char  digits[] = "0123456789abcdef";

    while (len--) {
        *out++ = digits[*in >> 4];
        *out++ = digits[*in++ & 0xf];
    }
}
