
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_REDIS_CLUSTER_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_REDIS_CLUSTER_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_civicgate_redis.h"


/*
 * mode=cluster: the worker's client is a router with no connection of
 * its own; each command goes to the connection of the master that serves
 * its key's slot, as the slot map read from the cluster says.
 */

ngx_http_civicgate_redis_t *ngx_http_civicgate_cluster_create(
    ngx_cycle_t *cycle, ngx_http_civicgate_redis_conf_t *conf);
void ngx_http_civicgate_cluster_start(ngx_http_civicgate_redis_t *router);
void ngx_http_civicgate_cluster_destroy(ngx_http_civicgate_redis_t *router);

/* the slot of a command's first key, -1 for a command without keys */
ngx_int_t ngx_http_civicgate_cluster_command_slot(int argc,
    const char **argv, const size_t *argvlen);


#endif /* _NGX_HTTP_CIVICGATE_REDIS_CLUSTER_H_INCLUDED_ */
