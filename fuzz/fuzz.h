
/*
 * Copyright (C) civicgate authors
 */


#ifndef _CIVICGATE_FUZZ_H_INCLUDED_
#define _CIVICGATE_FUZZ_H_INCLUDED_


/*
 * What the fuzz targets share: the parts of nginx's process setup the
 * module's parsers rely on (page size, cached time, a log and a cycle),
 * a pool per input, and a configuration context for directive handlers.
 * Every target links against nginx and the module as built by
 * scripts/fuzz.sh: the functions called are the module's own.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


/* log_level 0: every ngx_log_error() of the module is skipped */
static ngx_log_t      fuzz_log;
static ngx_cycle_t    fuzz_cycle;
static ngx_open_file_t  fuzz_log_file;


static ngx_inline void
fuzz_init(void)
{
    static ngx_uint_t  done;

    if (done) {
        return;
    }

    done = 1;

    ngx_pagesize = getpagesize();
    ngx_cacheline_size = NGX_CPU_CACHE_LINE;
    for (ngx_pagesize_shift = 0; (ngx_pagesize >> ngx_pagesize_shift) > 1;
         ngx_pagesize_shift++)
    {
        /* void */
    }

    ngx_time_init();

    /* recv() and friends, as ngx_os_init() sets them */
    ngx_io = ngx_os_io;

    fuzz_log_file.fd = ngx_stderr;
    fuzz_log.file = &fuzz_log_file;
    fuzz_log.log_level = 0;

    fuzz_cycle.log = &fuzz_log;
    ngx_str_set(&fuzz_cycle.prefix, "/tmp/");
    ngx_str_set(&fuzz_cycle.conf_prefix, "/tmp/");
    fuzz_cycle.pool = ngx_create_pool(NGX_CYCLE_POOL_SIZE, &fuzz_log);

    if (fuzz_cycle.pool == NULL) {
        abort();
    }

    ngx_cycle = &fuzz_cycle;
}


static ngx_inline ngx_pool_t *
fuzz_pool(void)
{
    ngx_pool_t  *pool;

    pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, &fuzz_log);

    if (pool == NULL) {
        abort();
    }

    return pool;
}


/* a directive's context: cf->args is the directive name, then args */

static ngx_inline void
fuzz_conf(ngx_conf_t *cf, ngx_pool_t *pool, ngx_uint_t nargs)
{
    ngx_memzero(cf, sizeof(ngx_conf_t));

    cf->pool = pool;
    cf->temp_pool = pool;
    cf->cycle = &fuzz_cycle;
    cf->log = &fuzz_log;
    cf->args = ngx_array_create(pool, nargs + 1, sizeof(ngx_str_t));

    if (cf->args == NULL) {
        abort();
    }
}


static ngx_inline ngx_str_t *
fuzz_conf_arg(ngx_conf_t *cf, u_char *data, size_t len)
{
    u_char     *p;
    ngx_str_t  *arg;

    /* nginx hands directives NUL-terminated arguments */
    p = ngx_pnalloc(cf->pool, len + 1);
    arg = ngx_array_push(cf->args);

    if (p == NULL || arg == NULL) {
        abort();
    }

    ngx_memcpy(p, data, len);
    p[len] = '\0';

    arg->data = p;
    arg->len = len;

    return arg;
}


#endif /* _CIVICGATE_FUZZ_H_INCLUDED_ */
