/* bootd-fetch: the stage-one agent's chunk fetcher (see agent.sh, which falls back to shell workers
 * when this binary is absent).
 *
 *   bootd-fetch -u http://A.B.C.D[:PORT][/PREFIX] [-w WORKERS] [-W WINDOW] [-r RETRIES] [-t TIMEOUT]
 *               [-n NODE] [-f FAILFILE] TABLE        (BOOTD_TOKEN in the environment: progress events)
 *   bootd-fetch -c -u URL                            (exit 0 when this URL can be used)
 *   bootd-fetch -p WHAT -u URL -n NODE [-t TIMEOUT]  (BOOTD_TOKEN in the environment)
 *       POSTs the JSON body read from stdin (at most 2 KiB) to URL/api/v1/nodes/NODE/WHAT (WHAT: events or
 *       heartbeat) once; exit 0 on a 2xx reply, 1 otherwise with the status line or the reason on stderr.
 *       The node agent (node-agent.sh) uses it: a real distribution's root may have no HTTP client.
 *   bootd-fetch -g KIND -o FILE -u URL -n NODE [-e ETAG] [-t TIMEOUT]  (BOOTD_TOKEN in the environment)
 *       GETs the node's rendered overlays, URL/api/v1/nodes/NODE/overlay/KIND (system or runtime, a tar of
 *       at most 64 MiB) with If-None-Match: ETAG when given; on 200 writes the body to FILE and the reply's
 *       ETag to stdout (exit 0); 304: exit 4, FILE untouched; a refusal (403, 404, 410, 500: bootd's text
 *       says why, e.g. the template and line that failed) exit 5, anything else (no reply, 503) exit 1,
 *       both with the status line and the first line of the reply's text on stderr (overlay.sh uses it).
 *
 * TABLE has one line per chunk, in capsule order: "<sha256 hex> <stored size hex> <raw size hex>".
 * WORKERS threads each keep one HTTP/1.1 keep-alive connection to bootd and claim chunks in order,
 * never more than WINDOW chunks ahead of the writer, so RAM holds at most WINDOW stored chunks. The
 * main thread writes chunks to stdout strictly in order, and only after the chunk's sha256 (of the
 * stored bytes) matched the table: no unverified byte ever reaches zstd | tar.
 *
 * Faults: refused/dropped connections and timeouts are retried with backoff and jitter, a partial chunk
 * is resumed with Range (206 continues it, 200 restarts it), 503 waits Retry-After (+ up to 25% jitter,
 * capped at 30 s and at TIMEOUT), 404/403/410/500 are fatal for the chunk (bootd answers 500 for a chunk
 * it found corrupt on disk), a hash mismatch is fetched once more and then fatal; RETRIES attempts per
 * chunk, each given TIMEOUT seconds in all (connect, request, reply headers and body).
 * Every byte of a reply is untrusted: a head longer than 16 KiB, without CRLF line ends or with control
 * bytes, a malformed, conflicting or absent Content-Length, any Transfer-Encoding, a 206 that does not
 * answer the Range asked, or more body bytes than announced are refused (the connection is dropped),
 * and server text in a reason is reduced to printable ASCII.
 * A fatal error writes one line naming the chunk to FAILFILE (or stderr) and exits 1 without writing
 * that chunk. Exit 3: stdout went away (zstd or tar stopped). Exit 2: usage.
 *
 * Console lines on stderr start with "BOOTD-STAGE1 " like the agent's ("fetching i/N" at most once a
 * second and at the end, "retry ..."); with -n and BOOTD_TOKEN the `fetching` event is POSTed to bootd
 * at most once a second, as the agent did.
 */
#define _GNU_SOURCE
#define OPENSSL_SUPPRESS_DEPRECATED
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/sha.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_CHUNK (256u * 1024 * 1024) /* bootd's capsule.chunk_max upper bound */
#define HDR_MAX 16384

struct chunk {
    char hash[65];
    uint32_t size;
    unsigned char *data; /* verified stored bytes, set by a worker, freed by the writer */
    int ready;
};

static struct {
    struct sockaddr_in addr;
    char hostport[64];
    char prefix[256];
    int workers, window, retries, timeout;
    const char *node, *token, *failfile;
} cfg = {.workers = 4, .window = 16, .retries = 10, .timeout = 60};

static struct chunk *chunks;
static int count;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_claim = PTHREAD_COND_INITIALIZER; /* workers: the window moved */
static pthread_cond_t cv_ready = PTHREAD_COND_INITIALIZER; /* writer: a chunk is ready, or abort */
static pthread_cond_t cv_prog = PTHREAD_COND_INITIALIZER;  /* progress thread: finished */
static int next_claim, written, aborted, finished;
static char fail_reason[1024];

static void say(const char *fmt, ...) {
    char line[1200] = "BOOTD-STAGE1 ";
    size_t p = strlen(line);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line + p, sizeof line - p - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    p += (size_t)n < sizeof line - p - 1 ? (size_t)n : sizeof line - p - 2;
    line[p++] = '\n';
    if (write(2, line, p) < 0) /* one write per line: threads never interleave within a line */
        return;
}

/* The first fatal error wins; every thread then stops. */
static void fatal(const char *fmt, ...) {
    pthread_mutex_lock(&mu);
    if (!aborted) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(fail_reason, sizeof fail_reason, fmt, ap);
        va_end(ap);
        aborted = 1;
    }
    pthread_cond_broadcast(&cv_claim);
    pthread_cond_broadcast(&cv_ready);
    pthread_mutex_unlock(&mu);
}

static int is_aborted(void) {
    pthread_mutex_lock(&mu);
    int a = aborted;
    pthread_mutex_unlock(&mu);
    return a;
}

static long retry_after_cap(void) { return cfg.timeout < 30 ? cfg.timeout : 30; }

static unsigned rnd(unsigned *seed) { return (unsigned)rand_r(seed); }

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* The agent's backoff: after a 503 with Retry-After, that long (capped at 30 s, and at TIMEOUT: a server
 * cannot make a node wait longer than it would wait for a reply) plus up to a quarter more; otherwise 0.5 s * 2^attempt, capped at 8 s, times a random factor in [0.5, 1.5). */
static void backoff(int attempt, long retry_after_s, unsigned *seed) {
    long ms;
    if (retry_after_s >= 0) {
        ms = retry_after_s > retry_after_cap() ? retry_after_cap() * 1000L : retry_after_s * 1000;
        ms += (long)(rnd(seed) % (unsigned long)(ms / 4 + 1));
    } else {
        ms = 500;
        for (int a = attempt; a > 0 && ms < 8000; a--)
            ms *= 2;
        if (ms > 8000)
            ms = 8000;
        ms = ms / 2 + (long)(rnd(seed) % (unsigned long)(ms + 1));
    }
    sleep_ms(ms);
}

/* ---- connections ---------------------------------------------------------------------------- */

/* Every wait on the network ends by a deadline: one request (connect, send, reply headers and body) gets
 * TIMEOUT seconds in all, as the shell workers' `timeout $TIMEOUT wget`, so a server that drips a byte
 * now and then cannot hold a worker longer than a server that sends nothing. A partial body is kept and
 * resumed with Range on the next attempt. */
static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

struct conn {
    int fd;
    int uses; /* requests answered on this connection */
    long long deadline; /* now_ms() by which the current request must be done */
    size_t len, off; /* buffered bytes in buf[off..len) */
    char buf[HDR_MAX];
};

static void conn_close(struct conn *c) {
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->uses = 0;
    c->len = c->off = 0;
}

/* Waits until fd is ready for events or the deadline passed: 1 ready (or an error the next call reports),
 * 0 timed out (errno ETIMEDOUT), -1 poll failed. */
static int wait_fd(int fd, short events, long long deadline) {
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) {
            errno = ETIMEDOUT;
            return 0;
        }
        struct pollfd p = {fd, events, 0};
        int r = poll(&p, 1, left > 3600000 ? 3600000 : (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r != 0)
            return r > 0 ? 1 : -1;
    }
}

static int conn_open(struct conn *c, char *err, size_t errlen) {
    conn_close(c);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&cfg.addr, sizeof cfg.addr) < 0) {
        if (errno != EINPROGRESS) {
            snprintf(err, errlen, "connect: %s", strerror(errno));
            close(fd);
            return -1;
        }
        int r = wait_fd(fd, POLLOUT, c->deadline);
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        if (r == 0) {
            snprintf(err, errlen, "connect: timed out after %ds", cfg.timeout);
            close(fd);
            return -1;
        }
        if (r < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0 || soerr) {
            snprintf(err, errlen, "connect: %s", strerror(soerr ? soerr : errno));
            close(fd);
            return -1;
        }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd; /* stays non-blocking: every recv and send waits in wait_fd, bounded by the deadline */
    c->uses = 0;
    c->len = c->off = 0;
    return 0;
}

/* An idle keep-alive connection must have nothing to read: bytes there are either the server's close or
 * bytes it sent beyond a reply (a body longer than announced), which must never be taken as the reply to
 * the next request. */
static int conn_idle_clean(struct conn *c) {
    struct pollfd p = {c->fd, POLLIN, 0};
    return c->off == c->len && poll(&p, 1, 0) == 0;
}

static const char *io_error(ssize_t r) {
    if (r == 0)
        return "connection closed by the server";
    if (errno == ETIMEDOUT || errno == EAGAIN || errno == EWOULDBLOCK)
        return "timed out";
    return strerror(errno);
}

/* One recv before the deadline: >0 bytes, 0 the server closed, -1 error or timeout (errno). */
static ssize_t conn_recv(struct conn *c, void *dst, size_t n) {
    for (;;) {
        ssize_t r = recv(c->fd, dst, n, 0);
        if (r >= 0)
            return r;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -1;
        int w = wait_fd(c->fd, POLLIN, c->deadline);
        if (w <= 0)
            return -1;
    }
}

static int send_all(struct conn *c, const char *p, size_t n, char *err, size_t errlen) {
    while (n) {
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && wait_fd(c->fd, POLLOUT, c->deadline) > 0)
            continue;
        if (w <= 0) {
            snprintf(err, errlen, "send: %s", io_error(w));
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

struct reply {
    int status;
    long long length; /* Content-Length, -1 when absent */
    long long range_start, range_end, range_total; /* Content-Range of a 206, -1 when absent */
    long retry_after; /* seconds (saturated), -1 when absent or not a number */
    char etag[80]; /* a quoted strong ETag of printable ASCII without blanks, "" when absent or odd */
    int close; /* Connection: close, or HTTP/1.0 */
    const char *bad; /* the first framing problem, for a 200 or 206: its body is not used */
    char status_line[128]; /* printable ASCII only */
};

/* Server text in a reason or console line: printable ASCII only, so one line stays one line and no
 * escape sequence reaches the console. */
static void printable(char *dst, size_t dstlen, const char *src, size_t n) {
    size_t k = 0;
    for (size_t i = 0; i < n && src[i] && k + 1 < dstlen; i++)
        dst[k++] = src[i] >= 0x20 && src[i] < 0x7f ? src[i] : '?';
    dst[k] = 0;
}

/* A decimal number: digits only, optional trailing blanks; saturates at max. -1 when malformed. */
static long long parse_num(const char *s, const char **end, long long max) {
    long long v = 0;
    const char *p = s;
    if (*p < '0' || *p > '9')
        return -1;
    for (; *p >= '0' && *p <= '9'; p++)
        v = v > (max - (*p - '0')) / 10 ? max : v * 10 + (*p - '0');
    *end = p;
    return v;
}

static int only_blanks(const char *p) {
    while (*p == ' ' || *p == '\t')
        p++;
    return !*p;
}

/* Is token (e.g. "close") in a comma-separated header value? */
static int has_token(const char *v, const char *token) {
    size_t tl = strlen(token);
    while (*v) {
        while (*v == ' ' || *v == '\t' || *v == ',')
            v++;
        size_t n = strcspn(v, ",");
        size_t k = n;
        while (k && (v[k - 1] == ' ' || v[k - 1] == '\t'))
            k--;
        if (k == tl && !strncasecmp(v, token, tl))
            return 1;
        v += n;
    }
    return 0;
}

#define LEN_MAX (1LL << 62) /* longer than any chunk: a larger Content-Length saturates here */

/* Reads the status line and headers; the body's first bytes stay in c->buf[c->off..c->len).
 * Returns 0, or -1 with err set; *got_any tells whether the server sent anything at all. */
static int read_head(struct conn *c, struct reply *r, int *got_any, char *err, size_t errlen) {
    c->len = c->off = 0;
    *got_any = 0;
    char *end = NULL;
    size_t scanned = 0;
    int lf_only = 0;
    while (!end) {
        if (c->len >= sizeof c->buf - 1) {
            snprintf(err, errlen, "reply headers longer than %d bytes", HDR_MAX);
            return -1;
        }
        ssize_t n = conn_recv(c, c->buf + c->len, sizeof c->buf - 1 - c->len);
        if (n <= 0) {
            if (c->len)
                snprintf(err, errlen, "reply headers cut short after %zu bytes: %s", c->len, io_error(n));
            else
                snprintf(err, errlen, "%s", io_error(n));
            return -1;
        }
        *got_any = 1;
        c->len += (size_t)n;
        c->buf[c->len] = 0;
        /* Only the new bytes (and the 3 before them) are searched: a byte-at-a-time reply stays linear. */
        size_t from = scanned > 3 ? scanned - 3 : 0;
        end = memmem(c->buf + from, c->len - from, "\r\n\r\n", 4);
        char *lf = memmem(c->buf + from, c->len - from, "\n\n", 2);
        if (lf && (!end || lf < end)) { /* the end of a head without CRLF: refuse it now, not at timeout */
            end = lf;
            lf_only = 1;
        }
        scanned = c->len;
    }
    size_t head_len = (size_t)(end - c->buf);
    c->off = head_len + (lf_only ? 2 : 4);
    memset(r, 0, sizeof *r);
    r->length = r->range_start = r->range_end = r->range_total = -1;
    r->retry_after = -1;
    size_t first = strcspn(c->buf, "\r\n");
    printable(r->status_line, sizeof r->status_line, c->buf, first < 100 ? first : 100);
    /* The head is text: CRLF line ends, no control bytes but HT (a NUL would hide the rest of a line). */
    for (size_t i = 0; i < head_len; i++) {
        unsigned char b = (unsigned char)c->buf[i];
        if (lf_only || (b == '\r' && c->buf[i + 1] != '\n') || (b == '\n' && (i == 0 || c->buf[i - 1] != '\r'))) {
            snprintf(err, errlen, "reply headers without CRLF line ends: %s", r->status_line);
            return -1;
        }
        if ((b < 0x20 && b != '\t' && b != '\r' && b != '\n') || b == 0x7f) {
            snprintf(err, errlen, "control byte 0x%02x in the reply headers: %s", b, r->status_line);
            return -1;
        }
    }
    *end = 0;
    char *line = c->buf, *nl = strstr(line, "\r\n");
    if (nl)
        *nl = 0;
    /* "HTTP/1.x NNN" then a space and a reason phrase, or nothing */
    if (strncmp(line, "HTTP/1.", 7) || (line[7] != '0' && line[7] != '1') || line[8] != ' ' || line[9] < '1' ||
        line[9] > '9' || line[10] < '0' || line[10] > '9' || line[11] < '0' || line[11] > '9' ||
        (line[12] != ' ' && line[12] != 0)) {
        snprintf(err, errlen, "not an HTTP reply: %.60s", r->status_line);
        return -1;
    }
    r->status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');
    if (line[7] == '0')
        r->close = 1;
    while (nl) {
        line = nl + 2;
        nl = strstr(line, "\r\n");
        if (nl)
            *nl = 0;
        char *colon = strchr(line, ':');
        if (!colon)
            continue;
        *colon = 0;
        char *v = colon + 1;
        const char *e;
        while (*v == ' ' || *v == '\t')
            v++;
        if (!strcasecmp(line, "Content-Length")) {
            long long n = parse_num(v, &e, LEN_MAX);
            if (n < 0 || n == LEN_MAX || !only_blanks(e)) {
                if (!r->bad)
                    r->bad = "malformed Content-Length";
            } else if (r->length >= 0 && r->length != n) {
                if (!r->bad)
                    r->bad = "conflicting Content-Length headers";
            } else
                r->length = n;
        } else if (!strcasecmp(line, "Transfer-Encoding")) {
            if (!r->bad)
                r->bad = "Transfer-Encoding is not supported";
        } else if (!strcasecmp(line, "Retry-After")) {
            long long n = parse_num(v, &e, 1000000);
            r->retry_after = n >= 0 && only_blanks(e) ? (long)n : -1; /* an HTTP-date or garbage: backoff */
        } else if (!strcasecmp(line, "ETag")) {
            size_t n = strcspn(v, " \t");
            if (n >= 2 && n < sizeof r->etag && v[0] == '"' && v[n - 1] == '"' && only_blanks(v + n)) {
                printable(r->etag, sizeof r->etag, v, n);
                if (strchr(r->etag + 1, '"') != r->etag + n - 1 || strchr(r->etag, '?'))
                    r->etag[0] = 0;
            }
        } else if (!strcasecmp(line, "Connection")) {
            if (has_token(v, "close"))
                r->close = 1;
        } else if (!strcasecmp(line, "Content-Range")) {
            long long a = -1, b = -1, t = -1;
            if (!strncmp(v, "bytes ", 6) && (a = parse_num(v + 6, &e, LEN_MAX)) >= 0 && *e == '-' &&
                (b = parse_num(e + 1, &e, LEN_MAX)) >= 0 && *e == '/' && (t = parse_num(e + 1, &e, LEN_MAX)) >= 0 &&
                only_blanks(e) && a <= b && b < t && r->range_start < 0) {
                r->range_start = a;
                r->range_end = b;
                r->range_total = t;
            } else if (!r->bad)
                r->bad = "malformed Content-Range";
        }
    }
    return 0;
}

/* Body bytes into dst: first what read_head buffered, then straight from the socket. */
static int read_body(struct conn *c, unsigned char *dst, size_t n, size_t *got, char *err, size_t errlen) {
    *got = 0;
    size_t buffered = c->len - c->off;
    if (buffered) {
        size_t k = buffered < n ? buffered : n;
        memcpy(dst, c->buf + c->off, k);
        c->off += k;
        *got = k;
    }
    while (*got < n) {
        ssize_t r = conn_recv(c, dst + *got, n - *got);
        if (r <= 0) {
            snprintf(err, errlen, "%s after %zu of %zu bytes", io_error(r), *got, n);
            return -1;
        }
        *got += (size_t)r;
    }
    return 0;
}

/* ---- one chunk -------------------------------------------------------------------------------- */

enum { TRY_OK, TRY_RETRY, TRY_FATAL, TRY_RESTART };

struct job {
    struct chunk *ch;
    unsigned char *buf;
    size_t have;
    char url[400];
    char err[512];
    long retry_after;
};

/* One request on c; the chunk's bytes accumulate in j->buf (j->have of them so far). */
static int try_once(struct conn *c, struct job *j) {
    char req[768];
    int reused = 0;
    c->deadline = now_ms() + (long long)cfg.timeout * 1000;
    for (;;) {
        if (c->fd >= 0 && !conn_idle_clean(c))
            conn_close(c);
        if (c->fd < 0 && conn_open(c, j->err, sizeof j->err) < 0)
            return TRY_RETRY;
        reused = c->uses > 0;
        int n;
        if (j->have)
            n = snprintf(req, sizeof req,
                         "GET %s/chunks/%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: bootd-fetch\r\n"
                         "Range: bytes=%zu-\r\n\r\n",
                         cfg.prefix, j->ch->hash, cfg.hostport, j->have);
        else
            n = snprintf(req, sizeof req, "GET %s/chunks/%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: bootd-fetch\r\n\r\n",
                         cfg.prefix, j->ch->hash, cfg.hostport);
        struct reply r;
        int got_any = 0;
        if (send_all(c, req, (size_t)n, j->err, sizeof j->err) < 0 ||
            read_head(c, &r, &got_any, j->err, sizeof j->err) < 0) {
            conn_close(c);
            if (reused && !got_any && errno != ETIMEDOUT)
                continue; /* the server had closed the idle keep-alive connection: reconnect at once */
            return TRY_RETRY;
        }
        c->uses++;
        if (r.status == 200 || r.status == 206) {
            size_t size = j->ch->size;
            if (r.bad) {
                conn_close(c);
                snprintf(j->err, sizeof j->err, "%s: %s", r.status_line, r.bad);
                return TRY_RETRY;
            }
            if (r.length < 0) {
                conn_close(c);
                snprintf(j->err, sizeof j->err, "%s: no Content-Length", r.status_line);
                return TRY_RETRY;
            }
            if (r.status == 206) {
                if (!j->have) {
                    conn_close(c);
                    snprintf(j->err, sizeof j->err, "206 Partial Content to a request without Range");
                    return TRY_RETRY;
                }
                if (r.range_start != (long long)j->have || r.range_end != (long long)size - 1 ||
                    r.range_total != (long long)size || r.length != r.range_end - r.range_start + 1) {
                    conn_close(c);
                    snprintf(j->err, sizeof j->err, "206 for bytes %lld-%lld/%lld where %zu- was asked (%lld bytes)",
                             r.range_start, r.range_end, r.range_total, j->have, r.length);
                    j->have = 0;
                    return TRY_RETRY;
                }
            } else {
                j->have = 0; /* 200: the whole chunk again */
                if (r.length != (long long)size) { /* a different object: a verification failure */
                    conn_close(c);
                    snprintf(j->err, sizeof j->err, "got %lld bytes where the manifest says %zu", r.length, size);
                    return TRY_RESTART;
                }
            }
            size_t want = size - j->have, got = 0;
            int rc = read_body(c, j->buf + j->have, want, &got, j->err, sizeof j->err);
            j->have += got;
            if (rc < 0) {
                conn_close(c);
                return TRY_RETRY;
            }
            if (r.close || c->off != c->len) /* more bytes than announced: the connection is not reused */
                conn_close(c);
            return TRY_OK;
        }
        /* Error replies: their bodies are not needed, so the connection is simply dropped. */
        conn_close(c);
        snprintf(j->err, sizeof j->err, "server returned %s", r.status_line);
        if (r.status == 404 || r.status == 403 || r.status == 410 || r.status == 500)
            return TRY_FATAL;
        if (r.status == 416) {
            j->have = 0;
            return TRY_RETRY;
        }
        j->retry_after = r.status == 503 ? r.retry_after : -1;
        if (r.status == 503 && j->retry_after < 0)
            j->retry_after = -2; /* a 503 without Retry-After: plain backoff */
        return TRY_RETRY;
    }
}

static void hex(const unsigned char *d, size_t n, char *out) {
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[d[i] >> 4];
        out[2 * i + 1] = digits[d[i] & 15];
    }
    out[2 * n] = 0;
}

/* Fetch and verify one chunk; returns its bytes, or NULL after fatal(). */
static unsigned char *fetch_chunk(struct conn *c, struct chunk *ch, unsigned *seed) {
    struct job j;
    memset(&j, 0, sizeof j);
    j.ch = ch;
    snprintf(j.url, sizeof j.url, "http://%s%s/chunks/%s", cfg.hostport, cfg.prefix, ch->hash);
    j.buf = malloc(ch->size ? ch->size : 1);
    if (!j.buf) {
        fatal("chunk %s could not be fetched: out of memory for %u bytes", ch->hash, ch->size);
        return NULL;
    }
    int attempt = 0, verify_tries = 0;
    while (!is_aborted()) {
        j.retry_after = -1;
        int rc = ch->size && j.have == ch->size ? TRY_OK : try_once(c, &j);
        if (rc == TRY_OK) {
            unsigned char md[SHA256_DIGEST_LENGTH];
            char got[65];
            SHA256_CTX sha; /* the low-level calls link only the SHA-256 code (SHA-NI), not EVP */
            SHA256_Init(&sha);
            SHA256_Update(&sha, j.buf, j.have);
            SHA256_Final(md, &sha);
            hex(md, sizeof md, got);
            if (!strcmp(got, ch->hash))
                return j.buf;
            j.have = 0;
            rc = TRY_RESTART;
            snprintf(j.err, sizeof j.err, "got sha256 %s", got);
        }
        if (rc == TRY_RESTART) {
            j.have = 0;
            if (++verify_tries >= 2) {
                fatal("chunk %s failed verification (%s)", ch->hash, j.err);
                break;
            }
            say("chunk %s failed verification, fetching it again", ch->hash);
            j.err[0] = 0;
            continue;
        }
        if (rc == TRY_FATAL) {
            fatal("chunk %s could not be fetched: %s: %s", ch->hash, j.url, j.err);
            break;
        }
        if (++attempt >= cfg.retries) {
            fatal("chunk %s could not be fetched: %s: %s (after %d attempts)", ch->hash, j.url, j.err, attempt);
            break;
        }
        if (j.retry_after > retry_after_cap())
            j.retry_after = retry_after_cap();
        if (j.retry_after >= 0)
            say("retry %s in %lds (server busy, 503)", j.url, j.retry_after);
        else if (j.retry_after == -2)
            say("retry %s in backoff (server busy, 503)", j.url);
        else
            say("retry %s (attempt %d: %s)", j.url, attempt, j.err);
        backoff(attempt, j.retry_after >= 0 ? j.retry_after : -1, seed);
    }
    free(j.buf);
    return NULL;
}

static void *worker(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg * 2654435761u ^ (unsigned)getpid() ^ (unsigned)time(NULL);
    struct conn *c = malloc(sizeof *c);
    if (!c) {
        fatal("bootd-fetch: out of memory");
        return NULL;
    }
    c->fd = -1;
    conn_close(c);
    for (;;) {
        pthread_mutex_lock(&mu);
        while (!aborted && next_claim < count && next_claim - written >= cfg.window)
            pthread_cond_wait(&cv_claim, &mu);
        if (aborted || next_claim >= count) {
            pthread_mutex_unlock(&mu);
            break;
        }
        int i = next_claim++;
        pthread_mutex_unlock(&mu);
        unsigned char *data = fetch_chunk(c, &chunks[i], &seed);
        if (!data)
            break;
        pthread_mutex_lock(&mu);
        chunks[i].data = data;
        chunks[i].ready = 1;
        pthread_cond_broadcast(&cv_ready);
        pthread_mutex_unlock(&mu);
    }
    conn_close(c);
    free(c);
    return NULL;
}

/* ---- progress --------------------------------------------------------------------------------- */

/* POSTs a JSON body to PREFIX/api/v1/nodes/NODE/WHAT with the node's token; the reply's status, or -1
 * with the reason in err when no reply came. One connection per POST: they are seconds apart. */
static int post_json(const char *what, const char *body, char *err, size_t errlen) {
    char req[4096];
    int n = snprintf(req, sizeof req,
                     "POST %s/api/v1/nodes/%s/%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: bootd-fetch\r\n"
                     "X-Bootd-Token: %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n%s",
                     cfg.prefix, cfg.node, what, cfg.hostport, cfg.token, strlen(body), body);
    if (n <= 0 || n >= (int)sizeof req) {
        snprintf(err, errlen, "request too long");
        return -1;
    }
    struct conn *c = malloc(sizeof *c);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    c->fd = -1;
    c->deadline = now_ms() + (long long)cfg.timeout * 1000;
    int status = -1;
    if (conn_open(c, err, errlen) == 0 && send_all(c, req, (size_t)n, err, errlen) == 0) {
        struct reply r;
        int any;
        if (read_head(c, &r, &any, err, errlen) == 0) {
            status = r.status;
            snprintf(err, errlen, "%s", r.status_line);
        }
    }
    conn_close(c);
    free(c);
    return status;
}

static void post_fetching(int done) {
    if (!cfg.node || !cfg.token)
        return;
    char body[160], err[256];
    snprintf(body, sizeof body, "{\"event\":\"fetching\",\"reason\":\"\",\"done\":%d,\"total\":%d}", done, count);
    (void)post_json("events", body, err, sizeof err); /* best effort, as the agent's was */
}

/* At most once a second: a console line and the `fetching` event. The main thread never waits for this
 * thread (an event POST may hang until its timeout); it prints the final line itself. */
static void *progress(void *arg) {
    (void)arg;
    int last = 0;
    pthread_mutex_lock(&mu);
    for (;;) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += 1;
        while (!finished && !aborted && pthread_cond_timedwait(&cv_prog, &mu, &ts) == 0)
            ;
        if (finished || aborted)
            break;
        int w = written;
        if (w == last)
            continue;
        last = w;
        say("fetching %d/%d", w, count); /* under the lock, so it never follows the final line */
        pthread_mutex_unlock(&mu);
        post_fetching(w);
        pthread_mutex_lock(&mu);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

/* ---- main ------------------------------------------------------------------------------------- */

static int parse_url(const char *url) {
    if (strncmp(url, "http://", 7))
        return -1;
    const char *hp = url + 7, *slash = strchr(hp, '/');
    size_t hl = slash ? (size_t)(slash - hp) : strlen(hp);
    if (hl == 0 || hl >= sizeof cfg.hostport)
        return -1;
    memcpy(cfg.hostport, hp, hl);
    cfg.hostport[hl] = 0;
    const char *prefix = slash ? slash : "";
    size_t pl = strlen(prefix);
    while (pl && prefix[pl - 1] == '/')
        pl--;
    if (pl >= sizeof cfg.prefix)
        return -1;
    memcpy(cfg.prefix, prefix, pl);
    cfg.prefix[pl] = 0;
    char host[64];
    snprintf(host, sizeof host, "%s", cfg.hostport);
    long port = 80;
    char *colon = strchr(host, ':');
    if (colon) {
        char *end;
        *colon = 0;
        port = strtol(colon + 1, &end, 10);
        if (*end || port <= 0 || port > 65535)
            return -1;
    }
    memset(&cfg.addr, 0, sizeof cfg.addr);
    cfg.addr.sin_family = AF_INET;
    cfg.addr.sin_port = htons((uint16_t)port);
    return inet_pton(AF_INET, host, &cfg.addr.sin_addr) == 1 ? 0 : -1;
}

static int load_table(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int cap = 256;
    chunks = calloc((size_t)cap, sizeof *chunks);
    char line[256];
    while (chunks && fgets(line, sizeof line, f)) {
        char h[80];
        unsigned s, r;
        if (sscanf(line, "%79s %x %x", h, &s, &r) != 3 || strlen(h) != 64 || strspn(h, "0123456789abcdef") != 64 ||
            s > MAX_CHUNK) {
            fclose(f);
            return -2;
        }
        if (count == cap) {
            cap *= 2;
            struct chunk *more = realloc(chunks, (size_t)cap * sizeof *chunks);
            if (!more) { /* never a table cut short: its tail would simply not be written */
                free(chunks);
                chunks = NULL;
                break;
            }
            chunks = more;
        }
        memset(&chunks[count], 0, sizeof *chunks);
        memcpy(chunks[count].hash, h, 65);
        chunks[count].size = s;
        count++;
    }
    int bad = ferror(f);
    fclose(f);
    return chunks && !bad ? 0 : -1;
}

static void report_failure(void) {
    size_t n = strlen(fail_reason);
    if (cfg.failfile) {
        int fd = open(cfg.failfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd >= 0) {
            fail_reason[n] = '\n';
            ssize_t w = write(fd, fail_reason, n + 1);
            fail_reason[n] = 0;
            close(fd);
            if (w == (ssize_t)n + 1)
                return;
        }
    }
    fprintf(stderr, "%s\n", fail_reason);
}

static int post_once(const char *what) {
    if (strcmp(what, "events") && strcmp(what, "heartbeat")) {
        fprintf(stderr, "bootd-fetch: -p takes events or heartbeat, not %s\n", what);
        return 2;
    }
    if (!cfg.node || !cfg.token) {
        fprintf(stderr, "bootd-fetch: -p needs -n NODE and BOOTD_TOKEN (a name without / ? # %% or spaces)\n");
        return 2;
    }
    char body[2048], err[256];
    size_t n = fread(body, 1, sizeof body - 1, stdin);
    if (!feof(stdin) || ferror(stdin)) {
        fprintf(stderr, "bootd-fetch: the JSON body on stdin is over %zu bytes or unreadable\n", sizeof body - 1);
        return 2;
    }
    body[n] = 0;
    if (strlen(body) != n) {
        fprintf(stderr, "bootd-fetch: the JSON body contains a NUL byte\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int status = post_json(what, body, err, sizeof err);
    if (status >= 200 && status < 300)
        return 0;
    fprintf(stderr, "bootd-fetch: POST %s: %s\n", what, err);
    return 1;
}

#define MAX_OVERLAY (64u * 1024 * 1024) /* a rendered overlay tar: hosts of 5,000 nodes is 200 KB */

/* The status line and the first line of an error reply's text (bootd says why in it), for the console. */
static void error_text(struct conn *c, const struct reply *r, char *err, size_t errlen) {
    char text[300] = "";
    if (!r->bad && r->length > 0) {
        unsigned char body[256];
        size_t want = r->length < (long long)sizeof body ? (size_t)r->length : sizeof body, got = 0;
        char ignored[64];
        (void)read_body(c, body, want, &got, ignored, sizeof ignored); /* what came is enough */
        size_t line = 0;
        while (line < got && body[line] != '\n' && body[line] != '\r')
            line++;
        printable(text, sizeof text, (const char *)body, line);
    }
    snprintf(err, errlen, "%s%s%s", r->status_line, text[0] ? ": " : "", text);
}

/* -g: one conditional GET of the node's overlay tar. Exit 0 (written, ETag on stdout), 4 (304), 5 (refused),
 * 1 (no usable reply: worth another try later). */
static int get_overlay(const char *kind, const char *out, const char *etag) {
    if (strcmp(kind, "system") && strcmp(kind, "runtime")) {
        fprintf(stderr, "bootd-fetch: -g takes system or runtime, not %s\n", kind);
        return 2;
    }
    if (!cfg.node || !cfg.token || !out) {
        fprintf(stderr, "bootd-fetch: -g needs -o FILE, -n NODE and BOOTD_TOKEN (a name without / ? # %% or spaces)\n");
        return 2;
    }
    if (etag && (strlen(etag) > 78 || strpbrk(etag, "\r\n"))) {
        fprintf(stderr, "bootd-fetch: -e takes an ETag as bootd sent it (one line, at most 78 bytes)\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    char req[1024], err[512] = "";
    int n = snprintf(req, sizeof req,
                     "GET %s/api/v1/nodes/%s/overlay/%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: bootd-fetch\r\n"
                     "X-Bootd-Token: %s\r\n%s%s%sConnection: close\r\n\r\n",
                     cfg.prefix, cfg.node, kind, cfg.hostport, cfg.token, etag && *etag ? "If-None-Match: " : "",
                     etag && *etag ? etag : "", etag && *etag ? "\r\n" : "");
    if (n <= 0 || n >= (int)sizeof req) {
        fprintf(stderr, "bootd-fetch: GET overlay/%s: request too long\n", kind);
        return 2;
    }
    struct conn *c = malloc(sizeof *c);
    if (!c) {
        fprintf(stderr, "bootd-fetch: out of memory\n");
        return 1;
    }
    c->fd = -1;
    c->deadline = now_ms() + (long long)cfg.timeout * 1000;
    struct reply r;
    int any, rc = 1;
    unsigned char *body = NULL;
    if (conn_open(c, err, sizeof err) < 0 || send_all(c, req, (size_t)n, err, sizeof err) < 0 ||
        read_head(c, &r, &any, err, sizeof err) < 0) {
        rc = 1;
    } else if (r.status == 304) {
        rc = 4;
    } else if (r.status == 200) {
        size_t got = 0;
        if (r.bad || r.length < 0 || r.length > (long long)MAX_OVERLAY) {
            snprintf(err, sizeof err, "%s: %s", r.status_line,
                     r.bad ? r.bad : r.length < 0 ? "no Content-Length" : "larger than 64 MiB");
        } else if (!(body = malloc(r.length ? (size_t)r.length : 1))) {
            snprintf(err, sizeof err, "out of memory for %lld bytes", r.length);
        } else if (read_body(c, body, (size_t)r.length, &got, err, sizeof err) == 0) {
            int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
            size_t off = 0;
            while (fd >= 0 && off < got) {
                ssize_t w = write(fd, body + off, got - off);
                if (w < 0 && errno == EINTR)
                    continue;
                if (w <= 0)
                    break;
                off += (size_t)w;
            }
            if (fd < 0 || off < got || close(fd) < 0)
                snprintf(err, sizeof err, "cannot write %s: %s", out, strerror(errno));
            else {
                printf("%s\n", r.etag);
                rc = 0;
            }
        }
    } else {
        error_text(c, &r, err, sizeof err);
        rc = r.status == 403 || r.status == 404 || r.status == 410 || r.status == 500 ? 5 : 1;
    }
    free(body);
    conn_close(c);
    free(c);
    if (rc == 1 || rc == 5)
        fprintf(stderr, "bootd-fetch: GET overlay/%s: %s\n", kind, err[0] ? err : "failed");
    return rc;
}

static int usage(void) {
    fprintf(stderr, "usage: bootd-fetch -u http://A.B.C.D[:PORT] [-w N] [-W N] [-r N] [-t S] [-n NODE] "
                    "[-f FAILFILE] TABLE\n       bootd-fetch -c -u URL\n"
                    "       bootd-fetch -p events|heartbeat -u URL -n NODE [-t S] < JSON\n"
                    "       bootd-fetch -g system|runtime -o FILE -u URL -n NODE [-e ETAG] [-t S]\n");
    return 2;
}

static int positive(const char *s, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*end || v <= 0 || v > 100000)
        return -1;
    *out = (int)v;
    return 0;
}

int main(int argc, char **argv) {
    const char *url = NULL, *post = NULL, *get = NULL, *out = NULL, *etag = NULL;
    int check = 0, opt;
    while ((opt = getopt(argc, argv, "cp:g:o:e:u:w:W:r:t:n:f:")) != -1) {
        switch (opt) {
        case 'c': check = 1; break;
        case 'p': post = optarg; break;
        case 'g': get = optarg; break;
        case 'o': out = optarg; break;
        case 'e': etag = optarg; break;
        case 'u': url = optarg; break;
        case 'w': if (positive(optarg, &cfg.workers)) return usage(); break;
        case 'W': if (positive(optarg, &cfg.window)) return usage(); break;
        case 'r': if (positive(optarg, &cfg.retries)) return usage(); break;
        case 't': if (positive(optarg, &cfg.timeout)) return usage(); break;
        case 'n': cfg.node = optarg; break;
        case 'f': cfg.failfile = optarg; break;
        default: return usage();
        }
    }
    if (!url)
        return usage();
    if (parse_url(url) < 0) {
        if (!check)
            fprintf(stderr, "bootd-fetch: cannot use %s (only http://IPv4[:port])\n", url);
        return 2;
    }
    if (check)
        return 0;
    cfg.token = getenv("BOOTD_TOKEN");
    if (cfg.node && (!*cfg.node || strpbrk(cfg.node, "/ \r\n?#%")))
        cfg.node = NULL;
    if (cfg.token && (!*cfg.token || strpbrk(cfg.token, "\r\n")))
        cfg.token = NULL;
    if (post)
        return post_once(post);
    if (get)
        return get_overlay(get, out, etag);
    if (optind != argc - 1)
        return usage();
    int lt = load_table(argv[optind]);
    if (lt < 0) {
        snprintf(fail_reason, sizeof fail_reason, "bootd-fetch: chunk table %s is %s", argv[optind],
                 lt == -2 ? "malformed" : "unreadable");
        report_failure();
        return 1;
    }
    if (cfg.workers > count && count > 0)
        cfg.workers = count;
    signal(SIGPIPE, SIG_IGN);

    pthread_t *tids = calloc((size_t)cfg.workers, sizeof *tids), prog;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    int started = 0;
    for (int w = 0; tids && w < cfg.workers && count; w++) {
        if (pthread_create(&tids[w], &attr, worker, (void *)(uintptr_t)(w + 1)) == 0)
            started++;
    }
    if (count && !started) {
        snprintf(fail_reason, sizeof fail_reason, "bootd-fetch: cannot start worker threads");
        report_failure();
        return 1;
    }
    if (pthread_create(&prog, &attr, progress, NULL) != 0)
        say("note: no progress reports (cannot start a thread)");

    int rc = 0;
    for (int i = 0; i < count; i++) {
        pthread_mutex_lock(&mu);
        while (!chunks[i].ready && !aborted)
            pthread_cond_wait(&cv_ready, &mu);
        if (!chunks[i].ready) {
            pthread_mutex_unlock(&mu);
            rc = 1;
            break;
        }
        unsigned char *p = chunks[i].data;
        chunks[i].data = NULL;
        pthread_mutex_unlock(&mu);
        size_t n = chunks[i].size, off = 0;
        while (off < n) {
            ssize_t w = write(1, p + off, n - off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0) {
                rc = 3;
                break;
            }
            off += (size_t)w;
        }
        free(p);
        pthread_mutex_lock(&mu);
        if (rc) {
            aborted = 1; /* no reason of ours: zstd or tar stopped, and the agent reports theirs */
            pthread_cond_broadcast(&cv_claim);
            pthread_cond_broadcast(&cv_ready);
            pthread_mutex_unlock(&mu);
            break;
        }
        written = i + 1;
        pthread_cond_broadcast(&cv_claim);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_lock(&mu);
    finished = 1;
    pthread_cond_broadcast(&cv_prog);
    pthread_mutex_unlock(&mu);
    if (rc == 1 || (rc == 0 && is_aborted())) {
        report_failure();
        _exit(1); /* workers may sit in a backoff sleep: do not wait for them */
    }
    if (rc)
        _exit(rc);
    for (int w = 0; w < started; w++)
        pthread_join(tids[w], NULL);
    pthread_mutex_lock(&mu);
    say("fetching %d/%d", count, count);
    pthread_mutex_unlock(&mu);
    _exit(0); /* the progress thread may be inside an event POST: do not wait for it */
}
