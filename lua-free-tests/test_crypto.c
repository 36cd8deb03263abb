
/*
 * Copyright (C) civicgate authors
 */


/*
 * Unit tests for module/ngx_http_civicgate_crypto.c: HMAC-SHA256 and
 * HKDF-SHA256 against the RFC vectors, the secret-file parser, the
 * per-purpose subkeys and citizen pseudonyms.  Expected values come from
 * the RFCs or were computed independently with python3 hmac/hashlib
 * (HKDF per RFC 5869, empty salt), never from the module itself.
 */

#include <stdlib.h>
#include <string.h>

#include "ngx_http_civicgate_crypto.h"
#include "tap.h"
#include "util.h"


/* 32 bytes 00..1f */
#define KEY_OLD_HEX                                                          \
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"

/* 48 bytes 40..6f */
#define KEY_NEW_HEX                                                          \
    "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"     \
    "606162636465666768696a6b6c6d6e6f"

/* HKDF-SHA256(key, salt = "", info = "civicgate journey id v1", 32) */
#define OLD_JOURNEY_HEX                                                      \
    "925550adfd022478ac268377de7b651226e8c7af9192892698eccd0acc6c2f86"
#define NEW_JOURNEY_HEX                                                      \
    "f14f941ba15bd419886fe36db0b6959c1d53ad149ffc259ed4be58a1119c2919"

/* HKDF-SHA256(key, salt = "", info = "civicgate citizen pseudonym v1", 32) */
#define OLD_CITIZEN_HEX                                                      \
    "8c11763f6e21536bc9093a431eaf4c53f3529460df994c6cebf6513a4140627a"
#define NEW_CITIZEN_HEX                                                      \
    "aaef406c856b798bf9567380d18bafa101d10b9994b34f6a76f28eccfaa5f1c6"

/* first 16 bytes of HMAC-SHA256(citizen subkey, id), lowercase hex */
#define OLD_PSEUD_ALICE   "3b7e7a86c21e02992c337002c34c10d0"
#define OLD_PSEUD_EMPTY   "a6410d444da40cd01b3e49bca4631ee4"
#define OLD_PSEUD_ALICE_NUL_X  "6d1e207e16daa8b59927eff0067382e7"
#define NEW_PSEUD_ALICE   "6d279888e74033b7ed534deef64fb006"
#define NEW_PSEUD_EMPTY   "4afea8c3f9cea1bf12493c6e3e3ddf64"

#define ALICE             "alice@example.org"


static ngx_http_civicgate_keyring_t  ring;
static char                          err[256];


static int
parse(const char *text, const char *pid)
{
    memset(err, 0, sizeof(err));

    return ngx_http_civicgate_keyring_parse(&ring, (const u_char *) text,
                                            strlen(text),
                                            (const u_char *) pid,
                                            pid ? strlen(pid) : 0,
                                            err, sizeof(err));
}


/* a failing parse, with a message that contains every needle given */
static void
parse_fails(const char *text, const char *pid, const char *desc,
    const char *needle1, const char *needle2)
{
    int  rc;

    rc = parse(text, pid);

    tap_is_int(rc, -1, "keyring: %s is rejected", desc);

    if (!tap_ok(err[0] != '\0'
                && (needle1 == NULL || strstr(err, needle1) != NULL)
                && (needle2 == NULL || strstr(err, needle2) != NULL),
                "keyring: %s: message %s%s%s%s", desc,
                needle1 ? "names " : "is not empty",
                needle1 ? needle1 : "", needle2 ? " and " : "",
                needle2 ? needle2 : ""))
    {
        tap_diag("  message: \"%s\"", err);
    }
}


static int
has_key(size_t i, const char *id, const char *hex)
{
    u_char  secret[NGX_HTTP_CIVICGATE_KEY_MAX];
    size_t  len;

    len = strlen(hex) / 2;
    unhex(hex, secret);

    return ring.keys[i].id_len == strlen(id)
           && memcmp(ring.keys[i].id, id, strlen(id)) == 0
           && ring.keys[i].secret_len == len
           && memcmp(ring.keys[i].secret, secret, len) == 0;
}


static char *
hex_of(size_t nbytes)
{
    char    *s;
    size_t   i;

    s = malloc(2 * nbytes + 1);
    if (s == NULL) {
        abort();
    }

    for (i = 0; i < 2 * nbytes; i++) {
        s[i] = "0123456789abcdef"[(i * 7 + 3) % 16];
    }

    s[2 * nbytes] = '\0';

    return s;
}


static void
test_hmac(void)
{
    u_char       out[NGX_HTTP_CIVICGATE_SHA256_LEN], exp[32];
    const char  *key = "Jefe";
    const char  *msg = "what do ya want for nothing?";

    /* RFC 4231, test case 2 */
    unhex("5bdcc146bf60754e6a042426089575c7"
          "5a003f089d2739839dec58b964ec3843", exp);

    memset(out, 0, sizeof(out));
    tap_is_int(ngx_http_civicgate_hmac_sha256((const u_char *) key,
                                              strlen(key),
                                              (const u_char *) msg,
                                              strlen(msg), out),
               0, "hmac: RFC 4231 case 2 returns 0");
    tap_is_mem(out, exp, 32, "hmac: RFC 4231 case 2 value");
}


static void
test_hkdf(void)
{
    u_char  ikm[22], out[42], exp[42];

    /* RFC 5869, test case 3: SHA-256, salt and info empty, L = 42 */
    memset(ikm, 0x0b, sizeof(ikm));
    unhex("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec345"
          "4e5f3c738d2d9d201395faa4b61a96c8", exp);

    memset(out, 0, sizeof(out));
    tap_is_int(ngx_http_civicgate_hkdf_sha256(ikm, sizeof(ikm), "", out,
                                              sizeof(out)),
               0, "hkdf: RFC 5869 case 3 returns 0");
    tap_is_mem(out, exp, 42, "hkdf: RFC 5869 case 3 value (empty salt)");
}


static void
test_subkeys(void)
{
    u_char  key[32], exp[32], out[32];

    unhex(KEY_OLD_HEX, key);
    unhex(OLD_JOURNEY_HEX, exp);

    memset(out, 0, sizeof(out));
    tap_is_int(ngx_http_civicgate_hkdf_sha256(key, 32,
                                              "civicgate journey id v1",
                                              out, 32),
               0, "hkdf: journey info returns 0");
    tap_is_mem(out, exp, 32, "hkdf: journey subkey value");
}


static void
test_hex(void)
{
    u_char  out[8];
    u_char  in[4] = { 0x00, 0x9f, 0xa0, 0xff };

    memset(out, 'X', sizeof(out));
    ngx_http_civicgate_hex(in, 4, out);
    tap_is_str(out, 8, "009fa0ff", "hex: lowercase, two digits a byte");
}


static void
test_keyring_basic(void)
{
    u_char  exp[32];

    tap_is_int(parse("k1 " KEY_OLD_HEX "\n", NULL), 0,
               "keyring: one key parses");
    tap_is_int((long) ring.nkeys, 1, "keyring: one key: nkeys = 1");
    tap_ok(has_key(0, "k1", KEY_OLD_HEX), "keyring: one key: id and secret");
    tap_is_int((long) ring.pseudonym, 0, "keyring: one key: pseudonym = 0");

    unhex(OLD_JOURNEY_HEX, exp);
    tap_is_mem(ring.keys[0].journey, exp, 32,
               "keyring: journey subkey = HKDF(key, journey info)");
    unhex(OLD_CITIZEN_HEX, exp);
    tap_is_mem(ring.citizen, exp, 32,
               "keyring: citizen subkey = HKDF(key, citizen info)");

    tap_is_int(parse("k1 " KEY_OLD_HEX, NULL), 0,
               "keyring: no trailing newline");
    tap_is_int((long) ring.nkeys, 1, "keyring: no trailing newline: 1 key");

    tap_is_int(parse("# civicgate keys, newest first\n"
                     "\n"
                     "   \n"
                     "  # indented comment\n"
                     "new\t" KEY_NEW_HEX "  \r\n"
                     "\r\n"
                     "# old " KEY_OLD_HEX "\n"
                     "  old   " KEY_OLD_HEX "\n"
                     "\n", NULL),
               0, "keyring: comments, blank lines, tabs, CRLF");
    tap_is_int((long) ring.nkeys, 2, "keyring: comments: 2 keys");
    tap_ok(has_key(0, "new", KEY_NEW_HEX), "keyring: first key is keys[0]");
    tap_ok(has_key(1, "old", KEY_OLD_HEX), "keyring: second key is keys[1]");

    unhex(NEW_JOURNEY_HEX, exp);
    tap_is_mem(ring.keys[0].journey, exp, 32,
               "keyring: journey subkey of a 48-byte key");

    tap_is_int(parse("K.e_y-9 " "000102030405060708090A0B0C0D0E0F"
                     "101112131415161718191A1B1C1D1E1F\n", NULL),
               0, "keyring: uppercase hex and id chars . _ -");
    tap_ok(has_key(0, "K.e_y-9", KEY_OLD_HEX),
           "keyring: uppercase hex decodes");
}


static void
test_keyring_limits(void)
{
    char    *h, *text, line[300], id[40];
    size_t   i, n;

    h = hex_of(32);
    snprintf(line, sizeof(line), "a %s\n", h);
    tap_is_int(parse(line, NULL), 0, "keyring: 32-byte key accepted");
    free(h);

    h = hex_of(128);
    snprintf(line, sizeof(line), "a %s\n", h);
    tap_is_int(parse(line, NULL), 0, "keyring: 128-byte key accepted");
    tap_is_int((long) ring.keys[0].secret_len, 128,
               "keyring: 128-byte key: secret_len");
    free(h);

    h = hex_of(129);
    snprintf(line, sizeof(line), "a %s\n", h);
    parse_fails(line, NULL, "129-byte key", "\"a\"", NULL);
    free(h);

    h = hex_of(31);
    snprintf(line, sizeof(line), "k1 " KEY_OLD_HEX "\nshort %s\n", h);
    parse_fails(line, NULL, "31-byte key", "\"short\"", "32");
    tap_ok(strstr(err, "line 2") != NULL,
           "keyring: 31-byte key: message names line 2");
    tap_ok(strstr(err, "short") != NULL && strstr(err, "32 b") != NULL,
           "keyring: 31-byte key: message says shorter than 32 bytes");
    free(h);

    parse_fails("k1 " KEY_OLD_HEX "0\n", NULL, "odd hex length",
                "\"k1\"", NULL);

    h = hex_of(32);
    h[17] = 'g';
    snprintf(line, sizeof(line), "k1 %s\n", h);
    parse_fails(line, NULL, "bad hex digit g", "\"k1\"", "hex");
    h[17] = ':';
    snprintf(line, sizeof(line), "k1 %s\n", h);
    parse_fails(line, NULL, "bad hex digit :", "\"k1\"", "hex");
    free(h);

    parse_fails("k1 0x" KEY_OLD_HEX "\n", NULL, "0x-prefixed hex", "\"k1\"",
                NULL);

    parse_fails("k1 " KEY_OLD_HEX "\nk2 " KEY_NEW_HEX "\nk1 " KEY_NEW_HEX
                "\n", NULL, "duplicate key id", "\"k1\"", "line 3");
    tap_ok(strstr(err, "duplicate") != NULL,
           "keyring: duplicate key id: message says duplicate");

    parse_fails("k1 " KEY_OLD_HEX " " KEY_NEW_HEX "\n", NULL,
                "three fields", "\"k1\"", NULL);

    /* a short err buffer gets a terminated, truncated message */
    memset(err, 'X', sizeof(err));
    tap_is_int(ngx_http_civicgate_keyring_parse(&ring,
                                                (const u_char *) "k1 00\n",
                                                6, NULL, 0, err, 8),
               -1, "keyring: 8-byte err buffer: rejected");
    tap_ok(memchr(err, '\0', 8) != NULL && err[8] == 'X',
           "keyring: 8-byte err buffer: terminated, nothing written past");

    parse_fails("", NULL, "empty file", NULL, NULL);
    parse_fails("# only a comment\n\n", NULL, "file with no key", NULL,
                NULL);
    parse_fails("k1\n", NULL, "id without hex", "line 1", NULL);
    parse_fails("k/1 " KEY_OLD_HEX "\n", NULL, "id with '/'", "line 1",
                NULL);

    memset(id, 'i', 32);
    id[32] = '\0';
    snprintf(line, sizeof(line), "%s " KEY_OLD_HEX "\n", id);
    tap_is_int(parse(line, NULL), 0, "keyring: 32-char id accepted");
    id[32] = 'i';
    id[33] = '\0';
    snprintf(line, sizeof(line), "%s " KEY_OLD_HEX "\n", id);
    parse_fails(line, NULL, "33-char id", "line 1", NULL);

    /* 16 keys are fine, a 17th is not */
    n = 17;
    text = malloc(n * 80);
    if (text == NULL) {
        abort();
    }

    text[0] = '\0';
    for (i = 0; i < 16; i++) {
        snprintf(line, sizeof(line), "key%zu " KEY_OLD_HEX "\n", i);
        strcat(text, line);
    }

    tap_is_int(parse(text, NULL), 0, "keyring: 16 keys accepted");
    tap_is_int((long) ring.nkeys, 16, "keyring: 16 keys: nkeys");
    tap_is_int((long) ring.pseudonym, 15, "keyring: 16 keys: pseudonym = 15");

    strcat(text, "key16 " KEY_OLD_HEX "\n");
    parse_fails(text, NULL, "17 keys", "16", NULL);
    free(text);
}


/* the pseudonym of id under the current ring: returns 0, writes 32 bytes */
static void
pseudonym_is(const char *id, size_t len, const char *expected,
    const char *desc)
{
    u_char  out[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN + 1];

    memset(out, 'X', sizeof(out));

    tap_is_int(ngx_http_civicgate_pseudonym(&ring, (const u_char *) id, len,
                                            out),
               0, "pseudonym: %s: returns 0", desc);
    tap_is_str(out, NGX_HTTP_CIVICGATE_PSEUDONYM_LEN, expected,
               "pseudonym: %s", desc);
    tap_ok(out[NGX_HTTP_CIVICGATE_PSEUDONYM_LEN] == 'X',
           "pseudonym: %s: writes exactly 32 bytes", desc);
}


static void
test_pseudonym(void)
{
    u_char       exp[32];
    const char  *two = "new " KEY_NEW_HEX "\nold " KEY_OLD_HEX "\n";

    tap_is_int(parse("old " KEY_OLD_HEX "\n", NULL), 0,
               "pseudonym: single-key ring parses");
    pseudonym_is(ALICE, strlen(ALICE), OLD_PSEUD_ALICE, "known value");
    pseudonym_is("", 0, OLD_PSEUD_EMPTY, "empty identifier");

    /* the identifier is hashed whole: bytes after a NUL count */
    pseudonym_is(ALICE "\0x", strlen(ALICE) + 2, OLD_PSEUD_ALICE_NUL_X,
                 "NUL inside the identifier");

    /* default: the last (oldest) key; prepending a key changes nothing */
    tap_is_int(parse(two, NULL), 0, "pseudonym: two-key ring parses");
    tap_is_int((long) ring.pseudonym, 1,
               "pseudonym: default is the last key");
    unhex(OLD_CITIZEN_HEX, exp);
    tap_is_mem(ring.citizen, exp, 32,
               "pseudonym: default citizen subkey from the last key");
    pseudonym_is(ALICE, strlen(ALICE), OLD_PSEUD_ALICE,
                 "unchanged after prepending a key");

    tap_is_int(parse(two, "new"), 0, "pseudonym: pseudonym_key=new parses");
    tap_is_int((long) ring.pseudonym, 0, "pseudonym: pseudonym_key=new -> 0");
    unhex(NEW_CITIZEN_HEX, exp);
    tap_is_mem(ring.citizen, exp, 32,
               "pseudonym: citizen subkey from the selected key");
    pseudonym_is(ALICE, strlen(ALICE), NEW_PSEUD_ALICE, "selected key");
    pseudonym_is("", 0, NEW_PSEUD_EMPTY, "selected key, empty identifier");

    tap_is_int(parse(two, "old"), 0, "pseudonym: pseudonym_key=old parses");
    tap_is_int((long) ring.pseudonym, 1, "pseudonym: pseudonym_key=old -> 1");

    parse_fails(two, "older", "unknown pseudonym_key", "\"older\"", NULL);
    parse_fails(two, "ne", "pseudonym_key prefix of an id", "\"ne\"", NULL);
    parse_fails(two, "NEW", "pseudonym_key in other case", "\"NEW\"", NULL);
}


int
main(void)
{
    test_hmac();
    test_hkdf();
    test_subkeys();
    test_hex();
    test_keyring_basic();
    test_keyring_limits();
    test_pseudonym();

    return tap_done();
}
