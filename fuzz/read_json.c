
/*
 * Copyright (C) civicgate authors
 */


/*
 * Request bodies as the JSON endpoints read them: the first input byte
 * splits the rest into one to three buffers (a body that came partly with
 * the headers, partly after), which ngx_http_civicgate_read_json() joins
 * and loads; anything but a JSON object is answered with a problem+json
 * 400, through the module's own response path (nginx's header and body
 * filters are replaced by two that keep the answer).  An answer is a JSON
 * problem whose status is the response's; an accepted body loads the same
 * when whole.
 */

#include "fuzz.h"
#include "ngx_http_civicgate_json.h"


static ngx_uint_t  fuzz_status;
static u_char      fuzz_answer[4096];
static size_t      fuzz_answer_len;


static ngx_int_t
fuzz_header_filter(ngx_http_request_t *r)
{
    r->header_sent = 1;
    fuzz_status = r->headers_out.status;

    return NGX_OK;
}


static ngx_int_t
fuzz_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    size_t  n;

    for ( /* void */ ; in; in = in->next) {
        n = ngx_buf_size(in->buf);

        if (n > sizeof(fuzz_answer) - fuzz_answer_len) {
            abort();
        }

        ngx_memcpy(fuzz_answer + fuzz_answer_len, in->buf->pos, n);
        fuzz_answer_len += n;
    }

    return NGX_OK;
}


/* the answer sent: a problem+json object with the response's status */

static void
fuzz_check_answer(ngx_int_t rc)
{
    json_t  *problem;

    problem = json_loadb((char *) fuzz_answer, fuzz_answer_len, 0, NULL);

    if (rc != NGX_OK || fuzz_status != NGX_HTTP_BAD_REQUEST
        || !json_is_object(problem)
        || json_integer_value(json_object_get(problem, "status"))
           != (json_int_t) fuzz_status
        || json_string_value(json_object_get(problem, "detail")) == NULL)
    {
        abort();
    }

    json_decref(problem);
}


static ngx_chain_t *
fuzz_bufs(ngx_pool_t *pool, const uint8_t *data, size_t size, ngx_uint_t n)
{
    size_t        len, i;
    u_char       *p;
    ngx_buf_t    *b;
    ngx_chain_t  *head, **last, *cl;

    head = NULL;
    last = &head;

    for (i = 0; i < n; i++) {
        len = (i == n - 1) ? size : size / (n - i);

        /* exactly the buffer's bytes: a read past them is an ASan report */
        p = ngx_alloc(len ? len : 1, &fuzz_log);
        b = ngx_calloc_buf(pool);
        cl = ngx_alloc_chain_link(pool);

        if (p == NULL || b == NULL || cl == NULL) {
            abort();
        }

        ngx_memcpy(p, data, len);
        b->start = p;
        b->pos = p;
        b->last = p + len;
        b->end = p + len;
        b->temporary = 1;

        cl->buf = b;
        cl->next = NULL;
        *last = cl;
        last = &cl->next;

        data += len;
        size -= len;
    }

    return head;
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_t              *json, *whole;
    ngx_int_t            rc;
    ngx_pool_t          *pool;
    ngx_chain_t         *cl;
    ngx_http_request_t  *r;

    fuzz_init();

    ngx_http_top_header_filter = fuzz_header_filter;
    ngx_http_top_body_filter = fuzz_body_filter;
    fuzz_status = 0;
    fuzz_answer_len = 0;

    if (size == 0) {
        return 0;
    }

    pool = fuzz_pool();

    r = ngx_pcalloc(pool, sizeof(ngx_http_request_t));
    if (r == NULL) {
        abort();
    }

    r->main = r;
    r->pool = pool;
    r->connection = ngx_pcalloc(pool, sizeof(ngx_connection_t));
    r->request_body = ngx_pcalloc(pool, sizeof(ngx_http_request_body_t));

    if (r->connection == NULL || r->request_body == NULL) {
        abort();
    }

    r->connection->log = &fuzz_log;
    r->request_body->bufs = fuzz_bufs(pool, data + 1, size - 1,
                                      1 + data[0] % 3);

    rc = ngx_http_civicgate_read_json(r, &json);

    if (rc != NGX_DECLINED) {
        fuzz_check_answer(rc);

    } else if (json != NULL) {
        whole = json_loadb((const char *) data + 1, size - 1,
                           JSON_REJECT_DUPLICATES, NULL);

        if (!json_is_object(json) || !json_equal(json, whole)) {
            abort();
        }

        json_decref(whole);
        json_decref(json);

    } else if (fuzz_status != 0) {
        abort();
    }

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        ngx_free(cl->buf->start);
    }

    ngx_destroy_pool(pool);

    return 0;
}
