/*
 * c-echo: a minimal single-threaded, non-blocking, edge-triggered epoll echo
 * server, the "bare metal" reference for xps benchmarks. No line logic: every
 * byte read is written back. (A reversed line and an echoed line have the
 * same length, so xps-bench drives it with --verify echo.)
 *
 * Correct under back-pressure: bytes the socket does not take are kept in a
 * per-connection buffer (grown on demand), and reading from a connection
 * pauses while more than HIGH_WATER bytes wait for it. TCP_NODELAY is set on
 * the listening socket, which Linux copies to every accepted socket, as xps
 * does (no setsockopt per connection).
 *
 *   gcc -O2 -o echo echo.c && ./echo 127.0.0.1:PORT   (PORT 0 = any)
 *
 * Prints "[INFO] main() : Server listening on port PORT (ADDR)" on stderr
 * once bound, like xps.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_BUF (64 * 1024)
#define HIGH_WATER (1 << 20)
#define MAX_EVENTS 1024

struct conn {
    int fd;
    char *out;       /* unsent bytes: out[off..len] */
    size_t off, len, cap;
    int want_read;   /* data may be waiting to be read (edge consumed) */
};

static char rbuf[READ_BUF];

static void conn_close(int ep, struct conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->out);
    free(c);
}

/* Writes pending bytes; 0 ok (maybe still pending), -1 connection dead. */
static int flush_out(struct conn *c)
{
    while (c->off < c->len) {
        ssize_t n = send(c->fd, c->out + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (n > 0) {
            c->off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return 0;
        } else {
            return -1;
        }
    }
    c->off = c->len = 0;
    return 0;
}

/* Appends data to the pending output buffer; -1 on allocation failure. */
static int queue_out(struct conn *c, const char *p, size_t n)
{
    if (c->off > 0 && c->off == c->len)
        c->off = c->len = 0;
    if (c->len + n > c->cap) {
        if (c->off > 0) { /* compact first */
            memmove(c->out, c->out + c->off, c->len - c->off);
            c->len -= c->off;
            c->off = 0;
        }
        if (c->len + n > c->cap) {
            size_t cap = c->cap ? c->cap : 4096;
            while (cap < c->len + n)
                cap *= 2;
            char *q = realloc(c->out, cap);
            if (!q)
                return -1;
            c->out = q;
            c->cap = cap;
        }
    }
    memcpy(c->out + c->len, p, n);
    c->len += n;
    return 0;
}

/* Reads and echoes until EAGAIN or back-pressure; -1 to close. */
static int pump(struct conn *c)
{
    if (flush_out(c) < 0)
        return -1;
    while (c->want_read && c->len - c->off < HIGH_WATER) {
        ssize_t n = recv(c->fd, rbuf, sizeof rbuf, 0);
        if (n > 0) {
            if (c->off == c->len) {
                /* Fast path: nothing pending, send straight from rbuf. */
                ssize_t w = send(c->fd, rbuf, (size_t)n, MSG_NOSIGNAL);
                if (w < 0) {
                    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                        return -1;
                    w = 0;
                }
                if (w < n && queue_out(c, rbuf + w, (size_t)(n - w)) < 0)
                    return -1;
            } else if (queue_out(c, rbuf, (size_t)n) < 0) {
                return -1;
            }
            if ((size_t)n < sizeof rbuf)
                c->want_read = 0; /* short read: socket drained */
        } else if (n == 0) {
            /* EOF: send what is left (best effort) and close. */
            flush_out(c);
            return -1;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            c->want_read = 0;
        } else {
            return -1;
        }
    }
    return 0;
}

static int parse_addr(const char *s, struct sockaddr_in *sa)
{
    char host[64];
    const char *colon = strrchr(s, ':');
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    if (!colon) {
        sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        sa->sin_port = htons((unsigned short)atoi(s));
        return 0;
    }
    size_t hl = (size_t)(colon - s);
    if (hl >= sizeof host)
        return -1;
    memcpy(host, s, hl);
    host[hl] = 0;
    if (inet_pton(AF_INET, host, &sa->sin_addr) != 1)
        return -1;
    sa->sin_port = htons((unsigned short)atoi(colon + 1));
    return 0;
}

int main(int argc, char **argv)
{
    struct sockaddr_in sa;
    if (argc != 2 || parse_addr(argv[1], &sa) < 0) {
        fprintf(stderr, "usage: %s HOST:PORT (IPv4)\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Like xps: replies must not wait for Nagle; accepted sockets inherit it. */
    setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 4096) < 0) {
        perror("listen");
        return 1;
    }
    socklen_t sl = sizeof sa;
    getsockname(lfd, (struct sockaddr *)&sa, &sl);
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &sa.sin_addr, ip, sizeof ip);
    fprintf(stderr, "[INFO] main() : Server listening on port %d (%s:%d)\n", ntohs(sa.sin_port), ip,
            ntohs(sa.sin_port));

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) { /* listener (level-triggered): accept a batch */
                for (int k = 0; k < 256; k++) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) {
                        if (errno == EMFILE || errno == ENFILE)
                            usleep(1000); /* out of fds: back off, never spin */
                        break;
                    }
                    struct conn *nc = calloc(1, sizeof *nc);
                    if (!nc) {
                        close(fd);
                        continue;
                    }
                    nc->fd = fd;
                    nc->want_read = 1;
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                              .data.ptr = nc};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev) < 0) {
                        close(fd);
                        free(nc);
                    }
                }
                continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                c->want_read = 1;
            if (pump(c) < 0)
                conn_close(ep, c);
        }
    }
}
