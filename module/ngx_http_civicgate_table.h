
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_TABLE_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_TABLE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>


/*
 * A shared-memory table of fixed-size keys, as limit_req keeps its nodes:
 * an rbtree for lookups and a queue, most recently used first, for expiry.
 * The rate-limit store and the consent cache are both one.  Callers hold
 * the slab pool's mutex around every call but init.  An insert into a full
 * zone evicts the oldest node silently: "generation" is not bumped by the
 * table but by its owner, when it invalidates entries (the consent cache
 * does, so that a reply asked for before a withdrawal is not cached).
 */

/* a pseudonym and a purpose index, or a limit key's digest, zero-padded */
#define NGX_HTTP_CIVICGATE_TABLE_KEY  33


typedef struct {
    ngx_rbtree_node_t               node;
    ngx_queue_t                     queue;
    uint64_t                        value;
    uint32_t                        count;        /* the owner's, too */
    u_char                          flag;
    u_char                          key[NGX_HTTP_CIVICGATE_TABLE_KEY];
} ngx_http_civicgate_table_node_t;


typedef struct {
    ngx_rbtree_t                    rbtree;
    ngx_rbtree_node_t               sentinel;
    ngx_queue_t                     queue;
    ngx_atomic_t                    generation;   /* the owner bumps it */
} ngx_http_civicgate_table_sh_t;


typedef struct {
    ngx_http_civicgate_table_sh_t  *sh;
    ngx_slab_pool_t                *shpool;
} ngx_http_civicgate_table_t;


ngx_int_t ngx_http_civicgate_table_init(ngx_shm_zone_t *shm_zone,
    ngx_http_civicgate_table_t *table, ngx_http_civicgate_table_t *old,
    ngx_str_t *name);
ngx_http_civicgate_table_node_t *ngx_http_civicgate_table_lookup(
    ngx_http_civicgate_table_t *table, u_char *key);
ngx_http_civicgate_table_node_t *ngx_http_civicgate_table_insert(
    ngx_http_civicgate_table_t *table, u_char *key);
void ngx_http_civicgate_table_touch(ngx_http_civicgate_table_t *table,
    ngx_http_civicgate_table_node_t *node);
void ngx_http_civicgate_table_delete(ngx_http_civicgate_table_t *table,
    ngx_http_civicgate_table_node_t *node);
ngx_http_civicgate_table_node_t *ngx_http_civicgate_table_oldest(
    ngx_http_civicgate_table_t *table);


#endif /* _NGX_HTTP_CIVICGATE_TABLE_H_INCLUDED_ */
