
/*
 * Copyright (C) civicgate authors
 */


#include <ngx_config.h>
#include <ngx_core.h>

#include "ngx_http_civicgate_table.h"


static void ngx_http_civicgate_table_rbtree_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel);


/* a reload keeps the table; a new zone gets an empty one */

ngx_int_t
ngx_http_civicgate_table_init(ngx_shm_zone_t *shm_zone,
    ngx_http_civicgate_table_t *table, ngx_http_civicgate_table_t *old,
    ngx_str_t *name)
{
    size_t  len;

    if (old != NULL) {
        *table = *old;
        return NGX_OK;
    }

    table->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    /* a full zone is normal: the oldest entry makes room, as limit_req */
    table->shpool->log_nomem = 0;

    if (shm_zone->shm.exists) {
        table->sh = table->shpool->data;
        return NGX_OK;
    }

    table->sh = ngx_slab_calloc(table->shpool,
                                sizeof(ngx_http_civicgate_table_sh_t));
    if (table->sh == NULL) {
        return NGX_ERROR;
    }

    table->shpool->data = table->sh;

    ngx_rbtree_init(&table->sh->rbtree, &table->sh->sentinel,
                    ngx_http_civicgate_table_rbtree_insert);
    ngx_queue_init(&table->sh->queue);

    len = sizeof(" in civicgate zone \"\"") + name->len;

    table->shpool->log_ctx = ngx_slab_alloc(table->shpool, len);
    if (table->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(table->shpool->log_ctx, " in civicgate zone \"%V\"%Z", name);

    return NGX_OK;
}


ngx_http_civicgate_table_node_t *
ngx_http_civicgate_table_lookup(ngx_http_civicgate_table_t *table,
    u_char *key)
{
    uint32_t                          hash;
    ngx_int_t                         rc;
    ngx_rbtree_node_t                *node, *sentinel;
    ngx_http_civicgate_table_node_t  *tn;

    hash = ngx_crc32_short(key, NGX_HTTP_CIVICGATE_TABLE_KEY);

    node = table->sh->rbtree.root;
    sentinel = table->sh->rbtree.sentinel;

    while (node != sentinel) {

        if (hash != node->key) {
            node = (hash < node->key) ? node->left : node->right;
            continue;
        }

        tn = (ngx_http_civicgate_table_node_t *) node;

        rc = ngx_memcmp(key, tn->key, NGX_HTTP_CIVICGATE_TABLE_KEY);

        if (rc == 0) {
            return tn;
        }

        node = (rc < 0) ? node->left : node->right;
    }

    return NULL;
}


/* a new node, most recent; when the zone is full the oldest makes room */

ngx_http_civicgate_table_node_t *
ngx_http_civicgate_table_insert(ngx_http_civicgate_table_t *table,
    u_char *key)
{
    ngx_http_civicgate_table_node_t  *node, *oldest;

    node = ngx_slab_alloc_locked(table->shpool,
                                 sizeof(ngx_http_civicgate_table_node_t));

    if (node == NULL) {
        oldest = ngx_http_civicgate_table_oldest(table);

        if (oldest != NULL) {
            ngx_http_civicgate_table_delete(table, oldest);
            node = ngx_slab_alloc_locked(table->shpool,
                                     sizeof(ngx_http_civicgate_table_node_t));
        }

        if (node == NULL) {
            ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                          "civicgate: could not allocate node%s",
                          table->shpool->log_ctx);
            return NULL;
        }
    }

    ngx_memcpy(node->key, key, NGX_HTTP_CIVICGATE_TABLE_KEY);
    node->node.key = ngx_crc32_short(key, NGX_HTTP_CIVICGATE_TABLE_KEY);
    node->value = 0;
    node->count = 0;
    node->flag = 0;

    ngx_rbtree_insert(&table->sh->rbtree, &node->node);
    ngx_queue_insert_head(&table->sh->queue, &node->queue);

    return node;
}


void
ngx_http_civicgate_table_touch(ngx_http_civicgate_table_t *table,
    ngx_http_civicgate_table_node_t *node)
{
    ngx_queue_remove(&node->queue);
    ngx_queue_insert_head(&table->sh->queue, &node->queue);
}


void
ngx_http_civicgate_table_delete(ngx_http_civicgate_table_t *table,
    ngx_http_civicgate_table_node_t *node)
{
    ngx_queue_remove(&node->queue);
    ngx_rbtree_delete(&table->sh->rbtree, &node->node);
    ngx_slab_free_locked(table->shpool, node);
}


ngx_http_civicgate_table_node_t *
ngx_http_civicgate_table_oldest(ngx_http_civicgate_table_t *table)
{
    if (ngx_queue_empty(&table->sh->queue)) {
        return NULL;
    }

    return ngx_queue_data(ngx_queue_last(&table->sh->queue),
                          ngx_http_civicgate_table_node_t, queue);
}


static void
ngx_http_civicgate_table_rbtree_insert(ngx_rbtree_node_t *temp,
    ngx_rbtree_node_t *node, ngx_rbtree_node_t *sentinel)
{
    ngx_rbtree_node_t               **p;
    ngx_http_civicgate_table_node_t  *n, *t;

    for ( ;; ) {

        if (node->key != temp->key) {
            p = (node->key < temp->key) ? &temp->left : &temp->right;

        } else {
            n = (ngx_http_civicgate_table_node_t *) node;
            t = (ngx_http_civicgate_table_node_t *) temp;

            p = (ngx_memcmp(n->key, t->key, NGX_HTTP_CIVICGATE_TABLE_KEY) < 0)
                ? &temp->left : &temp->right;
        }

        if (*p == sentinel) {
            break;
        }

        temp = *p;
    }

    *p = node;
    node->parent = temp;
    node->left = sentinel;
    node->right = sentinel;
    ngx_rbt_red(node);
}
