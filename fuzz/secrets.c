
/*
 * Copyright (C) civicgate authors
 */


/*
 * The secret file and the Redis password file, through the directive
 * handlers that read them: the input is written to a file, then read by
 * "civicgate_secret_file FILE" (with "pseudonym_key=k1" when the input
 * starts with "#p") and by
 * "civicgate_redis redis://127.0.0.1:6379 password_file=FILE".
 * A key file that loads has keys of 32 to 128 bytes; a password is never
 * empty and never ends in a space or CR.
 */

#include "fuzz.h"
#include "ngx_http_civicgate_core.h"
#include "ngx_http_civicgate_conf.h"
#include "ngx_http_civicgate_redis.h"


static char  fuzz_file[] = "/tmp/civicgate-fuzz-secrets-XXXXXX";
static int   fuzz_fd = -1;


/* the fuzzer ends a timed run with exit(): the file goes with it */

static void
fuzz_remove(void)
{
    (void) unlink(fuzz_file);
}


static void
fuzz_write(const uint8_t *data, size_t size)
{
    if (fuzz_fd == -1) {
        fuzz_fd = mkstemp(fuzz_file);
        if (fuzz_fd == -1) {
            abort();
        }

        (void) atexit(fuzz_remove);
    }

    if (ftruncate(fuzz_fd, 0) != 0
        || (size && pwrite(fuzz_fd, data, size, 0) != (ssize_t) size))
    {
        abort();
    }
}


static void
fuzz_secret_file(ngx_pool_t *pool, ngx_uint_t pseudonym)
{
    size_t                           i;
    ngx_conf_t                       cf;
    ngx_http_civicgate_key_t        *key;
    ngx_http_civicgate_main_conf_t   cgmcf;

    fuzz_conf(&cf, pool, 3);
    (void) fuzz_conf_arg(&cf, (u_char *) "civicgate_secret_file", 21);
    (void) fuzz_conf_arg(&cf, (u_char *) fuzz_file, sizeof(fuzz_file) - 1);

    if (pseudonym) {
        (void) fuzz_conf_arg(&cf, (u_char *) "pseudonym_key=k1", 16);
    }

    ngx_memzero(&cgmcf, sizeof(cgmcf));

    if (ngx_http_civicgate_secret_file(&cf, NULL, &cgmcf) != NGX_CONF_OK) {
        return;
    }

    if (cgmcf.keyring->nkeys == 0
        || cgmcf.keyring->nkeys > NGX_HTTP_CIVICGATE_KEYS_MAX
        || cgmcf.keyring->pseudonym >= cgmcf.keyring->nkeys)
    {
        abort();
    }

    for (i = 0; i < cgmcf.keyring->nkeys; i++) {
        key = &cgmcf.keyring->keys[i];

        if (key->secret_len < NGX_HTTP_CIVICGATE_KEY_MIN
            || key->secret_len > NGX_HTTP_CIVICGATE_KEY_MAX
            || key->id_len == 0
            || key->id_len > NGX_HTTP_CIVICGATE_KEY_ID_MAX)
        {
            abort();
        }
    }
}


static void
fuzz_password_file(ngx_pool_t *pool)
{
    u_char                           *param;
    ngx_conf_t                        cf;
    ngx_command_t                     cmd;
    ngx_http_civicgate_redis_conf_t  *rcf;

    fuzz_conf(&cf, pool, 3);
    (void) fuzz_conf_arg(&cf, (u_char *) "civicgate_redis", 15);
    (void) fuzz_conf_arg(&cf, (u_char *) "redis://127.0.0.1:6379", 22);

    param = ngx_pnalloc(pool, sizeof("password_file=") - 1
                              + sizeof(fuzz_file) - 1);
    if (param == NULL) {
        abort();
    }

    (void) ngx_cpymem(ngx_cpymem(param, "password_file=", 14), fuzz_file,
                      sizeof(fuzz_file) - 1);
    (void) fuzz_conf_arg(&cf, param, 14 + sizeof(fuzz_file) - 1);

    /* the handler stores its configuration through cmd->offset */
    ngx_memzero(&cmd, sizeof(cmd));
    cmd.offset = 0;
    rcf = NULL;

    if (ngx_http_civicgate_redis(&cf, &cmd, &rcf) != NGX_CONF_OK) {
        return;
    }

    if (rcf == NULL || rcf->password.len == 0
        || rcf->password.data[rcf->password.len - 1] == ' '
        || rcf->password.data[rcf->password.len - 1] == '\r'
        || ngx_strlchr(rcf->password.data,
                       rcf->password.data + rcf->password.len, '\n'))
    {
        abort();
    }
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ngx_pool_t  *pool;

    fuzz_init();
    fuzz_write(data, size);

    pool = fuzz_pool();

    fuzz_secret_file(pool, size >= 2 && data[0] == '#' && data[1] == 'p');
    fuzz_password_file(pool);

    ngx_destroy_pool(pool);

    return 0;
}
