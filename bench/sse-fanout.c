
/*
 * Copyright (C) civicgate authors
 */


/*
 * sse-fanout: how long a status change takes to reach every Server-Sent
 * Events client of a gateway.
 *
 * Opens N event streams (Accept: text/event-stream) to one URL, waits until
 * every stream has delivered its snapshot, then, R times: sends an admin
 * PUT that changes a service (alternating between two states) and measures,
 * for every client, the time from just before the PUT is written to the
 * moment the client reads the "service" event.  One thread, epoll, non-
 * blocking sockets: ten thousand streams fit in one process.
 *
 *   sse-fanout -p PORT -n N -r R [-u /status/] [-a ADMIN_URI]
 *              [-P ADMIN_PORT] [-s SOURCES] [-t TIMEOUT_MS] [-g GAP_MS] [-w]
 *
 * Prints one line per round, "round I put_ms P last_ms L p50_ms M
 * p99_ms Q clients C", then "ok" and exits 0, or an error line starting
 * with "error:" and exits 1 (a stream that failed, closed, or missed an
 * event; an admin answer other than 200).
 *
 * With -w, it waits for a line on its standard input once every stream is
 * open, before the first round: the caller can look at the gateway then.
 *
 * Streams connect from 127.0.0.2, 127.0.0.3, ... (SOURCES addresses, 8 by
 * default) so that many streams and reruns do not run out of ephemeral
 * ports of one source address.
 */


#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>


#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT  24
#endif

#define LINE_MAX_KEEP   32
#define HEAD_MAX        4096
#define CONNECTING_MAX  256


enum {
    ST_CONNECTING = 0,
    ST_HEADERS,
    ST_CHUNK_SIZE,
    ST_CHUNK_EXT,
    ST_CHUNK_DATA,
    ST_CHUNK_CR,
    ST_CHUNK_LF,
    ST_BODY,            /* not chunked: the body as it comes */
    ST_DONE
};


typedef struct {
    int        fd;
    int        state;
    int        chunked;
    size_t     chunk_left;
    char      *head;
    size_t     head_len;
    char       line[LINE_MAX_KEEP];
    size_t     line_len;
    unsigned   snapshots;
    unsigned   services;
    double    *seen;      /* when the service event of each round arrived */
} client_t;


typedef struct {
    int        fd;
    int        connected;
    int        sent;
    char       buf[4096];
    size_t     len;
    int        status;
    int        closed;
    double     answered;
} admin_t;


static const char *uri = "/status/";
static const char *admin_uri = "/civicgate/admin/services/tax";
static int         port;
static int         admin_port;
static int         nclients = 1000;
static int         rounds = 5;
static int         nsources = 8;
static int         timeout_ms = 30000;
static int         gap_ms = 500;
static int         wait_go;
static int         go;
static char        go_marker;

static int         ep;
static int         next_client;
static client_t   *clients;
static int         round_no;    /* the round under way, 1-based */
static double      round_t0;


static double
now_ms(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);

    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}


static void
die(const char *fmt, ...)
{
    va_list  ap;

    va_start(ap, fmt);
    printf("error: ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);

    exit(1);
}


static int
nonblocking_socket(void)
{
    int  fd, one;

    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd == -1) {
        die("socket: %s", strerror(errno));
    }

    one = 1;
    (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    return fd;
}


static void
start_connect(int fd, int source, int to_port, void *ptr)
{
    int                 one;
    struct sockaddr_in  sin;
    struct epoll_event  ev;

    if (source >= 0) {
        /* the port is chosen at connect(), per destination */
        one = 1;
        (void) setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one,
                          sizeof(one));

        memset(&sin, 0, sizeof(sin));
        sin.sin_family = AF_INET;
        sin.sin_addr.s_addr = htonl(0x7f000002 + source);

        if (bind(fd, (struct sockaddr *) &sin, sizeof(sin)) == -1) {
            die("bind 127.0.0.%d: %s", 2 + source, strerror(errno));
        }
    }

    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons(to_port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    if (connect(fd, (struct sockaddr *) &sin, sizeof(sin)) == -1
        && errno != EINPROGRESS)
    {
        die("connect to port %d: %s", to_port, strerror(errno));
    }

    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP;
    ev.data.ptr = ptr;

    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == -1) {
        die("epoll_ctl: %s", strerror(errno));
    }
}


static void
write_all(int fd, const char *p, size_t len)
{
    ssize_t  n;

    /* requests are small: a fresh socket's buffer takes them whole */

    while (len) {
        n = write(fd, p, len);
        if (n == -1) {
            die("write: %s", strerror(errno));
        }

        p += n;
        len -= n;
    }
}


/* the body of an event stream, line by line: count the event names */

static void
body_bytes(client_t *c, const char *p, size_t len, double t)
{
    size_t  i;

    for (i = 0; i < len; i++) {

        if (p[i] != '\n') {
            if (c->line_len < LINE_MAX_KEEP) {
                c->line[c->line_len] = p[i];
            }
            c->line_len++;
            continue;
        }

        if (c->line_len == sizeof("event: snapshot") - 1
            && memcmp(c->line, "event: snapshot", c->line_len) == 0)
        {
            c->snapshots++;

        } else if (c->line_len == sizeof("event: service") - 1
                   && memcmp(c->line, "event: service", c->line_len) == 0)
        {
            if (round_no == 0 || c->services >= (unsigned) round_no) {
                die("a stream got a service event nobody made");
            }

            c->seen[c->services++] = t - round_t0;
        }

        c->line_len = 0;
    }
}


static void
headers_done(client_t *c)
{
    char  *p, *end;

    c->head[c->head_len] = '\0';

    if (strncmp(c->head, "HTTP/1.1 200 ", 13) != 0) {
        end = strchr(c->head, '\r');
        if (end) {
            *end = '\0';
        }
        die("a stream was answered \"%s\"", c->head);
    }

    c->chunked = 0;
    for (p = c->head; (p = strcasestr(p, "\ntransfer-encoding:")); p++) {
        end = strchr(p, '\r');
        if (end && memmem(p, end - p, "chunked", 7)) {
            c->chunked = 1;
        }
    }

    if (strcasestr(c->head, "\ncontent-type: text/event-stream") == NULL) {
        die("a stream is not text/event-stream");
    }

    c->state = c->chunked ? ST_CHUNK_SIZE : ST_BODY;
}


static void
client_bytes(client_t *c, const char *p, size_t len, double t)
{
    size_t  n;

    while (len) {

        switch (c->state) {

        case ST_HEADERS:
            if (c->head_len == HEAD_MAX) {
                die("a stream's headers are too long");
            }

            c->head[c->head_len++] = *p++;
            len--;

            if (c->head_len >= 4
                && memcmp(c->head + c->head_len - 4, "\r\n\r\n", 4) == 0)
            {
                c->head_len -= 2;
                headers_done(c);
            }
            break;

        case ST_CHUNK_SIZE:
            if (*p >= '0' && *p <= '9') {
                c->chunk_left = c->chunk_left * 16 + (*p - '0');

            } else if ((*p | 0x20) >= 'a' && (*p | 0x20) <= 'f') {
                c->chunk_left = c->chunk_left * 16 + (*p | 0x20) - 'a' + 10;

            } else if (*p == '\r' || *p == ';') {
                c->state = ST_CHUNK_EXT;

            } else {
                die("bad chunk size");
            }

            p++;
            len--;
            break;

        case ST_CHUNK_EXT:
            if (*p++ == '\n') {
                if (c->chunk_left == 0) {
                    c->state = ST_DONE;
                    return;
                }
                c->state = ST_CHUNK_DATA;
            }
            len--;
            break;

        case ST_CHUNK_DATA:
            n = len < c->chunk_left ? len : c->chunk_left;
            body_bytes(c, p, n, t);
            p += n;
            len -= n;
            c->chunk_left -= n;

            if (c->chunk_left == 0) {
                c->state = ST_CHUNK_CR;
            }
            break;

        case ST_CHUNK_CR:
        case ST_CHUNK_LF:
            if (*p != (c->state == ST_CHUNK_CR ? '\r' : '\n')) {
                die("bad chunk end");
            }

            c->state = (c->state == ST_CHUNK_CR) ? ST_CHUNK_LF : ST_CHUNK_SIZE;
            p++;
            len--;
            break;

        case ST_BODY:
            body_bytes(c, p, len, t);
            return;

        default:
            die("bytes after the end of a stream");
        }
    }
}


static void
client_event(client_t *c, uint32_t events, int *connecting)
{
    char                buf[65536];
    double              t;
    ssize_t             n;
    char                req[1024];
    struct epoll_event  ev;

    if (c->state == ST_CONNECTING) {

        if (events & (EPOLLERR | EPOLLHUP)) {
            die("a stream could not connect (%d opened so far)", next_client);
        }

        if (!(events & EPOLLOUT)) {
            return;
        }

        n = snprintf(req, sizeof(req),
                     "GET %s HTTP/1.1\r\n"
                     "Host: 127.0.0.1\r\n"
                     "Accept: text/event-stream\r\n"
                     "Accept-Language: en\r\n"
                     "\r\n", uri);

        write_all(c->fd, req, n);

        ev.events = EPOLLIN | EPOLLRDHUP;
        ev.data.ptr = c;
        if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) == -1) {
            die("epoll_ctl: %s", strerror(errno));
        }

        c->state = ST_HEADERS;
        (*connecting)--;
        return;
    }

    for ( ;; ) {
        n = read(c->fd, buf, sizeof(buf));

        if (n > 0) {
            t = now_ms();
            client_bytes(c, buf, n, t);
            continue;
        }

        if (n == 0) {
            die("a stream was closed by the gateway (%u snapshots,"
                " %u changes seen)", c->snapshots, c->services);
        }

        if (errno == EAGAIN) {
            return;
        }

        if (errno == EINTR) {
            continue;
        }

        die("read: %s", strerror(errno));
    }
}


static void
admin_event(admin_t *a, uint32_t events)
{
    ssize_t  n;

    if (!a->connected) {
        if (events & (EPOLLERR | EPOLLHUP)) {
            die("cannot connect to the admin port");
        }
        if (events & EPOLLOUT) {
            a->connected = 1;
        }
        return;
    }

    for ( ;; ) {
        n = read(a->fd, a->buf + a->len, sizeof(a->buf) - 1 - a->len);

        if (n > 0) {
            a->len += n;
            continue;
        }

        if (n == 0 || a->len == sizeof(a->buf) - 1) {
            a->buf[a->len] = '\0';
            if (sscanf(a->buf, "HTTP/1.%*d %d", &a->status) != 1) {
                a->status = -1;
            }
            a->closed = 1;
            a->answered = now_ms();
            return;
        }

        if (errno == EAGAIN) {
            return;
        }

        if (errno != EINTR) {
            die("admin read: %s", strerror(errno));
        }
    }
}


static int
cmp_double(const void *a, const void *b)
{
    double  x = *(const double *) a, y = *(const double *) b;

    return (x > y) - (x < y);
}


/* wait for events until done() is true, for at most ms milliseconds */

static void
loop(int (*done)(void *), void *data, double ms, admin_t *admin,
    int *connecting, const char *what)
{
    int                 i, n;
    double              deadline;
    struct epoll_event  evs[1024];

    deadline = now_ms() + ms;

    while (!done(data)) {
        n = epoll_wait(ep, evs, 1024, 50);

        if (n == -1 && errno != EINTR) {
            die("epoll_wait: %s", strerror(errno));
        }

        for (i = 0; i < n; i++) {
            if (evs[i].data.ptr == &go_marker) {
                go = 1;
            } else if (admin && evs[i].data.ptr == admin) {
                admin_event(admin, evs[i].events);
            } else {
                client_event(evs[i].data.ptr, evs[i].events, connecting);
            }
        }

        if (now_ms() > deadline) {
            die("timed out waiting for %s", what);
        }
    }
}


static int
all_connected(void *data)
{
    int  *connecting = data;
    int   i;

    /* keep a bounded number of connections in progress */

    while (*connecting < CONNECTING_MAX && next_client < nclients) {
        clients[next_client].fd = nonblocking_socket();
        start_connect(clients[next_client].fd, next_client % nsources, port,
                      &clients[next_client]);
        next_client++;
        (*connecting)++;
    }

    if (next_client < nclients) {
        return 0;
    }

    for (i = 0; i < nclients; i++) {
        if (clients[i].snapshots == 0) {
            return 0;
        }
    }

    return 1;
}


static int
all_seen(void *data)
{
    admin_t  *a = data;
    int       i;

    if (!a->closed) {
        return 0;
    }

    if (a->status != 200) {
        a->buf[a->len < 200 ? a->len : 200] = '\0';
        die("the admin PUT was answered %d: %s", a->status, a->buf);
    }

    for (i = 0; i < nclients; i++) {
        if (clients[i].services < (unsigned) round_no) {
            return 0;
        }
    }

    return 1;
}


static int
got_go(void *data)
{
    (void) data;

    return go;
}


static int
admin_connected(void *data)
{
    return ((admin_t *) data)->connected;
}


static void
sleep_in_loop(int ms, int *connecting)
{
    int                 n, i;
    double              end;
    struct epoll_event  evs[1024];

    /* keep reading streams meanwhile: heartbeats must not pile up */

    end = now_ms() + ms;

    while (now_ms() < end) {
        n = epoll_wait(ep, evs, 1024, 10);
        for (i = 0; i < n; i++) {
            client_event(evs[i].data.ptr, evs[i].events, connecting);
        }
    }
}


int
main(int argc, char **argv)
{
    int                 opt, i, connecting, n;
    char                req[2048], body[512];
    double              t, *lat, put_ms;
    admin_t             admin;
    struct epoll_event  ev;

    while ((opt = getopt(argc, argv, "p:P:u:a:n:r:s:t:g:w")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'P': admin_port = atoi(optarg); break;
        case 'u': uri = optarg; break;
        case 'a': admin_uri = optarg; break;
        case 'n': nclients = atoi(optarg); break;
        case 'r': rounds = atoi(optarg); break;
        case 's': nsources = atoi(optarg); break;
        case 't': timeout_ms = atoi(optarg); break;
        case 'g': gap_ms = atoi(optarg); break;
        case 'w': wait_go = 1; break;
        default:
            fprintf(stderr, "usage: %s -p PORT [-P ADMIN_PORT] [-u URI]"
                    " [-a ADMIN_URI] [-n CLIENTS] [-r ROUNDS]"
                    " [-s SOURCES] [-t TIMEOUT_MS] [-g GAP_MS] [-w]\n",
                    argv[0]);
            return 2;
        }
    }

    if (port <= 0 || nclients <= 0 || rounds <= 0 || nsources < 0) {
        fprintf(stderr, "%s: -p PORT is required; counts must be > 0\n",
                argv[0]);
        return 2;
    }

    if (admin_port == 0) {
        admin_port = port;
    }

    setvbuf(stdout, NULL, _IOLBF, 0);

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep == -1) {
        die("epoll_create1: %s", strerror(errno));
    }

    clients = calloc(nclients, sizeof(client_t));
    lat = calloc(nclients, sizeof(double));
    if (clients == NULL || lat == NULL) {
        die("out of memory");
    }

    for (i = 0; i < nclients; i++) {
        clients[i].head = malloc(HEAD_MAX + 1);
        clients[i].seen = calloc(rounds, sizeof(double));
        if (clients[i].head == NULL || clients[i].seen == NULL) {
            die("out of memory");
        }
    }

    /* connect every stream and wait for every snapshot */

    t = now_ms();
    connecting = 0;
    loop(all_connected, &connecting, timeout_ms + nclients * 5.0, NULL,
         &connecting, "the streams' snapshots");

    printf("connected %d streams in %.0f ms\n", nclients, now_ms() - t);

    for (i = 0; i < nclients; i++) {
        free(clients[i].head);
        clients[i].head = NULL;
    }

    if (wait_go) {
        /* the caller looks at the gateway with every stream open */
        ev.events = EPOLLIN;
        ev.data.ptr = &go_marker;
        if (epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &ev) == -1) {
            die("epoll_ctl stdin: %s", strerror(errno));
        }

        loop(got_go, NULL, 3600000, NULL, &connecting, "a line on stdin");

        (void) epoll_ctl(ep, EPOLL_CTL_DEL, STDIN_FILENO, NULL);
    }

    for (round_no = 1; round_no <= rounds; round_no++) {

        sleep_in_loop(gap_ms, &connecting);

        memset(&admin, 0, sizeof(admin));
        admin.fd = nonblocking_socket();
        start_connect(admin.fd, -1, admin_port, &admin);
        loop(admin_connected, &admin, timeout_ms, &admin, &connecting,
             "the admin connection");

        ev.events = EPOLLIN | EPOLLRDHUP;
        ev.data.ptr = &admin;
        (void) epoll_ctl(ep, EPOLL_CTL_MOD, admin.fd, &ev);

        n = snprintf(body, sizeof(body),
                     "{\"state\":\"%s\",\"message\":{\"en\":\"bench round %d\","
                     "\"id\":\"putaran bench %d\"}}",
                     (round_no % 2) ? "degraded" : "outage",
                     round_no, round_no);

        n = snprintf(req, sizeof(req),
                     "PUT %s HTTP/1.1\r\n"
                     "Host: 127.0.0.1\r\n"
                     "Content-Type: application/json\r\n"
                     "Content-Length: %d\r\n"
                     "Connection: close\r\n"
                     "\r\n%s", admin_uri, n, body);

        round_t0 = now_ms();
        write_all(admin.fd, req, n);

        loop(all_seen, &admin, timeout_ms, &admin, &connecting,
             "the service event on every stream");

        put_ms = admin.answered - round_t0;
        close(admin.fd);

        for (i = 0; i < nclients; i++) {
            if (clients[i].services != (unsigned) round_no) {
                die("a stream got %u service events in round %d",
                    clients[i].services, round_no);
            }
            lat[i] = clients[i].seen[round_no - 1];
        }

        qsort(lat, nclients, sizeof(double), cmp_double);

        printf("round %d put_ms %.3f last_ms %.3f p50_ms %.3f p99_ms %.3f"
               " clients %d\n", round_no, put_ms, lat[nclients - 1],
               lat[nclients / 2], lat[(int) (nclients * 0.99)], nclients);
    }

    for (i = 0; i < nclients; i++) {
        close(clients[i].fd);
    }

    printf("ok\n");

    return 0;
}
