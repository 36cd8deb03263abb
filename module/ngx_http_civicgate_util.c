
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_util.h"


static ngx_int_t ngx_http_civicgate_regex_rest(ngx_http_request_t *r,
    ngx_http_core_loc_conf_t *clcf, ngx_str_t *rest);


/* true when the line is due; ngx_current_msec may be 0 at start */

ngx_uint_t
ngx_http_civicgate_log_due(ngx_http_civicgate_log_limit_t *ll)
{
    if (ll->last != 0
        && ngx_current_msec - ll->last < NGX_HTTP_CIVICGATE_LOG_EVERY)
    {
        return 0;
    }

    ll->last = ngx_current_msec ? ngx_current_msec : 1;

    return 1;
}


/* "cg:{c:<pseudonym>}:<field>": a citizen's keys share a cluster slot */

u_char *
ngx_http_civicgate_key_citizen(u_char *buf, u_char *citizen, size_t len,
    const char *field)
{
    return ngx_sprintf(buf, "cg:{c:%*s}:%s", len, citizen, field);
}


/* "cg:{c:<pseudonym>}:uses:<YYYYMM>" */

u_char *
ngx_http_civicgate_key_uses(u_char *buf, u_char *citizen, size_t len,
    ngx_uint_t month)
{
    return ngx_sprintf(buf, "cg:{c:%*s}:uses:%06ui", len, citizen, month);
}


/* YYYYMM of a time in ms, UTC */

ngx_uint_t
ngx_http_civicgate_month_of(int64_t ms)
{
    ngx_tm_t  tm;

    ngx_gmtime((time_t) (ms / 1000), &tm);

    return (ngx_uint_t) tm.ngx_tm_year * 100 + tm.ngx_tm_mon;
}


/* the first second after a month YYYYMM, UTC: days counted from 1970 */

time_t
ngx_http_civicgate_month_end(ngx_uint_t month)
{
    ngx_int_t  y, m, era, yoe, doy, doe;

    y = month / 100;
    m = month % 100 + 1;

    if (m > 12) {
        m = 1;
        y++;
    }

    /* March-based years put the leap day last */
    y -= (m <= 2);
    era = (y >= 0 ? y : y - 399) / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;

    return (time_t) (era * 146097 + doe - 719468) * 86400;
}


/* "cg:{j:<journey ID>}:<field>" */

u_char *
ngx_http_civicgate_key_journey(u_char *buf, u_char *jid, size_t len,
    const char *field)
{
    return ngx_sprintf(buf, "cg:{j:%*s}:%s", len, jid, field);
}


/* a journey's shard: its events stay in one stream, in order */

ngx_uint_t
ngx_http_civicgate_shard_of(ngx_http_civicgate_shards_t *sh, u_char *jid,
    size_t len)
{
    return ngx_crc32_short(jid, len) % sh->n;
}


/* "cg:{events:<n>}", or "cg:events" for one stream outside a cluster */

u_char *
ngx_http_civicgate_key_stream(u_char *buf, ngx_http_civicgate_shards_t *sh,
    ngx_uint_t shard)
{
    if (sh->n == 1 && !sh->cluster) {
        return ngx_cpymem(buf, NGX_HTTP_CIVICGATE_KEY_EVENTS_STREAM,
                          sizeof(NGX_HTTP_CIVICGATE_KEY_EVENTS_STREAM) - 1);
    }

    return ngx_sprintf(buf, "cg:{events:%ui}", shard);
}


/* "cg:{events:<n>}:watched" in a cluster, else the one "cg:watched" */

u_char *
ngx_http_civicgate_key_watched(u_char *buf, ngx_http_civicgate_shards_t *sh,
    ngx_uint_t shard)
{
    if (!sh->cluster) {
        return ngx_cpymem(buf, NGX_HTTP_CIVICGATE_KEY_WATCHED,
                          sizeof(NGX_HTTP_CIVICGATE_KEY_WATCHED) - 1);
    }

    return ngx_sprintf(buf, "cg:{events:%ui}:watched", shard);
}


/* "cg:{events:<n>}:timeline:<JID>" in a cluster, else "cg:{j:<JID>}:..." */

u_char *
ngx_http_civicgate_key_timeline(u_char *buf, ngx_http_civicgate_shards_t *sh,
    ngx_uint_t shard, u_char *jid, size_t len)
{
    if (!sh->cluster) {
        return ngx_http_civicgate_key_journey(buf, jid, len,
                                              NGX_HTTP_CIVICGATE_KEY_TIMELINE);
    }

    return ngx_sprintf(buf, "cg:{events:%ui}:timeline:%*s", shard, len, jid);
}


/* "cg:{l:<hex digest>}:<zone>": the limited key never appears raw */

u_char *
ngx_http_civicgate_key_limit(u_char *buf, u_char *digest, size_t len,
    ngx_str_t *zone)
{
    return ngx_sprintf(buf, "cg:{l:%*xs}:%V", len, digest, zone);
}


/*
 * The part of the URI an endpoint routes on: after the prefix of a prefix
 * location; nothing in an exact or named location; the last capture of a
 * regex location (nothing if it has none or it did not take part).
 */

ngx_int_t
ngx_http_civicgate_location_rest(ngx_http_request_t *r, ngx_str_t *rest)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    ngx_str_null(rest);

#if (NGX_PCRE)
    if (clcf->regex) {
        return ngx_http_civicgate_regex_rest(r, clcf, rest);
    }
#endif

    if (clcf->exact_match || clcf->named || clcf->noname) {
        return NGX_OK;
    }

    if (r->uri.len >= clcf->name.len) {
        rest->data = r->uri.data + clcf->name.len;
        rest->len = r->uri.len - clcf->name.len;
    }

    return NGX_OK;
}


/* matched again: r->captures may since belong to a rewrite or a map */

static ngx_int_t
ngx_http_civicgate_regex_rest(ngx_http_request_t *r,
    ngx_http_core_loc_conf_t *clcf, ngx_str_t *rest)
{
#if (NGX_PCRE)
    int         *captures;
    ngx_int_t    rc;
    ngx_uint_t   n, size;

    n = clcf->regex->ncaptures;

    if (n == 0) {
        return NGX_OK;
    }

    size = (n + 1) * 3;

    captures = ngx_palloc(r->pool, size * sizeof(int));
    if (captures == NULL) {
        return NGX_ERROR;
    }

    rc = ngx_regex_exec(clcf->regex->regex, &r->uri, captures, size);

    if (rc <= (ngx_int_t) n || captures[2 * n] < 0) {
        /* no match (a rewrite changed the URI), or the capture was unused */
        return NGX_OK;
    }

    rest->data = r->uri.data + captures[2 * n];
    rest->len = captures[2 * n + 1] - captures[2 * n];
#endif

    return NGX_OK;
}


/* a request header by name, as it came (also an unknown one) */

ngx_table_elt_t *
ngx_http_civicgate_find_header(ngx_http_request_t *r, ngx_str_t *name)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == name->len
            && ngx_strncasecmp(h[i].key.data, name->data, name->len) == 0)
        {
            return &h[i];
        }
    }
}


/*
 * The slot Redis Cluster gives a key: only the part between the first
 * "{" and the next "}" counts, when that part is not empty.
 */

ngx_uint_t
ngx_http_civicgate_key_slot(const u_char *key, size_t len)
{
    size_t       i, start, end;
    uint16_t     crc;
    ngx_uint_t   bit;

    start = 0;
    end = len;

    for (i = 0; i < len; i++) {
        if (key[i] == '{') {
            break;
        }
    }

    if (i < len) {
        for (end = i + 1; end < len && key[end] != '}'; end++) {
            /* void */
        }

        if (end < len && end > i + 1) {
            start = i + 1;

        } else {
            end = len;
        }
    }

    crc = 0;

    for (i = start; i < end; i++) {
        crc ^= (uint16_t) (key[i] << 8);

        for (bit = 0; bit < 8; bit++) {
            crc = (crc & 0x8000) ? (uint16_t) ((crc << 1) ^ 0x1021)
                                 : (uint16_t) (crc << 1);
        }
    }

    return crc & (NGX_HTTP_CIVICGATE_REDIS_SLOTS - 1);
}
