
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_SIGN_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_SIGN_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <openssl/evp.h>


/*
 * The gateway's Ed25519 signing keys (civicgate_signing_key): the first
 * signs, all are published as a JWK Set (civicgate_jwks) and verify.
 * Loaded at configuration time; OpenSSL does every operation.
 */


#define NGX_HTTP_CIVICGATE_KID_MAX        32
#define NGX_HTTP_CIVICGATE_ED25519_PUB    32
#define NGX_HTTP_CIVICGATE_ED25519_SIG    64

/* a notice code: 50 bits as ten Crockford symbols, "XXXXX-XXXXX" */
#define NGX_HTTP_CIVICGATE_NOTICE_SYMBOLS 10
#define NGX_HTTP_CIVICGATE_NOTICE_LEN     11
#define NGX_HTTP_CIVICGATE_NOTICE_INPUT_MAX  32


typedef struct {
    EVP_PKEY                      *pkey;
    u_char                         pub[NGX_HTTP_CIVICGATE_ED25519_PUB];
    ngx_str_t                      kid;
    ngx_str_t                      path;
} ngx_http_civicgate_signing_key_t;


typedef struct {
    ngx_array_t                    keys;      /* of signing_key_t; [0] signs */
    ngx_str_t                      jwks;      /* the JWK Set, once built */
    u_char                         etag_data[20];
    ngx_str_t                      etag;
} ngx_http_civicgate_keyset_t;


char *ngx_http_civicgate_signing_key(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_civicgate_jwks(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_civicgate_keyset_init(ngx_conf_t *cf,
    ngx_http_civicgate_keyset_t *ks);

ngx_int_t ngx_http_civicgate_sign(ngx_http_civicgate_keyset_t *ks,
    const u_char *msg, size_t len, u_char *sig);
ngx_int_t ngx_http_civicgate_sign_verify(ngx_http_civicgate_keyset_t *ks,
    const u_char *kid, size_t kid_len, const u_char *msg, size_t len,
    const u_char *sig, size_t sig_len);
ngx_int_t ngx_http_civicgate_jws(ngx_pool_t *pool,
    ngx_http_civicgate_keyset_t *ks, ngx_str_t *payload, ngx_str_t *jws,
    u_char *sig);

void ngx_http_civicgate_notice_code(const u_char *sig, u_char *out);
ngx_int_t ngx_http_civicgate_notice_parse(const u_char *in, size_t len,
    u_char *out);


#endif /* _NGX_HTTP_CIVICGATE_SIGN_H_INCLUDED_ */
