
/*
 * Copyright (C) civicgate authors
 */


/*
 * Unit tests for module/ngx_http_civicgate_codec.c: Crockford base32,
 * journey ID parse/format/mint/verify, channel matching and name
 * validation.  Known vectors were computed independently with python3;
 * journey tags are also recomputed here with OpenSSL's HMAC() directly.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "ngx_http_civicgate_codec.h"
#include "tap.h"

#define RNG_SEED  0x9e3779b97f4a7c15ULL
#include "util.h"


#define RAW      NGX_HTTP_CIVICGATE_JID_RAW
#define JID_LEN  NGX_HTTP_CIVICGATE_JID_LEN

/* 32 bytes 00..1f and 48 bytes 40..6f, as in test_crypto.c */
#define KEY_OLD_HEX                                                          \
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
#define KEY_NEW_HEX                                                          \
    "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"     \
    "606162636465666768696a6b6c6d6e6f"

/* HKDF-SHA256(old key, salt = "", info = "civicgate journey id v1", 32) */
#define OLD_JOURNEY_HEX                                                      \
    "925550adfd022478ac268377de7b651226e8c7af9192892698eccd0acc6c2f86"

/* unique 0123456789abcdef, tagged with the old and with the new key */
#define OLD_JID      "04HMA-SW9NF-6YZ4Q-8WHVE"
#define OLD_JID_RAW  "0123456789abcdef92e8e476e0"
#define NEW_JID      "04HMA-SW9NF-6YZF4-QC8NR"
#define NEW_JID_RAW  "0123456789abcdefbc97622b80"

/* an unsigned ID with 0 and 1 symbols, for the Crockford substitutions */
#define SUB_JID      "01ABC-DEF01-GHJKM-NPQR0"
#define SUB_JID_RAW  "0054b635cf0061194e95b5f000"


static const char  alphabet[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

static ngx_http_civicgate_keyring_t  ring_old, ring_new, ring_both;
static ngx_http_civicgate_keyring_t  ring_empty;


/* Crockford symbols: the alphabet, lowercase too, and O, I, L */
static int
symbol_ok(u_char c)
{
    if (c >= 'a' && c <= 'z') {
        c -= 'a' - 'A';
    }

    return c != '\0' && (strchr(alphabet, c) != NULL
                         || c == 'O' || c == 'I' || c == 'L');
}


static int
parse(const char *s, u_char *raw)
{
    return ngx_http_civicgate_jid_parse((const u_char *) s, strlen(s), raw);
}


static void
load_ring(ngx_http_civicgate_keyring_t *ring, const char *text)
{
    char  err[256];

    if (ngx_http_civicgate_keyring_parse(ring, (const u_char *) text,
                                         strlen(text), NULL, 0, err,
                                         sizeof(err))
        != 0)
    {
        tap_diag("keyring_parse failed: %s", err);
        exit(2);
    }
}


/* the spec's tag, recomputed with OpenSSL directly */
static void
expected_tag(const u_char *subkey, const u_char *unique, u_char *tag)
{
    u_char        msg[17 + 8], mac[EVP_MAX_MD_SIZE];
    unsigned int  len;

    memcpy(msg, "civicgate-journey", 17);
    memcpy(msg + 17, unique, 8);

    len = sizeof(mac);
    if (HMAC(EVP_sha256(), subkey, 32, msg, sizeof(msg), mac, &len) == NULL)
    {
        abort();
    }

    memcpy(tag, mac, 5);
    tag[4] &= 0xf0;
}


/* encodes nbits of hex, compares with the expected symbols */
static void
encode_is(const char *hex, size_t nbits, const char *expected)
{
    u_char  in[64], out[128];
    size_t  n;

    memset(in, 0, sizeof(in));
    unhex(hex, in);
    memset(out, '#', sizeof(out));

    n = ngx_http_civicgate_base32_encode(in, nbits, out);

    tap_is_int((long) n, (long) strlen(expected),
               "base32_encode %s/%zu bits: returns %zu symbols", hex, nbits,
               strlen(expected));
    tap_is_str(out, n, expected, "base32_encode %s/%zu bits: \"%s\"", hex,
               nbits, expected);
    tap_ok(out[n] == '#', "base32_encode %s/%zu bits: writes no further",
           hex, nbits);
}


static void
decode_is(const char *symbols, const char *hex)
{
    u_char  out[64], exp[64];
    size_t  n, nbytes;

    n = strlen(symbols);
    nbytes = (n * 5 + 7) / 8;
    unhex(hex, exp);
    memset(out, 0xa5, sizeof(out));

    tap_is_int(ngx_http_civicgate_base32_decode((const u_char *) symbols, n,
                                                out),
               0, "base32_decode \"%s\": returns 0", symbols);
    tap_is_mem(out, exp, nbytes, "base32_decode \"%s\": %s", symbols, hex);
    tap_ok(out[nbytes] == 0xa5, "base32_decode \"%s\": writes %zu bytes",
           symbols, nbytes);
}


static void
test_base32_vectors(void)
{
    encode_is("", 0, "");
    encode_is("00", 8, "00");
    encode_is("ff", 8, "ZW");
    encode_is("66", 8, "CR");
    encode_is("666f6f626172", 48, "CSQPYRK1E8");
    encode_is("ffffffffff", 40, "ZZZZZZZZ");
    encode_is("8421084210", 40, "GGGGGGGG");
    encode_is("0102030405060708090a0b0c0d", 100, "041061050R3GG28A1C60");
    encode_is("ffffffffffffffffffffffffff", 100, "ZZZZZZZZZZZZZZZZZZZZ");
    /* bits past nbits are ignored, even inside the last byte */
    encode_is("ff", 3, "W");
    encode_is("ffff", 12, "ZZR");
    encode_is("ffffffffffffffffffffffffff", 99, "ZZZZZZZZZZZZZZZZZZZY");

    decode_is("", "");
    decode_is("ZW", "ff00");
    decode_is("W", "e0");
    decode_is("ZZR", "fff0");
    decode_is("CSQPYRK1E8", "666f6f62617200");
    decode_is("csqpyrk1e8", "666f6f62617200");
    decode_is("GGGGGGGG", "8421084210");
    decode_is("ZZZZZZZZZZZZZZZZZZZZ", "fffffffffffffffffffffffff0");
    decode_is("7K3MQ9XZ2A0B4CDEF5GH", "3cc74ba7bf1280b231ae796110");
    /* Crockford substitutions: O -> 0, I and L -> 1 */
    decode_is("OIL0il1o", "0042008420");
}


static void
test_base32_value(void)
{
    int          c, expected, bad;
    const char  *p;

    bad = 0;

    for (c = 0; c < 256; c++) {
        expected = -1;

        if (c != 0) {
            p = strchr(alphabet, c >= 'a' && c <= 'z' ? c - 32 : c);
            if (p != NULL) {
                expected = (int) (p - alphabet);
            }
        }

        if (c == 'O' || c == 'o') {
            expected = 0;

        } else if (c == 'I' || c == 'i' || c == 'L' || c == 'l') {
            expected = 1;
        }

        if (ngx_http_civicgate_base32_value((u_char) c) != expected) {
            tap_diag("  base32_value(0x%02x) = %d, expected %d", c,
                     ngx_http_civicgate_base32_value((u_char) c), expected);
            bad++;
        }
    }

    tap_is_int(bad, 0, "base32_value: all 256 bytes (alphabet, lowercase, "
               "O/I/L, U and the rest invalid)");

    tap_is_int(ngx_http_civicgate_base32_value('U'), -1,
               "base32_value: U is invalid");
    tap_is_int(ngx_http_civicgate_base32_value('u'), -1,
               "base32_value: u is invalid");
    tap_is_int(ngx_http_civicgate_base32_value('Z'), 31,
               "base32_value: Z = 31");
    tap_is_int(ngx_http_civicgate_base32_value('v'), 27,
               "base32_value: v = 27");
}


static void
test_base32_invalid(void)
{
    static const char  bad[] = "Uu*- =#\x80\xff\n";
    u_char             in[8], out[8];
    size_t             i;

    /* every invalid byte, at the start, middle and end of a 4-symbol run */
    for (i = 0; i < sizeof(bad); i++) {
        memcpy(in, "ABCD", 4);
        in[0] = (u_char) bad[i];
        tap_is_int(ngx_http_civicgate_base32_decode(in, 4, out), -1,
                   "base32_decode: 0x%02x first is invalid",
                   (u_char) bad[i]);
        memcpy(in, "ABCD", 4);
        in[2] = (u_char) bad[i];
        tap_is_int(ngx_http_civicgate_base32_decode(in, 4, out), -1,
                   "base32_decode: 0x%02x inside is invalid",
                   (u_char) bad[i]);
        memcpy(in, "ABCD", 4);
        in[3] = (u_char) bad[i];
        tap_is_int(ngx_http_civicgate_base32_decode(in, 4, out), -1,
                   "base32_decode: 0x%02x last is invalid",
                   (u_char) bad[i]);
    }
}


static void
test_base32_roundtrip(void)
{
    u_char  in[40], sym[70], out[48], exp[48];
    size_t  i, j, nbits, nbytes, n, fail;

    fail = 0;

    for (i = 0; i < 2000; i++) {
        nbits = i < 321 ? i : rng() % 321;
        nbytes = (nbits + 7) / 8;

        for (j = 0; j < sizeof(in); j++) {
            in[j] = (u_char) rng();
        }

        n = ngx_http_civicgate_base32_encode(in, nbits, sym);

        if (n != (nbits + 4) / 5) {
            tap_diag("  %zu bits: %zu symbols", nbits, n);
            fail++;
            continue;
        }

        for (j = 0; j < n; j++) {
            if (strchr(alphabet, sym[j]) == NULL || sym[j] == '\0') {
                break;
            }
        }

        if (j != n) {
            tap_diag("  %zu bits: symbol 0x%02x not in alphabet", nbits,
                     sym[j]);
            fail++;
            continue;
        }

        /* expected decode: the input bits, zero-padded to 5n bits */
        memset(exp, 0, sizeof(exp));
        memcpy(exp, in, nbytes);
        if (nbits % 8) {
            exp[nbits / 8] &= (u_char) (0xff00 >> (nbits % 8));
        }

        memset(out, 0xa5, sizeof(out));

        if (ngx_http_civicgate_base32_decode(sym, n, out) != 0
            || memcmp(out, exp, (n * 5 + 7) / 8) != 0)
        {
            tap_diag("  %zu bits: round trip differs", nbits);
            fail++;
        }
    }

    tap_is_int((long) fail, 0,
               "base32: 2000 random bit strings (0..320 bits) round-trip");
}


static void
parse_is(const char *in, const char *raw_hex, const char *desc)
{
    u_char  raw[RAW + 4], exp[RAW];

    unhex(raw_hex, exp);
    memset(raw, 0xa5, sizeof(raw));

    tap_is_int(parse(in, raw), 0, "jid_parse: %s: accepted", desc);
    tap_is_mem(raw, exp, RAW, "jid_parse: %s: raw value", desc);
    tap_ok(raw[RAW] == 0xa5, "jid_parse: %s: writes 13 bytes", desc);
}


static void
parse_fails(const u_char *in, size_t len, const char *desc)
{
    u_char  raw[RAW + 4];

    tap_is_int(ngx_http_civicgate_jid_parse(in, len, raw), -1,
               "jid_parse: %s: rejected", desc);
}


static void
test_jid_parse(void)
{
    char    buf[300];
    size_t  i;

    parse_is(OLD_JID, OLD_JID_RAW, "canonical");
    parse_is("04HMASW9NF6YZ4Q8WHVE", OLD_JID_RAW, "no hyphens");
    parse_is("04hma-sw9nf-6yz4q-8whve", OLD_JID_RAW, "lowercase");
    parse_is("04hMa-Sw9nF-6yZ4q-8WhvE", OLD_JID_RAW, "mixed case");
    parse_is("-04-HMASW9NF6YZ4Q8WHV-E-", OLD_JID_RAW, "hyphens anywhere");
    parse_is("--04HMA--SW9NF6YZ4Q8WHVE--", OLD_JID_RAW, "double hyphens");

    /* Crockford substitutions: O/o -> 0, I/i/L/l -> 1 */
    parse_is(SUB_JID, SUB_JID_RAW, "canonical with 0 and 1");
    parse_is("OIABC-DEFOL-GHJKM-NPQRO", SUB_JID_RAW, "O, I, L");
    parse_is("oiabc-defol-ghjkm-npqro", SUB_JID_RAW, "o, i, l");
    parse_is("0lABC-DEFoI-GHJKM-NPQRo", SUB_JID_RAW, "mixed substitutes");

    parse_is("ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ", "fffffffffffffffffffffffff0",
             "all ones");
    parse_is("00000-00000-00000-00000", "00000000000000000000000000",
             "all zeros");

    /* lengths: 19 and 21 symbols, with and without hyphens */
    parse_fails((const u_char *) "04HMA-SW9NF-6YZ4Q-8WHV", 22,
                "19 symbols");
    parse_fails((const u_char *) "04HMASW9NF6YZ4Q8WHV", 19,
                "19 symbols, no hyphens");
    parse_fails((const u_char *) "04HMA-SW9NF-6YZ4Q--8WHV", 23,
                "19 symbols padded to 23 chars");
    parse_fails((const u_char *) "04HMA-SW9NF-6YZ4Q-8WHVE0", 24,
                "21 symbols");
    parse_fails((const u_char *) "04HMASW9NF6YZ4Q8WHVE0", 21,
                "21 symbols, no hyphens");
    parse_fails((const u_char *) "04HMASW9NF6YZ4Q8WHVE04HMASW9NF6YZ4Q8WHVE",
                40, "two IDs concatenated");
    parse_fails((const u_char *) "", 0, "empty");
    parse_fails((const u_char *) "-----", 5, "only hyphens");

    /* 64 chars (20 symbols, 44 hyphens) is the longest input accepted */
    memset(buf, '-', sizeof(buf));
    memcpy(buf, "04HMASW9NF6YZ4Q8WHVE", 20);
    buf[64] = '\0';
    parse_is(buf, OLD_JID_RAW, "64 chars, 44 of them hyphens");
    buf[64] = '-';
    parse_fails((const u_char *) buf, 65, "65 chars, 45 of them hyphens");
    parse_fails((const u_char *) buf, 164, "164 chars, 144 of them hyphens");

    memset(buf, 'A', sizeof(buf));
    parse_fails((const u_char *) buf, 64, "64 symbols");
    parse_fails((const u_char *) buf, sizeof(buf), "300 symbols");

    /* invalid bytes */
    parse_fails((const u_char *) "04HMA-SW9NF-6YZ4Q-8WHVU", 23, "U");
    parse_fails((const u_char *) "u4HMA-SW9NF-6YZ4Q-8WHVE", 23, "u");
    parse_fails((const u_char *) "04HMA-SW9NF\0-6YZ4Q-8WHVE", 24,
                "NUL between groups");
    parse_fails((const u_char *) "04HMA-SW9NF-6YZ4Q-8WHV\0", 23,
                "NUL in place of a symbol");
    parse_fails((const u_char *) "04HMA-SW9NF-6YZ4Q-8WHVE\0", 24,
                "trailing NUL");
    parse_fails((const u_char *) "04HMA SW9NF-6YZ4Q-8WHVE", 23, "space");
    parse_fails((const u_char *) " 04HMA-SW9NF-6YZ4Q-8WHVE", 24,
                "leading space");
    parse_fails((const u_char *) "04HMA-SW9NF-6YZ4Q-8WHVE\r\n", 25,
                "trailing CRLF");
    parse_fails((const u_char *) "04HMA_SW9NF_6YZ4Q_8WHVE", 23,
                "underscores");
    parse_fails((const u_char *) "04HMA+SW9NF-6YZ4Q-8WHVE", 23, "plus");
    parse_fails((const u_char *) "04HMA-SW9NF-6YZ4Q-8WH\xc3\x89", 23,
                "UTF-8 byte");

    /* every position, every invalid printable byte */
    for (i = 0; i < 20; i++) {
        size_t  c, fails = 0, tried = 0;
        u_char  raw[RAW];

        for (c = 0; c < 256; c++) {
            if (c == '-' || symbol_ok((u_char) c)) {
                continue;
            }

            memcpy(buf, "04HMASW9NF6YZ4Q8WHVE", 20);
            buf[i] = (char) c;
            tried++;

            if (ngx_http_civicgate_jid_parse((u_char *) buf, 20, raw) == -1) {
                fails++;
            }
        }

        tap_ok(tried == 256 - 60 - 1 && fails == tried,
               "jid_parse: symbol %zu: each of %zu invalid bytes rejected",
               i, tried);
    }
}


static void
format_is(const char *raw_hex, const char *expected)
{
    u_char  raw[RAW], out[JID_LEN + 4];

    unhex(raw_hex, raw);
    memset(out, '#', sizeof(out));
    ngx_http_civicgate_jid_format(raw, out);

    tap_is_str(out, JID_LEN, expected, "jid_format %s", raw_hex);
    tap_ok(out[JID_LEN] == '#', "jid_format %s: writes 23 bytes", raw_hex);
}


static int
canonical(const u_char *s)
{
    size_t  i;

    for (i = 0; i < JID_LEN; i++) {
        if (i == 5 || i == 11 || i == 17) {
            if (s[i] != '-') {
                return 0;
            }

        } else if (s[i] == '\0' || strchr(alphabet, s[i]) == NULL) {
            return 0;
        }
    }

    return 1;
}


static void
test_jid_format(void)
{
    u_char  raw[RAW], back[RAW], out[JID_LEN];
    size_t  i, j, fail;

    format_is(OLD_JID_RAW, OLD_JID);
    format_is(NEW_JID_RAW, NEW_JID);
    format_is(SUB_JID_RAW, SUB_JID);
    format_is("fffffffffffffffffffffffff0", "ZZZZZ-ZZZZZ-ZZZZZ-ZZZZZ");
    format_is("00000000000000000000000000", "00000-00000-00000-00000");
    format_is("3cc74ba7bf1280b231ae796110", "7K3MQ-9XZ2A-0B4CD-EF5GH");

    fail = 0;

    for (i = 0; i < 1000; i++) {
        for (j = 0; j < RAW; j++) {
            raw[j] = (u_char) rng();
        }
        raw[RAW - 1] &= 0xf0;

        ngx_http_civicgate_jid_format(raw, out);

        if (!canonical(out)
            || ngx_http_civicgate_jid_parse(out, JID_LEN, back) != 0
            || memcmp(raw, back, RAW) != 0)
        {
            fail++;
        }
    }

    tap_is_int((long) fail, 0,
               "jid_format: 1000 random IDs: XXXXX-XXXXX-XXXXX-XXXXX, "
               "parse back to the same raw");
}


static void
test_jid_verify(void)
{
    u_char  raw[RAW];

    unhex(OLD_JID_RAW, raw);
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_old, raw), 0,
               "jid_verify: known old-key ID, old ring: key 0");
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_both, raw), 1,
               "jid_verify: known old-key ID, new+old ring: key 1");
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_new, raw), -1,
               "jid_verify: known old-key ID, new-only ring: rejected");

    unhex(NEW_JID_RAW, raw);
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_both, raw), 0,
               "jid_verify: known new-key ID, new+old ring: key 0");
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_old, raw), -1,
               "jid_verify: known new-key ID, old ring: rejected");

    unhex(OLD_JID_RAW, raw);
    raw[RAW - 1] |= 0x01;
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_old, raw), -1,
               "jid_verify: non-zero pad bits: rejected");

    unhex(SUB_JID_RAW, raw);
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_both, raw), -1,
               "jid_verify: unsigned ID: rejected");

    unhex(OLD_JID_RAW, raw);
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_empty, raw), -1,
               "jid_verify: empty ring: rejected");
}


static void
test_jid_mint(void)
{
    u_char  raw[RAW], prev[RAW], tag[5], subkey[32], back[RAW];
    u_char  out[JID_LEN];
    size_t  i, bad_rc, bad_pad, bad_tag, bad_verify, bad_fmt, dup;

    unhex(OLD_JOURNEY_HEX, subkey);
    bad_rc = bad_pad = bad_tag = bad_verify = bad_fmt = dup = 0;
    memset(prev, 0, sizeof(prev));

    for (i = 0; i < 200; i++) {
        memset(raw, 0xa5, sizeof(raw));

        if (ngx_http_civicgate_jid_mint(&ring_old, raw) != 0) {
            bad_rc++;
            continue;
        }

        if (raw[RAW - 1] & 0x0f) {
            bad_pad++;
        }

        expected_tag(subkey, raw, tag);
        if (memcmp(tag, raw + 8, 5) != 0) {
            bad_tag++;
        }

        if (ngx_http_civicgate_jid_verify(&ring_old, raw) != 0
            || ngx_http_civicgate_jid_verify(&ring_both, raw) != 1
            || ngx_http_civicgate_jid_verify(&ring_new, raw) != -1)
        {
            bad_verify++;
        }

        ngx_http_civicgate_jid_format(raw, out);
        if (!canonical(out)
            || ngx_http_civicgate_jid_parse(out, JID_LEN, back) != 0
            || memcmp(raw, back, RAW) != 0)
        {
            bad_fmt++;
        }

        if (memcmp(prev, raw, 8) == 0) {
            dup++;
        }
        memcpy(prev, raw, RAW);
    }

    tap_is_int((long) bad_rc, 0, "jid_mint: 200 mints return 0");
    tap_is_int((long) bad_pad, 0, "jid_mint: pad nibble is zero");
    tap_is_int((long) bad_tag, 0,
               "jid_mint: tag = HMAC(journey subkey, context || unique)");
    tap_is_int((long) bad_verify, 0,
               "jid_mint: old ring mints; verify: old 0, new+old 1, new -1");
    tap_is_int((long) bad_fmt, 0, "jid_mint: format/parse round trip");
    tap_is_int((long) dup, 0, "jid_mint: unique part changes every time");

    /* a ring signs with its first key only */
    tap_is_int(ngx_http_civicgate_jid_mint(&ring_both, raw), 0,
               "jid_mint: new+old ring returns 0");
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_both, raw), 0,
               "jid_mint: new+old ring: signed by key 0");
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_new, raw), 0,
               "jid_mint: new+old ring: verifies under new key alone");
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_old, raw), -1,
               "jid_mint: new+old ring: not under old key alone");

    tap_is_int(ngx_http_civicgate_jid_mint(&ring_empty, raw), -1,
               "jid_mint: empty ring: -1");
}


static void
test_jid_tamper(void)
{
    u_char  raw[RAW], back[RAW], out[JID_LEN], bad[JID_LEN];
    size_t  i, k, pos, accepted, tried, bits;

    /* rotation: minted by an old-only ring, verified after the new key */
    tap_is_int(ngx_http_civicgate_jid_mint(&ring_old, raw), 0,
               "tamper: mint");
    ngx_http_civicgate_jid_format(raw, out);
    tap_is_int(ngx_http_civicgate_jid_parse(out, JID_LEN, back), 0,
               "tamper: canonical form parses");
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_both, back), 1,
               "rotation: old ID still verifies after prepending a key");

    /* each of the 20 symbols, replaced by each of the 31 others */
    for (i = 0; i < 20; i++) {
        pos = i + i / 5;
        accepted = tried = 0;

        for (k = 0; k < 32; k++) {
            if (alphabet[k] == out[pos]) {
                continue;
            }

            memcpy(bad, out, JID_LEN);
            bad[pos] = (u_char) alphabet[k];
            tried++;

            if (ngx_http_civicgate_jid_parse(bad, JID_LEN, back) != 0
                || ngx_http_civicgate_jid_verify(&ring_both, back) != -1)
            {
                accepted++;
            }
        }

        tap_ok(tried == 31 && accepted == 0,
               "tamper: symbol %zu: all 31 substitutes fail verify", i);
    }

    /* each of the 100 bits flipped in the raw value */
    accepted = 0;

    for (bits = 0; bits < 100; bits++) {
        memcpy(back, raw, RAW);
        back[bits / 8] ^= (u_char) (0x80 >> (bits % 8));

        if (ngx_http_civicgate_jid_verify(&ring_both, back) != -1) {
            accepted++;
        }
    }

    tap_is_int((long) accepted, 0, "tamper: each of 100 bit flips fails");

    /* a tag moved onto another unique part */
    memcpy(back, raw, RAW);
    back[0] ^= 0x01;
    back[7] ^= 0x01;
    tap_is_int(ngx_http_civicgate_jid_verify(&ring_both, back), -1,
               "tamper: two flipped unique bits fail");
}


static void
match_is(const char *value, size_t len, const ngx_http_civicgate_bytes_t *n,
    size_t nn, int expected, const char *desc)
{
    tap_is_int(ngx_http_civicgate_channel_match((const u_char *) value, len,
                                                n, nn),
               expected, "channel_match: %s", desc);
}


#define B(s)  { .data = (const u_char *) s, .len = sizeof(s) - 1 }

static void
test_channel_match(void)
{
    char  big[1000];

    static const ngx_http_civicgate_bytes_t  dflt[] = {
        B("web"), B("app"), B("sms"), B("email"), B("phone"), B("social"),
        B("counter")
    };

    static const ngx_http_civicgate_bytes_t  custom[] = {
        B("walk-in"), B("web2"), B("kiosk_1"),
        B("abcdefghijklmnopqrstuvwxyz012345")
    };

    match_is("web", 3, dflt, 7, 0, "web");
    match_is("counter", 7, dflt, 7, 6, "counter (last entry)");
    match_is("WEB", 3, dflt, 7, 0, "WEB (case-insensitive)");
    match_is("eMaIl", 5, dflt, 7, 3, "eMaIl");
    match_is("SOCIAL", 6, dflt, 7, 5, "SOCIAL");

    match_is("we", 2, dflt, 7, -1, "prefix we");
    match_is("webs", 4, dflt, 7, -1, "webs (longer)");
    match_is("web ", 4, dflt, 7, -1, "trailing space");
    match_is(" web", 4, dflt, 7, -1, "leading space");
    match_is("web\r\n", 5, dflt, 7, -1, "trailing CRLF");
    match_is("web\0", 4, dflt, 7, -1, "trailing NUL");
    match_is("w\0b", 3, dflt, 7, -1, "NUL inside");
    match_is("web", 2, dflt, 7, -1, "length honoured (we of web)");
    match_is("smsweb", 3, dflt, 7, 2, "length honoured (sms of smsweb)");
    match_is("", 0, dflt, 7, -1, "empty");
    match_is("unknown", 7, dflt, 7, -1, "unknown is not an entry");
    match_is("web", 3, dflt, 0, -1, "empty list");
    match_is("w\xc3\xa9" "b", 4, dflt, 7, -1, "non-ASCII");

    /* control bytes that a careless c | 0x20 fold would let through */
    match_is("walk-in", 7, custom, 4, 0, "walk-in");
    match_is("WALK-IN", 7, custom, 4, 0, "WALK-IN");
    match_is("walk\rin", 7, custom, 4, -1, "walk\\rin (CR vs -)");
    match_is("web2", 4, custom, 4, 1, "web2");
    match_is("web\x12", 4, custom, 4, -1, "web\\x12 (vs 2)");
    match_is("kiosk_1", 7, custom, 4, 2, "kiosk_1");
    match_is("KIOSK_1", 7, custom, 4, 2, "KIOSK_1");
    match_is("kiosk\x7f" "1", 7, custom, 4, -1, "kiosk\\x7f1 (DEL vs _)");
    match_is("kiosk_\x11", 7, custom, 4, -1, "kiosk_\\x11 (vs 1)");

    /* 32 bytes is the longest channel */
    match_is("abcdefghijklmnopqrstuvwxyz012345", 32, custom, 4, 3,
             "32-byte entry");
    match_is("ABCDEFGHIJKLMNOPQRSTUVWXYZ012345", 32, custom, 4, 3,
             "32-byte entry, uppercase");
    match_is("abcdefghijklmnopqrstuvwxyz0123456", 33, custom, 4, -1,
             "33 bytes");

    memset(big, 'a', sizeof(big));
    memcpy(big, "web", 3);
    match_is(big, sizeof(big), dflt, 7, -1, "1000 bytes starting web");
}


static void
valid_is(const char *name, size_t len, size_t max, int expected,
    const char *desc)
{
    int  rc;

    rc = ngx_http_civicgate_name_valid((const u_char *) name, len, max);

    tap_ok(expected ? rc != 0 : rc == 0, "name_valid: %s: %s", desc,
           expected ? "valid" : "invalid");
}


static void
test_name_valid(void)
{
    char  buf[80];

    valid_is("web", 3, 32, 1, "web");
    valid_is("a", 1, 32, 1, "a");
    valid_is("0", 1, 32, 1, "0");
    valid_is("_", 1, 32, 1, "_");
    valid_is("-", 1, 32, 1, "-");
    valid_is("walk-in_09az", 12, 32, 1, "walk-in_09az");
    valid_is("", 0, 32, 0, "empty");
    valid_is("Web", 3, 32, 0, "uppercase");
    valid_is("WEB", 3, 32, 0, "all uppercase");
    valid_is("we b", 4, 32, 0, "space");
    valid_is("we.b", 4, 32, 0, "dot");
    valid_is("we/b", 4, 32, 0, "slash");
    valid_is("web\0", 4, 32, 0, "trailing NUL");
    valid_is("w\0b", 3, 32, 0, "NUL inside");
    valid_is("web\n", 4, 32, 0, "newline");
    valid_is("w\xc3\xa9", 3, 32, 0, "non-ASCII");
    valid_is("web", 2, 32, 1, "length honoured (we)");

    memset(buf, 'a', sizeof(buf));
    valid_is(buf, 32, 32, 1, "32 bytes, max 32");
    valid_is(buf, 33, 32, 0, "33 bytes, max 32");
    valid_is(buf, 64, 64, 1, "64 bytes, max 64");
    valid_is(buf, 65, 64, 0, "65 bytes, max 64");
}


int
main(void)
{
    load_ring(&ring_old, "old " KEY_OLD_HEX "\n");
    load_ring(&ring_new, "new " KEY_NEW_HEX "\n");
    load_ring(&ring_both, "new " KEY_NEW_HEX "\nold " KEY_OLD_HEX "\n");
    memset(&ring_empty, 0, sizeof(ring_empty));

    test_base32_vectors();
    test_base32_value();
    test_base32_invalid();
    test_base32_roundtrip();
    test_jid_parse();
    test_jid_format();
    test_jid_verify();
    test_jid_mint();
    test_jid_tamper();
    test_channel_match();
    test_name_valid();

    return tap_done();
}
