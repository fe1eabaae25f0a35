/*
 * loadgen.c - morsock's load generator: a single-threaded epoll client that sends
 * framed requests to an echo server and checks every reply.
 *
 * Wire (the Delphi original's, README / API.md section 2): a 9-byte header
 *   magic  uint32 little-endian 0xCAFEBABE (bytes BE BA FE CA)
 *   size   uint32 little-endian, bytes of payload that follow
 *   flag   uint8, 0 = plaintext
 * then the payload. The server must answer each request with one frame carrying the
 * same payload (flag 0): any other magic or size counts as an error.
 *
 * Modes (benchmarks/compare.py drives them; the output is ONE key=value line):
 *   loadgen echo  -p PORT [-H 127.0.0.1] [-c CONNS] [-d DEPTH] [-s SIZE] [-t SECS] [-w WARMUP]
 *       CONNS connections, each keeping DEPTH requests of SIZE bytes in flight; the
 *       request rate and latency are measured over SECS after WARMUP seconds.
 *   loadgen churn -p PORT [-H 127.0.0.1] [-c WORKERS] [-s SIZE] [-t SECS] [-w WARMUP]
 *       WORKERS loops of connect -> one request -> reply -> close.
 *   common: -T CONNECT_TIMEOUT (s, default 10), -P MAX_PENDING_CONNECTS (default 256)
 *
 * Exit status 0 when every connection was made and every reply was right, else 1
 * (2 for bad arguments). Build: cc -O2 -o loadgen loadgen.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0xCAFEBABEu
#define HEADER 9
#define READ_CHUNK (1 << 18)

static struct sockaddr_in server_addr;
static int epfd;
static uint64_t errors;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void put_le32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* ---- latency histogram: 64 linear steps per power of two (about 1.5 % wide), in ns ---- */
#define SUB 64
#define NBUCKETS (SUB + SUB * 58)
static uint64_t histogram[NBUCKETS];
static uint64_t histogram_count;

static int bucket_index(uint64_t ns) {
    if (ns < SUB) return (int)ns;
    int top = 63 - __builtin_clzll(ns);          /* ns in [2^top, 2^(top+1)) */
    int shift = top - 6;                          /* keep 6 bits below the top one */
    int index = SUB + (top - 6) * SUB + (int)((ns >> shift) - SUB);
    return index < NBUCKETS ? index : NBUCKETS - 1;
}

static double bucket_middle_us(int index) {
    if (index < SUB) return index / 1000.0;
    int shift = (index - SUB) / SUB;
    uint64_t low = (uint64_t)((index - SUB) % SUB + SUB) << shift;
    return (double)(low + ((1ull << shift) >> 1)) / 1000.0;
}

static void record_latency(uint64_t ns) { histogram[bucket_index(ns)]++; histogram_count++; }

static double percentile_us(double pct) {
    if (!histogram_count) return 0.0;
    uint64_t rank = (uint64_t)(pct / 100.0 * (double)histogram_count), seen = 0;
    if (rank >= histogram_count) rank = histogram_count - 1;
    for (int i = 0; i < NBUCKETS; i++) {
        seen += histogram[i];
        if (seen > rank) return bucket_middle_us(i);
    }
    return bucket_middle_us(NBUCKETS - 1);
}

/* ---- sockets ---- */
static void close_reset(int fd) {          /* RST: no TIME_WAIT left between runs */
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

static int connect_start(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&server_addr, sizeof server_addr) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Connect n sockets, at most max_pending at a time; fds[i] = socket or -1. Returns how
 * many connected; *failed counts the others. */
static int connect_all(int n, int *fds, int max_pending, double timeout_s, int *failed) {
    int ep = epoll_create1(EPOLL_CLOEXEC), next = 0, pending = 0, done = 0, ok = 0;
    uint64_t *started = calloc((size_t)n, sizeof *started);
    uint64_t limit = (uint64_t)(timeout_s * 1e9);
    struct epoll_event events[512];
    *failed = 0;
    for (int i = 0; i < n; i++) fds[i] = -1;
    while (done < n) {
        while (pending < max_pending && next < n) {
            int fd = connect_start();
            if (fd < 0) { (*failed)++; done++; next++; continue; }
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)next};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            fds[next] = fd; started[next] = now_ns(); next++; pending++;
        }
        int k = epoll_wait(ep, events, 512, 20);
        uint64_t t = now_ns();
        for (int j = 0; j < k; j++) {
            int i = (int)events[j].data.u32, err = 0;
            socklen_t len = sizeof err;
            getsockopt(fds[i], SOL_SOCKET, SO_ERROR, &err, &len);
            epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
            if (err) { close(fds[i]); fds[i] = -1; (*failed)++; } else ok++;
            started[i] = 0; pending--; done++;
        }
        for (int i = 0; pending && i < next; i++) {
            if (started[i] && t - started[i] > limit) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
                close(fds[i]); fds[i] = -1; started[i] = 0;
                (*failed)++; pending--; done++;
            }
        }
    }
    free(started);
    close(ep);
    return ok;
}

/* ---- requests and replies ---- */
static uint8_t *requests;      /* depth request frames back to back */
static size_t frame_len;
static uint32_t payload_size;
static int depth;
static uint8_t read_buf[READ_CHUNK];

typedef struct {
    int fd, open, want_write;
    uint8_t header[HEADER];
    int header_have;
    uint64_t body_left;
    uint64_t *sent_at;          /* ring of depth send times, oldest first */
    int ring_head, ring_count;
    size_t out_off, out_left;   /* unsent bytes of the request frames queued */
} conn_t;

static void make_requests(void) {
    frame_len = HEADER + (size_t)payload_size;
    requests = malloc(frame_len * (size_t)depth);
    for (size_t i = 0; i < frame_len; i++) {
        requests[i] = (uint8_t)(i * 31 + 7);
    }
    put_le32(requests, MAGIC);
    put_le32(requests + 4, payload_size);
    requests[8] = 0;
    for (int k = 1; k < depth; k++) memcpy(requests + (size_t)k * frame_len, requests, frame_len);
}

static void conn_close(conn_t *c) {
    if (!c->open) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close_reset(c->fd);
    c->open = 0;
}

/* Parse n reply bytes; returns the number of complete replies, -1 on a wrong header.
 * With record set, each reply's latency goes into the histogram. */
static int take_replies(conn_t *c, const uint8_t *p, size_t n, uint64_t t, int record) {
    size_t i = 0;
    int replies = 0;
    while (i < n) {
        if (c->body_left) {
            size_t k = n - i < c->body_left ? n - i : (size_t)c->body_left;
            i += k; c->body_left -= k;
            if (c->body_left) continue;
        } else {
            size_t k = HEADER - (size_t)c->header_have;
            if (k > n - i) k = n - i;
            memcpy(c->header + c->header_have, p + i, k);
            c->header_have += (int)k; i += k;
            if (c->header_have < HEADER) continue;
            c->header_have = 0;
            if (get_le32(c->header) != MAGIC || get_le32(c->header + 4) != payload_size || c->header[8] != 0)
                return -1;
            c->body_left = payload_size;
            if (c->body_left) continue;
        }
        replies++;
        if (c->ring_count) {
            if (record) record_latency(t - c->sent_at[c->ring_head]);
            c->ring_head = (c->ring_head + 1) % depth;
            c->ring_count--;
        }
    }
    return replies;
}

/* Queue n more requests (stamped t) and send what the socket takes. */
static void conn_send(conn_t *c, int n, uint64_t t) {
    for (int k = 0; k < n; k++) {
        c->sent_at[(c->ring_head + c->ring_count) % depth] = t;
        c->ring_count++;
    }
    c->out_left += (size_t)n * frame_len;
    while (c->out_left) {
        size_t room = (size_t)depth * frame_len - c->out_off;
        size_t len = c->out_left < room ? c->out_left : room;
        ssize_t w = send(c->fd, requests + c->out_off, len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            errors++; conn_close(c); return;
        }
        c->out_left -= (size_t)w;
        c->out_off = (c->out_off + (size_t)w) % frame_len;  /* every frame is the same */
    }
    int want = c->out_left > 0;
    if (want != c->want_write) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_write = want;
    }
}

static int run_echo(int nconn, double secs, double warmup, double timeout_s, int max_pending) {
    make_requests();
    int *fds = malloc(sizeof(int) * (size_t)nconn), failed = 0;
    uint64_t t0 = now_ns();
    int connected = connect_all(nconn, fds, max_pending, timeout_s, &failed);
    double connect_secs = (double)(now_ns() - t0) / 1e9;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    conn_t *conns = calloc((size_t)nconn, sizeof *conns);
    int open = 0;
    for (int i = 0; i < nconn; i++) {
        if (fds[i] < 0) continue;
        conn_t *c = &conns[i];
        c->fd = fds[i]; c->open = 1; c->sent_at = calloc((size_t)depth, sizeof(uint64_t));
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
        open++;
    }
    uint64_t start = now_ns();
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9), measure_to = measure_from + (uint64_t)(secs * 1e9);
    for (int i = 0; i < nconn; i++) if (conns[i].open) conn_send(&conns[i], depth, now_ns());
    uint64_t measured = 0, total = 0, t = now_ns();
    struct epoll_event events[1024];
    while (t < measure_to && open > 0) {
        int k = epoll_wait(epfd, events, 1024, 10);
        t = now_ns();
        int record = t >= measure_from && t < measure_to;
        for (int j = 0; j < k; j++) {
            conn_t *c = events[j].data.ptr;
            if (!c->open) continue;
            if (events[j].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                ssize_t r = recv(c->fd, read_buf, sizeof read_buf, 0);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    errors++; conn_close(c); open--; continue;
                }
                if (r > 0) {
                    int got = take_replies(c, read_buf, (size_t)r, t, record);
                    if (got < 0) { errors++; conn_close(c); open--; continue; }
                    total += (uint64_t)got;
                    if (record) measured += (uint64_t)got;
                    if (got) conn_send(c, got, t);
                    if (!c->open) { open--; continue; }
                }
            }
            if ((events[j].events & EPOLLOUT) && c->open) {
                conn_send(c, 0, t);
                if (!c->open) open--;
            }
        }
    }
    uint64_t end = t < measure_to ? t : measure_to;
    double measured_secs = end > measure_from ? (double)(end - measure_from) / 1e9 : 0.0;
    for (int i = 0; i < nconn; i++) conn_close(&conns[i]);
    double rate = measured_secs > 0 ? (double)measured / measured_secs : 0.0;
    printf("mode=echo conns=%d depth=%d size=%u secs=%.3f requests=%llu req_per_s=%.1f mb_per_s=%.3f "
           "p50_us=%.1f p99_us=%.1f errors=%llu connect_failures=%d connected=%d connect_secs=%.3f "
           "requests_total=%llu\n",
           nconn, depth, payload_size, measured_secs, (unsigned long long)measured, rate,
           rate * payload_size * 2 / 1e6, percentile_us(50), percentile_us(99),
           (unsigned long long)errors, failed, connected, connect_secs, (unsigned long long)total);
    return (errors || failed || measured == 0) ? 1 : 0;
}

/* ---- churn: connect -> one request -> reply -> orderly close, in a loop per worker ---- */
typedef struct { int fd, connected; uint64_t since; conn_t parse; } worker_t;

static int run_churn(int nworkers, double secs, double warmup, double timeout_s) {
    depth = 1;
    make_requests();
    epfd = epoll_create1(EPOLL_CLOEXEC);
    worker_t *ws = calloc((size_t)nworkers, sizeof *ws);
    uint64_t start = now_ns(), limit = (uint64_t)(timeout_s * 1e9);
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9), measure_to = measure_from + (uint64_t)(secs * 1e9);
    uint64_t cycles = 0, total = 0, failures = 0, t = start;
    struct epoll_event events[256];
    for (int i = 0; i < nworkers; i++) ws[i].fd = -1;
    for (;;) {
        for (int i = 0; i < nworkers; i++) {
            worker_t *w = &ws[i];
            if (w->fd >= 0 && t - w->since > limit) {
                epoll_ctl(epfd, EPOLL_CTL_DEL, w->fd, NULL); close_reset(w->fd); w->fd = -1; failures++;
            }
            if (w->fd < 0 && t < measure_to) {
                int fd = connect_start();
                if (fd < 0) { failures++; continue; }
                memset(w, 0, sizeof *w);
                w->fd = fd; w->since = t;
                struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)i};
                epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
            }
        }
        if (t >= measure_to) break;
        int k = epoll_wait(epfd, events, 256, 10);
        t = now_ns();
        for (int j = 0; j < k; j++) {
            worker_t *w = &ws[events[j].data.u32];
            int fail = 0, finished = 0;
            if (w->fd < 0) continue;
            if (!w->connected) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(w->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || send(w->fd, requests, frame_len, MSG_NOSIGNAL) != (ssize_t)frame_len) fail = 1;
                else {
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = events[j].data.u32};
                    epoll_ctl(epfd, EPOLL_CTL_MOD, w->fd, &ev);
                    w->connected = 1;
                }
            } else {
                ssize_t r = recv(w->fd, read_buf, sizeof read_buf, 0);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) fail = 1;
                else if (r > 0) {
                    int got = take_replies(&w->parse, read_buf, (size_t)r, t, 0);
                    if (got < 0) fail = 1; else if (got > 0) finished = 1;
                }
            }
            if (fail || finished) {
                epoll_ctl(epfd, EPOLL_CTL_DEL, w->fd, NULL);
                close(w->fd);
                w->fd = -1;
                if (fail) failures++;
                else {
                    total++;
                    if (t >= measure_from && t < measure_to) cycles++;
                }
            }
        }
    }
    for (int i = 0; i < nworkers; i++) if (ws[i].fd >= 0) close_reset(ws[i].fd);
    printf("mode=churn conns=%d size=%u secs=%.3f requests=%llu req_per_s=%.1f conns_per_s=%.1f "
           "errors=%llu requests_total=%llu\n",
           nworkers, payload_size, secs, (unsigned long long)cycles, cycles / secs, cycles / secs,
           (unsigned long long)failures, (unsigned long long)total);
    return (failures || cycles == 0) ? 1 : 0;
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen echo|churn -p PORT [-H HOST] [-c CONNS] [-d DEPTH] [-s SIZE] "
                    "[-t SECS] [-w WARMUP] [-T CONNECT_TIMEOUT] [-P MAX_PENDING_CONNECTS]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *mode = argv[1], *host = "127.0.0.1";
    int port = 0, nconn = 1, max_pending = 256;
    long size = 64;
    double secs = 5, warmup = 1, timeout_s = 10;
    depth = 1;
    for (int i = 2; i < argc; i += 2) {
        if (argv[i][0] != '-' || !argv[i][1] || argv[i][2] || i + 1 >= argc) usage();
        const char *v = argv[i + 1];
        switch (argv[i][1]) {
        case 'H': host = v; break;
        case 'p': port = atoi(v); break;
        case 'c': nconn = atoi(v); break;
        case 'd': depth = atoi(v); break;
        case 's': size = atol(v); break;
        case 't': secs = atof(v); break;
        case 'w': warmup = atof(v); break;
        case 'T': timeout_s = atof(v); break;
        case 'P': max_pending = atoi(v); break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || nconn <= 0 || depth <= 0 || size < 0 || size > 0x7fffffffL ||
        secs <= 0 || warmup < 0 || max_pending <= 0)
        usage();
    payload_size = (uint32_t)size;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        if ((rlim_t)nconn + 32 > rl.rlim_max)
            fprintf(stderr, "loadgen: %d connections need more open files than RLIMIT_NOFILE %llu\n",
                    nconn, (unsigned long long)rl.rlim_max);
    }
    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &server_addr.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad host %s (an IPv4 address)\n", host);
        return 2;
    }
    if (!strcmp(mode, "echo")) return run_echo(nconn, secs, warmup, timeout_s, max_pending);
    if (!strcmp(mode, "churn")) return run_churn(nconn, secs, warmup, timeout_s);
    usage();
    return 2;
}
