
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_CRYPTO_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_CRYPTO_H_INCLUDED_


/*
 * Pure parts: OpenSSL and libc only, no nginx headers, so that
 * lua-free-tests/ can build them without an nginx process.
 */

#include <stddef.h>
#include <sys/types.h>
#include <openssl/sha.h>


#define NGX_HTTP_CIVICGATE_KEY_MIN      32
#define NGX_HTTP_CIVICGATE_KEY_MAX      128
#define NGX_HTTP_CIVICGATE_KEY_ID_MAX   32
#define NGX_HTTP_CIVICGATE_KEYS_MAX     16
#define NGX_HTTP_CIVICGATE_SUBKEY_LEN   32
#define NGX_HTTP_CIVICGATE_SHA256_LEN   32


/* HMAC-SHA256 with the key's inner and outer states computed once */
typedef struct {
    SHA256_CTX  inner;
    SHA256_CTX  outer;
} ngx_http_civicgate_mac_t;


typedef struct {
    u_char      id[NGX_HTTP_CIVICGATE_KEY_ID_MAX + 1];
    size_t      id_len;
    u_char      secret[NGX_HTTP_CIVICGATE_KEY_MAX];
    size_t      secret_len;

    /* subkeys derived with HKDF, one per purpose */
    u_char      journey[NGX_HTTP_CIVICGATE_SUBKEY_LEN];
    u_char      receipt[NGX_HTTP_CIVICGATE_SUBKEY_LEN];
    ngx_http_civicgate_mac_t  journey_mac;
} ngx_http_civicgate_key_t;


typedef struct {
    ngx_http_civicgate_key_t  keys[NGX_HTTP_CIVICGATE_KEYS_MAX];
    size_t                    nkeys;        /* keys[0] signs */
    size_t                    pseudonym;    /* index of the pseudonym key */
    u_char                    citizen[NGX_HTTP_CIVICGATE_SUBKEY_LEN];
    u_char                    limit[NGX_HTTP_CIVICGATE_SUBKEY_LEN];
    ngx_http_civicgate_mac_t  citizen_mac;
    ngx_http_civicgate_mac_t  limit_mac;
} ngx_http_civicgate_keyring_t;


int ngx_http_civicgate_hmac_sha256(const u_char *key, size_t key_len,
    const u_char *msg, size_t msg_len, u_char *out);
int ngx_http_civicgate_hkdf_sha256(const u_char *ikm, size_t ikm_len,
    const char *info, u_char *out, size_t out_len);
int ngx_http_civicgate_random(u_char *buf, size_t len);
void ngx_http_civicgate_mac_init(ngx_http_civicgate_mac_t *mac,
    const u_char *key, size_t key_len);
void ngx_http_civicgate_mac(const ngx_http_civicgate_mac_t *mac,
    const u_char *msg, size_t msg_len, u_char *out);

/*
 * Parses a secret file: one key a line, "ID HEX", newest first; "#"
 * starts a comment.  pseudonym_id selects the key that pseudonymises
 * citizens (NULL: the last, oldest key).  Returns 0, or -1 with a message
 * in err.
 */
int ngx_http_civicgate_keyring_parse(ngx_http_civicgate_keyring_t *ring,
    const u_char *text, size_t len, const u_char *pseudonym_id,
    size_t pseudonym_id_len, char *err, size_t err_len);

/* pseudonym: 32 lowercase hex digits written to out; 0, or -1 on error */
#define NGX_HTTP_CIVICGATE_PSEUDONYM_LEN  32

int ngx_http_civicgate_pseudonym(const ngx_http_civicgate_keyring_t *ring,
    const u_char *raw, size_t raw_len, u_char *out);

void ngx_http_civicgate_hex(const u_char *in, size_t len, u_char *out);


#endif /* _NGX_HTTP_CIVICGATE_CRYPTO_H_INCLUDED_ */
