
/*
 * Copyright (C) civicgate authors
 */


#ifndef _NGX_HTTP_CIVICGATE_HEALTH_H_INCLUDED_
#define _NGX_HTTP_CIVICGATE_HEALTH_H_INCLUDED_


#include "ngx_http_civicgate_module.h"


/* per worker: Redis's last answer, and the requests awaiting the next */
struct ngx_http_civicgate_health_s {
    ngx_queue_t                      waiting;  /* of health waiters */
    ngx_http_civicgate_redis_cmd_t  *ping;     /* in flight, or NULL */
    ngx_msec_t                       checked;  /* when the answer came */
    unsigned                         known:1;
    unsigned                         redis_ok:1;
};


char *ngx_http_civicgate_health(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
ngx_int_t ngx_http_civicgate_health_init_worker(ngx_cycle_t *cycle,
    ngx_http_civicgate_main_conf_t *cgmcf);
ngx_int_t ngx_http_civicgate_maintenance_handler(ngx_http_request_t *r);


#endif /* _NGX_HTTP_CIVICGATE_HEALTH_H_INCLUDED_ */
