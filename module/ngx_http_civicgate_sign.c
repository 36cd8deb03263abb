
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <openssl/sha.h>

#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_conf.h"


#define NGX_HTTP_CIVICGATE_JWKS_MAX_AGE  "public, max-age=300"


static ngx_int_t ngx_http_civicgate_key_load(ngx_conf_t *cf,
    ngx_str_t *path, ngx_http_civicgate_signing_key_t *key);
static ngx_int_t ngx_http_civicgate_key_file_mode(ngx_conf_t *cf,
    ngx_str_t *path);
static ngx_int_t ngx_http_civicgate_kid(ngx_conf_t *cf,
    ngx_http_civicgate_keyset_t *ks, ngx_str_t *param,
    ngx_http_civicgate_signing_key_t *key);
static void ngx_http_civicgate_key_free(void *data);
static ngx_int_t ngx_http_civicgate_jwks_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_civicgate_b64url(ngx_pool_t *pool,
    const u_char *data, size_t len, ngx_str_t *out);


static ngx_str_t  ngx_http_civicgate_jwks_type =
    ngx_string("application/jwk-set+json");


/* civicgate_signing_key PATH [kid=NAME]; repeatable, the first signs */

char *
ngx_http_civicgate_signing_key(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_civicgate_main_conf_t *cgmcf = conf;

    ngx_str_t                         *value, *kid;
    ngx_uint_t                         i;
    ngx_pool_cleanup_t                *cln;
    ngx_http_civicgate_signing_key_t  *key;

    value = cf->args->elts;
    kid = NULL;

    for (i = 2; i < cf->args->nelts; i++) {
        if (ngx_strncmp(value[i].data, "kid=", 4) == 0) {
            kid = &value[i];
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid parameter \"%V\"", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (cgmcf->signing == NULL) {
        cgmcf->signing = ngx_pcalloc(cf->pool,
                                     sizeof(ngx_http_civicgate_keyset_t));
        if (cgmcf->signing == NULL
            || ngx_array_init(&cgmcf->signing->keys, cf->pool, 2,
                              sizeof(ngx_http_civicgate_signing_key_t))
               != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }
    }

    if (ngx_conf_full_name(cf->cycle, &value[1], 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    key = ngx_array_push(&cgmcf->signing->keys);
    if (key == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(key, sizeof(ngx_http_civicgate_signing_key_t));
    key->path = value[1];

    if (ngx_http_civicgate_key_load(cf, &value[1], key) != NGX_OK) {
        cgmcf->signing->keys.nelts--;
        return NGX_CONF_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        EVP_PKEY_free(key->pkey);
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_http_civicgate_key_free;
    cln->data = key->pkey;

    if (ngx_http_civicgate_kid(cf, cgmcf->signing, kid, key) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/* the PEM file: a private Ed25519 key, not readable by others */

static ngx_int_t
ngx_http_civicgate_key_load(ngx_conf_t *cf, ngx_str_t *path,
    ngx_http_civicgate_signing_key_t *key)
{
    BIO        *bio;
    size_t      len;
    ngx_str_t   text;

    if (ngx_http_civicgate_key_file_mode(cf, path) != NGX_OK
        || ngx_http_civicgate_read_file(cf, path, &text) != NGX_OK)
    {
        return NGX_ERROR;
    }

    bio = BIO_new_mem_buf(text.data, (int) text.len);
    if (bio == NULL) {
        ngx_explicit_memzero(text.data, text.len);
        return NGX_ERROR;
    }

    key->pkey = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);

    BIO_free(bio);
    ngx_explicit_memzero(text.data, text.len);

    if (key->pkey == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "signing key \"%V\" is not a PEM private key",
                           path);
        return NGX_ERROR;
    }

    len = sizeof(key->pub);

    if (EVP_PKEY_get_id(key->pkey) != EVP_PKEY_ED25519
        || EVP_PKEY_get_raw_public_key(key->pkey, key->pub, &len) != 1
        || len != sizeof(key->pub))
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "signing key \"%V\" is not an Ed25519 key "
                           "(openssl genpkey -algorithm ed25519)", path);
        EVP_PKEY_free(key->pkey);
        key->pkey = NULL;
        return NGX_ERROR;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_key_file_mode(ngx_conf_t *cf, ngx_str_t *path)
{
    ngx_uint_t       mode;
    ngx_file_info_t  fi;

    if (ngx_file_info(path->data, &fi) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_file_info_n " \"%V\" failed", path);
        return NGX_ERROR;
    }

    mode = ngx_file_access(&fi);

    if (mode & 007) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "signing key \"%V\" is accessible to every user "
                           "(mode %ui%ui%ui): chmod o-rwx it", path,
                           (mode >> 6) & 7, (mode >> 3) & 7, mode & 7);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * kid=NAME, or by default base64url of the first 8 bytes of SHA-256 of
 * the raw public key (11 characters): the same key always has the same ID.
 */

static ngx_int_t
ngx_http_civicgate_kid(ngx_conf_t *cf, ngx_http_civicgate_keyset_t *ks,
    ngx_str_t *param, ngx_http_civicgate_signing_key_t *key)
{
    u_char                            *p, digest[SHA256_DIGEST_LENGTH];
    ngx_str_t                          raw;
    ngx_uint_t                         i;
    ngx_http_civicgate_signing_key_t  *k;

    if (param != NULL) {
        key->kid.data = param->data + 4;
        key->kid.len = param->len - 4;

        for (p = key->kid.data; p < key->kid.data + key->kid.len; p++) {
            if (!(isalnum(*p) || *p == '.' || *p == '_' || *p == '-')) {
                break;
            }
        }

        if (key->kid.len == 0 || key->kid.len > NGX_HTTP_CIVICGATE_KID_MAX
            || p != key->kid.data + key->kid.len)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid \"%V\": 1 to %d letters, digits, "
                               "\".\", \"_\" or \"-\"", param,
                               NGX_HTTP_CIVICGATE_KID_MAX);
            return NGX_ERROR;
        }

    } else {
        SHA256(key->pub, sizeof(key->pub), digest);
        raw.data = digest;
        raw.len = 8;

        key->kid.data = ngx_pnalloc(cf->pool, ngx_base64_encoded_length(8));
        if (key->kid.data == NULL) {
            return NGX_ERROR;
        }

        ngx_encode_base64url(&key->kid, &raw);
    }

    k = ks->keys.elts;

    for (i = 0; i + 1 < ks->keys.nelts; i++) {
        if (ngx_memcmp(k[i].pub, key->pub, sizeof(key->pub)) == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "signing key \"%V\" is the same key as "
                               "\"%V\"", &key->path, &k[i].path);
            return NGX_ERROR;
        }

        if (k[i].kid.len == key->kid.len
            && ngx_strncmp(k[i].kid.data, key->kid.data, key->kid.len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate signing key id \"%V\"", &key->kid);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static void
ngx_http_civicgate_key_free(void *data)
{
    EVP_PKEY_free(data);
}


/* the JWK Set (RFC 7517, RFC 8037) and its ETag, at the end of http{} */

ngx_int_t
ngx_http_civicgate_keyset_init(ngx_conf_t *cf, ngx_http_civicgate_keyset_t *ks)
{
    u_char                            *p, digest[SHA256_DIGEST_LENGTH];
    json_t                            *set, *list;
    ngx_str_t                          x;
    ngx_uint_t                         i;
    ngx_http_civicgate_signing_key_t  *k;

    list = json_array();
    set = json_pack("{s:o}", "keys", list);
    k = ks->keys.elts;

    for (i = 0; set != NULL && i < ks->keys.nelts; i++) {
        if (ngx_http_civicgate_b64url(cf->pool, k[i].pub, sizeof(k[i].pub),
                                      &x)
            != NGX_OK)
        {
            json_decref(set);
            return NGX_ERROR;
        }

        json_array_append_new(list,
            json_pack("{s:s, s:s, s:s%, s:s%, s:s, s:s}",
                      "kty", "OKP", "crv", "Ed25519",
                      "x", (char *) x.data, x.len,
                      "kid", (char *) k[i].kid.data, k[i].kid.len,
                      "use", "sig", "alg", "EdDSA"));
    }

    if (ngx_http_civicgate_json_dump(cf->pool, set, 0, &ks->jwks) != NGX_OK) {
        json_decref(set);
        return NGX_ERROR;
    }

    json_decref(set);

    SHA256(ks->jwks.data, ks->jwks.len, digest);

    ks->etag.data = ks->etag_data;
    p = ngx_cpymem(ks->etag_data, "\"", 1);
    p = ngx_hex_dump(p, digest, 8);
    *p++ = '"';
    ks->etag.len = p - ks->etag_data;

    return NGX_OK;
}


char *
ngx_http_civicgate_jwks(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t        *clcf;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_civicgate_jwks_handler;

    cgmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_civicgate_module);

    /* checked at the end of http{}: the keys may come later */
    if (cgmcf->jwks_file == NULL) {
        cgmcf->jwks_file = cf->conf_file->file.name.data;
        cgmcf->jwks_line = cf->conf_file->line;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_civicgate_jwks_handler(ngx_http_request_t *r)
{
    ngx_int_t                        rc;
    ngx_table_elt_t                 *h;
    ngx_http_civicgate_keyset_t     *ks;
    ngx_http_civicgate_main_conf_t  *cgmcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return ngx_http_civicgate_method_not_allowed(r, "GET, HEAD");
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    cgmcf = ngx_http_get_module_main_conf(r, ngx_http_civicgate_module);
    ks = cgmcf->signing;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "ETag");
    h->value = ks->etag;
    r->headers_out.etag = h;

    h = ngx_http_civicgate_push_header(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Cache-Control");
    ngx_str_set(&h->value, NGX_HTTP_CIVICGATE_JWKS_MAX_AGE);

    /* If-None-Match: nginx's not-modified filter answers 304 on the ETag */
    return ngx_http_civicgate_send(r, NGX_HTTP_OK,
                                   &ngx_http_civicgate_jwks_type, &ks->jwks);
}


/* Ed25519 (pure EdDSA: no digest) with the first key; sig: 64 bytes */

ngx_int_t
ngx_http_civicgate_sign(ngx_http_civicgate_keyset_t *ks, const u_char *msg,
    size_t len, u_char *sig)
{
    size_t                             sig_len;
    ngx_int_t                          rc;
    EVP_MD_CTX                        *md;
    ngx_http_civicgate_signing_key_t  *k;

    k = ks->keys.elts;

    md = EVP_MD_CTX_new();
    if (md == NULL) {
        return NGX_ERROR;
    }

    sig_len = NGX_HTTP_CIVICGATE_ED25519_SIG;
    rc = NGX_ERROR;

    if (EVP_DigestSignInit(md, NULL, NULL, NULL, k[0].pkey) == 1
        && EVP_DigestSign(md, sig, &sig_len, msg, len) == 1
        && sig_len == NGX_HTTP_CIVICGATE_ED25519_SIG)
    {
        rc = NGX_OK;
    }

    EVP_MD_CTX_free(md);

    return rc;
}


/* NGX_OK: a valid signature by the key with this kid; else NGX_DECLINED */

ngx_int_t
ngx_http_civicgate_sign_verify(ngx_http_civicgate_keyset_t *ks,
    const u_char *kid, size_t kid_len, const u_char *msg, size_t len,
    const u_char *sig, size_t sig_len)
{
    ngx_int_t                          rc;
    ngx_uint_t                         i;
    EVP_MD_CTX                        *md;
    ngx_http_civicgate_signing_key_t  *k;

    k = ks->keys.elts;

    for (i = 0; i < ks->keys.nelts; i++) {
        if (k[i].kid.len == kid_len
            && ngx_strncmp(k[i].kid.data, kid, kid_len) == 0)
        {
            break;
        }
    }

    if (i == ks->keys.nelts || sig_len != NGX_HTTP_CIVICGATE_ED25519_SIG) {
        return NGX_DECLINED;
    }

    md = EVP_MD_CTX_new();
    if (md == NULL) {
        return NGX_ERROR;
    }

    rc = NGX_DECLINED;

    if (EVP_DigestVerifyInit(md, NULL, NULL, NULL, k[i].pkey) == 1
        && EVP_DigestVerify(md, sig, sig_len, msg, len) == 1)
    {
        rc = NGX_OK;
    }

    EVP_MD_CTX_free(md);

    return rc;
}


/*
 * A compact JWS (RFC 7515) of the payload bytes as they are, signed by
 * the first key: {"alg":"EdDSA","cty":"json","kid":...}.  sig, if not
 * NULL, receives the 64 signature bytes (a notice's code comes from them).
 */

ngx_int_t
ngx_http_civicgate_jws(ngx_pool_t *pool, ngx_http_civicgate_keyset_t *ks,
    ngx_str_t *payload, ngx_str_t *jws, u_char *sig)
{
    u_char                            *p, raw[NGX_HTTP_CIVICGATE_ED25519_SIG];
    size_t                             len;
    ngx_str_t                          header, src, dst;
    ngx_http_civicgate_signing_key_t  *k;

    k = ks->keys.elts;

    header.len = sizeof("{\"alg\":\"EdDSA\",\"cty\":\"json\",\"kid\":\"\"}") - 1
                 + k[0].kid.len;
    header.data = ngx_pnalloc(pool, header.len);
    if (header.data == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(header.data,
                "{\"alg\":\"EdDSA\",\"cty\":\"json\",\"kid\":\"%V\"}",
                &k[0].kid);

    len = ngx_base64_encoded_length(header.len) + 1
          + ngx_base64_encoded_length(payload->len) + 1
          + ngx_base64_encoded_length(sizeof(raw));

    jws->data = ngx_pnalloc(pool, len);
    if (jws->data == NULL) {
        return NGX_ERROR;
    }

    dst.data = jws->data;
    ngx_encode_base64url(&dst, &header);
    p = jws->data + dst.len;
    *p++ = '.';

    dst.data = p;
    ngx_encode_base64url(&dst, payload);
    p += dst.len;

    if (ngx_http_civicgate_sign(ks, jws->data, p - jws->data, raw) != NGX_OK) {
        return NGX_ERROR;
    }

    *p++ = '.';

    src.data = raw;
    src.len = sizeof(raw);
    dst.data = p;
    ngx_encode_base64url(&dst, &src);
    p += dst.len;

    jws->len = p - jws->data;

    if (sig != NULL) {
        ngx_memcpy(sig, raw, sizeof(raw));
    }

    return NGX_OK;
}


/* the first 50 bits of a signature as "XXXXX-XXXXX" (Crockford base32) */

void
ngx_http_civicgate_notice_code(const u_char *sig, u_char *out)
{
    u_char  symbols[NGX_HTTP_CIVICGATE_NOTICE_SYMBOLS];

    ngx_http_civicgate_base32_encode(sig, NGX_HTTP_CIVICGATE_NOTICE_SYMBOLS * 5,
                                     symbols);

    out = ngx_cpymem(out, symbols, 5);
    *out++ = '-';
    ngx_memcpy(out, symbols + 5, 5);
}


/*
 * A code as a person types it: any case, hyphens anywhere or none,
 * Crockford's I/L for 1 and O for 0.  The canonical form into out.
 */

ngx_int_t
ngx_http_civicgate_notice_parse(const u_char *in, size_t len, u_char *out)
{
    size_t  i, n;
    u_char  symbols[NGX_HTTP_CIVICGATE_NOTICE_SYMBOLS], raw[8];

    if (len > NGX_HTTP_CIVICGATE_NOTICE_INPUT_MAX) {
        return NGX_ERROR;
    }

    n = 0;

    for (i = 0; i < len; i++) {
        if (in[i] == '-') {
            continue;
        }

        if (n == NGX_HTTP_CIVICGATE_NOTICE_SYMBOLS) {
            return NGX_ERROR;
        }

        symbols[n++] = in[i];
    }

    if (n != NGX_HTTP_CIVICGATE_NOTICE_SYMBOLS
        || ngx_http_civicgate_base32_decode(symbols, n, raw) != 0)
    {
        return NGX_ERROR;
    }

    ngx_http_civicgate_notice_code(raw, out);

    return NGX_OK;
}


static ngx_int_t
ngx_http_civicgate_b64url(ngx_pool_t *pool, const u_char *data, size_t len,
    ngx_str_t *out)
{
    ngx_str_t  src;

    out->data = ngx_pnalloc(pool, ngx_base64_encoded_length(len) + 1);
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    src.data = (u_char *) data;
    src.len = len;
    ngx_encode_base64url(out, &src);
    out->data[out->len] = '\0';

    return NGX_OK;
}
