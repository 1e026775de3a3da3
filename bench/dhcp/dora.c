/* dora: a light DHCP load client for bench/dhcp/run.py (--client light).
 *
 * Why it exists: at 8,000 exchanges/s Kea's perfdhcp needs more than one of this machine's two cores, so
 * every server that can go faster stops at perfdhcp's ceiling (issue 20 asks, when both servers reach it,
 * to drive them with a lighter client as well). This one does only what the capacity measure needs:
 * `rate` new DORA exchanges a second, each from its own client (MAC), as a relay (giaddr = our address,
 * replies come back unicast to port 67), a REQUEST for the offered address as soon as the OFFER arrives,
 * no retransmission. An exchange not completed within `drop_ms` of its last request counts as a drop,
 * as perfdhcp's -d does. It sends on a 1 ms tick (the due DISCOVERs in one go) and reads replies with
 * recvmmsg, so its cost per exchange is a few system calls, not a packet object per message.
 *
 * Usage: dora SERVER_IP LOCAL_IP RATE EXCHANGES PERIOD_S DROP_MS
 * Prints one line: sent=N completed=N drops=N do_ms=F ra_ms=F seconds=F
 * (do_ms: average DISCOVER->OFFER delay, ra_ms: REQUEST->ACK, as perfdhcp reports them.)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PKT 300
#define BATCH 64
#define XID_BASE 0x5a000000u

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static size_t packet(uint8_t *p, uint8_t type, uint32_t index, uint32_t giaddr, uint32_t want, uint32_t server) {
    memset(p, 0, PKT);
    p[0] = 1; p[1] = 1; p[2] = 6; p[3] = 1;           /* BOOTREQUEST, ethernet, hlen 6, one relay hop */
    uint32_t xid = htonl(XID_BASE + index);
    memcpy(p + 4, &xid, 4);
    memcpy(p + 24, &giaddr, 4);                       /* giaddr: network order already */
    p[28] = 0x02; p[29] = 0x00;                       /* chaddr: a locally administered MAC per client */
    uint32_t mac = htonl(index);
    memcpy(p + 30, &mac, 4);
    static const uint8_t cookie[4] = {99, 130, 83, 99};
    memcpy(p + 236, cookie, 4);
    size_t o = 240;
    p[o++] = 53; p[o++] = 1; p[o++] = type;           /* message type first, as every client we captured */
    if (type == 3) {
        p[o++] = 50; p[o++] = 4; memcpy(p + o, &want, 4); o += 4;
        p[o++] = 54; p[o++] = 4; memcpy(p + o, &server, 4); o += 4;
    }
    static const uint8_t prl[] = {55, 7, 1, 28, 2, 3, 15, 6, 12};
    memcpy(p + o, prl, sizeof prl); o += sizeof prl;
    p[o++] = 255;
    return PKT;
}

static int option(const uint8_t *p, size_t n, uint8_t code, const uint8_t **val) {
    size_t o = 240;
    while (o < n) {
        uint8_t c = p[o];
        if (c == 0) { o++; continue; }
        if (c == 255 || o + 1 >= n) break;
        uint8_t len = p[o + 1];
        if (o + 2 + len > n) break;
        if (c == code) { *val = p + o + 2; return len; }
        o += 2 + len;
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s SERVER_IP LOCAL_IP RATE EXCHANGES PERIOD_S DROP_MS\n", argv[0]);
        return 2;
    }
    struct in_addr server_ip, local_ip;
    if (!inet_aton(argv[1], &server_ip) || !inet_aton(argv[2], &local_ip)) {
        fprintf(stderr, "dora: bad address\n");
        return 2;
    }
    double rate = atof(argv[3]);
    long total = atol(argv[4]);
    double period = atof(argv[5]), drop = atof(argv[6]) / 1000.0;
    if (rate <= 0 || total <= 0 || total > 16000000 || period <= 0 || drop <= 0) {
        fprintf(stderr, "dora: RATE, EXCHANGES (at most 16M), PERIOD_S and DROP_MS must be positive\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        perror("dora: socket");
        return 2;
    }
    int big = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(67), .sin_addr = local_ip};
    if (bind(fd, (struct sockaddr *)&me, sizeof me) < 0) {
        perror("dora: bind to port 67 (the relay port)");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(67), .sin_addr = server_ip};
    double *t_disc = calloc((size_t)total, sizeof(double)), *t_req = calloc((size_t)total, sizeof(double));
    uint8_t *state = calloc((size_t)total, 1);        /* 0 unsent, 1 waits for OFFER, 2 for ACK, 3 done */
    if (!t_disc || !t_req || !state) { fprintf(stderr, "dora: out of memory\n"); return 2; }
    uint8_t out[PKT];
    static uint8_t in[BATCH][1500];
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    long sent = 0, completed = 0, offers = 0;
    double sum_do = 0, sum_ra = 0, start = now_s(), last_send = start;
    for (;;) {
        double t = now_s();
        long due = (long)((t - start) * rate) + 1;
        if (due > total) due = total;
        if (t - start > period) due = sent;           /* the period is over: send no more */
        while (sent < due) {
            packet(out, 1, (uint32_t)sent, local_ip.s_addr, 0, 0);
            if (sendto(fd, out, PKT, 0, (struct sockaddr *)&to, sizeof to) < 0 && errno != EAGAIN) {
                perror("dora: sendto");
                return 1;
            }
            t_disc[sent] = t; state[sent] = 1; sent++; last_send = t;
        }
        for (;;) {
            for (int i = 0; i < BATCH; i++) {
                iov[i].iov_base = in[i]; iov[i].iov_len = sizeof in[i];
                memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
                msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
            }
            int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
            if (n <= 0) break;
            double r = now_s();
            for (int i = 0; i < n; i++) {
                const uint8_t *p = in[i], *v = NULL;
                size_t len = msgs[i].msg_len;
                if (len < 244 || p[0] != 2) continue;
                uint32_t xid;
                memcpy(&xid, p + 4, 4);
                long k = (long)(ntohl(xid) - XID_BASE);
                if (k < 0 || k >= sent || option(p, len, 53, &v) != 1) continue;
                if (v[0] == 2 && state[k] == 1) {       /* OFFER: ask for that address at once */
                    const uint8_t *sid = NULL;
                    uint32_t yiaddr, server = server_ip.s_addr;
                    memcpy(&yiaddr, p + 16, 4);
                    if (option(p, len, 54, &sid) == 4) memcpy(&server, sid, 4);
                    sum_do += r - t_disc[k]; offers++;
                    packet(out, 3, (uint32_t)k, local_ip.s_addr, yiaddr, server);
                    if (sendto(fd, out, PKT, 0, (struct sockaddr *)&to, sizeof to) < 0 && errno != EAGAIN) {
                        perror("dora: sendto");
                        return 1;
                    }
                    t_req[k] = r; state[k] = 2; last_send = r;
                } else if (v[0] == 5 && state[k] == 2) {  /* ACK */
                    sum_ra += r - t_req[k]; state[k] = 3; completed++;
                }
            }
        }
        if (completed == sent && sent == total) break;
        if (sent == due && now_s() - last_send > drop) break;  /* all sent; whatever is missing is dropped */
        struct timespec tick = {0, 1000000};          /* 1 ms: the sending tick */
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        ppoll(&pfd, 1, &tick, NULL);
    }
    double seconds = now_s() - start;
    printf("sent=%ld completed=%ld drops=%ld do_ms=%.3f ra_ms=%.3f seconds=%.3f\n", sent, completed,
           sent - completed, offers ? sum_do / (double)offers * 1e3 : 0.0,
           completed ? sum_ra / (double)completed * 1e3 : 0.0, seconds);
    return 0;
}
