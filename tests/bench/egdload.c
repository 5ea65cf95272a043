/*
 * egdload: a compiled EGD load client for the "hostile" benchmark.
 *
 * Built at bench time by tests/bench/bench_hostile.py (cc -O2). Loopback only.
 * Every mode stops by itself after -s seconds (and a per-connection byte cap),
 * then prints one JSON line with what it did and its own CPU time (getrusage),
 * so the report can show the client was not the bottleneck.
 *
 *   egdload victim    -p PORT [-c CONNS] [-n SIZE] [-s SEC] [-t TIMEOUT_MS]
 *       Each connection sends `02 SIZE`, reads the whole reply, repeats
 *       (depth 1). A request unanswered after TIMEOUT_MS is counted as a
 *       timeout with that age as its latency, and the connection is replaced
 *       (what ekeyd-egd-linux does after its read timeout): a frozen server
 *       yields a figure, not a hang. Reports completed requests, bytes and
 *       latency percentiles in microseconds.
 *   egdload flood     -p PORT [-c CONNS] [-x CMDS] [-s SEC] [-m MAXBYTES]
 *       Each connection pipelines cheap requests as fast as the socket takes
 *       them and reads and discards every reply. CMDS is a comma list of
 *       `00`, `0200`, `0100` given to the connections in turn.
 *   egdload nonreader -p PORT [-c CONNS] [-s SEC] [-m MAXBYTES]
 *       Each connection sends `02 FF` requests (up to MAXBYTES of them) and
 *       never reads a reply.
 *
 * Common: -h HOST (default 127.0.0.1), -b SRCADDR (bind before connecting, so
 * neighbours are a different client), -r (print "ready" once every connection
 * is open and has been sent its first request). SIGTERM or SIGINT ends the
 * run early and still prints the results.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 1024
#define FLOOD_CHUNK 65536
#define DISCARD 262144
#define MAX_SAMPLES (64u << 20)

enum mode { VICTIM, FLOOD, NONREADER };

struct conn {
	int fd;
	int open;
	/* victim */
	int busy;
	uint64_t sent_at;
	size_t got;
	/* flood / nonreader */
	const unsigned char *cmd;
	size_t cmd_len;
	size_t reply_len;
	uint64_t sent;
	int writing;
};

static const char *host = "127.0.0.1";
static const char *source;
static int port;
static int nconns = 1;
static double seconds = 3.0;
static int size = 32;
static int timeout_ms = 1000;
static uint64_t max_bytes = (uint64_t)1 << 30;
static const char *cmds = "00";
static int say_ready;

static struct conn conns[MAX_CONNS];
static int ep;
static volatile sig_atomic_t stopping;

static void on_stop(int sig)
{
	(void)sig;
	stopping = 1;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "egdload: %s: %s\n", what, strerror(errno));
	exit(2);
}

static int open_conn(void)
{
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct timeval tv = { .tv_sec = 2 };
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket");
	if (inet_pton(AF_INET, host, &to.sin_addr) != 1) {
		fprintf(stderr, "egdload: bad host %s\n", host);
		exit(2);
	}
	if (source) {
		struct sockaddr_in from = { .sin_family = AF_INET };
		if (inet_pton(AF_INET, source, &from.sin_addr) != 1) {
			fprintf(stderr, "egdload: bad source %s\n", source);
			exit(2);
		}
		if (bind(fd, (struct sockaddr *)&from, sizeof from) < 0)
			die("bind");
	}
	/* SO_SNDTIMEO bounds a blocking connect(). */
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0)
		die("connect");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	return fd;
}

static void watch(int i, uint32_t events, int op)
{
	struct epoll_event ev = { .events = events, .data.u32 = (uint32_t)i };
	if (epoll_ctl(ep, op, conns[i].fd, &ev) < 0)
		die("epoll_ctl");
}

static void drop(int i)
{
	if (conns[i].open) {
		close(conns[i].fd);
		conns[i].open = 0;
	}
}

static double cpu_seconds(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
	       (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void ready(void)
{
	if (say_ready) {
		printf("ready\n");
		fflush(stdout);
	}
}

/* ---- victim ---------------------------------------------------------- */

static uint32_t *samples;
static size_t nsamples, cap_samples;

static void sample(uint64_t ns)
{
	uint64_t us = ns / 1000;
	if (nsamples == cap_samples) {
		if (cap_samples >= MAX_SAMPLES)
			return;
		cap_samples = cap_samples ? cap_samples * 2 : 65536;
		samples = realloc(samples, cap_samples * sizeof *samples);
		if (!samples)
			die("realloc");
	}
	samples[nsamples++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

static uint32_t pct(double p)
{
	size_t i;
	if (!nsamples)
		return 0;
	i = (size_t)(p * (double)(nsamples - 1) + 0.5);
	return samples[i];
}

static void victim_send(int i)
{
	unsigned char req[2] = { 0x02, (unsigned char)size };
	if (write(conns[i].fd, req, 2) != 2)
		die("write");
	conns[i].busy = 1;
	conns[i].got = 0;
	conns[i].sent_at = now_ns();
}

static void victim_open(int i)
{
	conns[i].fd = open_conn();
	conns[i].open = 1;
	watch(i, EPOLLIN, EPOLL_CTL_ADD);
}

static int run_victim(void)
{
	static unsigned char buf[256];
	uint64_t start, deadline, timeout = (uint64_t)timeout_ms * 1000000u;
	uint64_t requests = 0, bytes = 0, timeouts = 0, errors = 0, late = 0;
	double wall;
	struct epoll_event evs[MAX_CONNS];
	int i, n, k, active;

	for (i = 0; i < nconns; i++)
		victim_open(i);
	start = now_ns();
	deadline = start + (uint64_t)(seconds * 1e9);
	for (i = 0; i < nconns; i++)
		victim_send(i);
	ready();
	for (;;) {
		uint64_t t = now_ns(), wake;
		if (stopping && deadline > t)
			deadline = t;
		wake = deadline > t ? deadline : t + timeout;
		active = 0;
		for (i = 0; i < nconns; i++) {
			if (!conns[i].busy)
				continue;
			if (t - conns[i].sent_at >= timeout) {
				/* Frozen server: count it, replace the connection. */
				sample(t - conns[i].sent_at);
				timeouts++;
				epoll_ctl(ep, EPOLL_CTL_DEL, conns[i].fd, NULL);
				drop(i);
				conns[i].busy = 0;
				if (t < deadline) {
					victim_open(i);
					victim_send(i);
				}
			}
			if (conns[i].busy) {
				active++;
				if (conns[i].sent_at + timeout < wake)
					wake = conns[i].sent_at + timeout;
			}
		}
		if (t >= deadline && !active)
			break;
		n = epoll_wait(ep, evs, MAX_CONNS,
			       (int)((wake > t ? wake - t : 0) / 1000000u) + 1);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (k = 0; k < n; k++) {
			struct conn *c;
			ssize_t r;
			i = (int)evs[k].data.u32;
			c = &conns[i];
			if (!c->busy)
				continue;
			r = read(c->fd, buf, (size_t)size - c->got);
			if (r <= 0) {
				if (r < 0 && (errno == EAGAIN || errno == EINTR))
					continue;
				errors++;
				epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
				drop(i);
				c->busy = 0;
				if (now_ns() < deadline) {
					victim_open(i);
					victim_send(i);
				}
				continue;
			}
			c->got += (size_t)r;
			if (c->got < (size_t)size)
				continue;
			t = now_ns();
			sample(t - c->sent_at);
			c->busy = 0;
			if (c->sent_at < deadline) {
				if (t <= deadline) {
					requests++;
					bytes += (uint64_t)size;
				} else {
					late++;
				}
			}
			if (t < deadline)
				victim_send(i);
		}
	}
	wall = (double)(now_ns() - start) / 1e9;
	qsort(samples, nsamples, sizeof *samples, cmp_u32);
	printf("{\"mode\":\"victim\",\"conns\":%d,\"size\":%d,\"seconds\":%.6f,"
	       "\"wall\":%.6f,\"requests\":%llu,\"bytes\":%llu,\"late\":%llu,"
	       "\"timeouts\":%llu,\"errors\":%llu,\"timeout_ms\":%d,"
	       "\"samples\":%zu,\"p50_us\":%u,\"p99_us\":%u,\"max_us\":%u,"
	       "\"cpu_s\":%.6f}\n",
	       nconns, size, seconds, wall, (unsigned long long)requests,
	       (unsigned long long)bytes, (unsigned long long)late,
	       (unsigned long long)timeouts, (unsigned long long)errors,
	       timeout_ms, nsamples, pct(0.50), pct(0.99),
	       nsamples ? samples[nsamples - 1] : 0, cpu_seconds());
	return 0;
}

/* ---- flood / nonreader ---------------------------------------------- */

static const unsigned char CMD_LEVEL[] = { 0x00 };
static const unsigned char CMD_READ0[] = { 0x02, 0x00 };
static const unsigned char CMD_NB0[] = { 0x01, 0x00 };
static const unsigned char CMD_READ255[] = { 0x02, 0xff };

static void pick_cmd(struct conn *c, const char *name, size_t len)
{
	if (len == 2 && !memcmp(name, "00", 2)) {
		c->cmd = CMD_LEVEL, c->cmd_len = 1, c->reply_len = 4;
	} else if (len == 4 && !memcmp(name, "0200", 4)) {
		c->cmd = CMD_READ0, c->cmd_len = 2, c->reply_len = 0;
	} else if (len == 4 && !memcmp(name, "0100", 4)) {
		c->cmd = CMD_NB0, c->cmd_len = 2, c->reply_len = 1;
	} else {
		fprintf(stderr, "egdload: unknown flood command %.*s\n", (int)len,
			name);
		exit(2);
	}
}

static int run_pump(enum mode mode)
{
	/* Room for a chunk starting at any phase of a command. */
	static unsigned char out[4][FLOOD_CHUNK + 2];
	static unsigned char sink[DISCARD];
	uint64_t start, deadline, sent = 0, received = 0, closed = 0;
	struct epoll_event evs[MAX_CONNS];
	const char *p = cmds;
	int i, n, k;

	for (i = 0; i < nconns; i++) {
		struct conn *c = &conns[i];
		if (mode == NONREADER) {
			c->cmd = CMD_READ255, c->cmd_len = 2, c->reply_len = 255;
		} else {
			const char *end = strchr(p, ',');
			size_t len = end ? (size_t)(end - p) : strlen(p);
			pick_cmd(c, p, len);
			p = end ? end + 1 : cmds;
		}
		c->fd = open_conn();
		c->open = 1;
		c->writing = 1;
		watch(i, mode == NONREADER ? EPOLLOUT : EPOLLIN | EPOLLOUT,
		      EPOLL_CTL_ADD);
	}
	for (k = 0; k < 4; k++) {
		const unsigned char *cmd[] = { CMD_LEVEL, CMD_READ0, CMD_NB0,
					       CMD_READ255 };
		size_t len = k == 0 ? 1 : 2;
		size_t j;
		for (j = 0; j < sizeof out[k]; j++)
			out[k][j] = cmd[k][j % len];
	}
	start = now_ns();
	deadline = start + (uint64_t)(seconds * 1e9);
	ready();
	for (;;) {
		uint64_t t = now_ns();
		if (t >= deadline || stopping)
			break;
		n = epoll_wait(ep, evs, MAX_CONNS,
			       (int)((deadline - t) / 1000000u) + 1);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (k = 0; k < n; k++) {
			struct conn *c;
			i = (int)evs[k].data.u32;
			c = &conns[i];
			if (!c->open)
				continue;
			if (evs[k].events & EPOLLIN) {
				ssize_t r = read(c->fd, sink, sizeof sink);
				if (r > 0) {
					received += (uint64_t)r;
				} else if (r == 0 || (errno != EAGAIN &&
						      errno != EINTR)) {
					closed++;
					drop(i);
					continue;
				}
			}
			if ((evs[k].events & (EPOLLHUP | EPOLLERR)) &&
			    !(evs[k].events & EPOLLIN)) {
				closed++;
				drop(i);
				continue;
			}
			if (c->writing && (evs[k].events & EPOLLOUT)) {
				int which = c->cmd == CMD_LEVEL	  ? 0
					    : c->cmd == CMD_READ0 ? 1
					    : c->cmd == CMD_NB0	  ? 2
								  : 3;
				size_t phase = (size_t)(c->sent % c->cmd_len);
				size_t want = FLOOD_CHUNK;
				ssize_t w;
				if (max_bytes - c->sent < want)
					want = (size_t)(max_bytes - c->sent);
				w = send(c->fd, out[which] + phase, want,
					 MSG_DONTWAIT | MSG_NOSIGNAL);
				if (w > 0) {
					c->sent += (uint64_t)w;
					sent += (uint64_t)w;
				} else if (w < 0 && errno != EAGAIN &&
					   errno != EINTR) {
					closed++;
					drop(i);
					continue;
				}
				if (c->sent >= max_bytes) {
					c->writing = 0;
					if (mode == NONREADER) {
						epoll_ctl(ep, EPOLL_CTL_DEL,
							  c->fd, NULL);
					} else {
						watch(i, EPOLLIN,
						      EPOLL_CTL_MOD);
					}
				}
			}
		}
	}
	{
		uint64_t requests = 0, replies = 0;
		for (i = 0; i < nconns; i++) {
			requests += conns[i].sent / conns[i].cmd_len;
			drop(i);
		}
		/* Replies are only counted when every connection's are the
		 * same size; mixed floods report bytes. */
		if (mode == FLOOD && conns[0].reply_len) {
			int same = 1;
			for (i = 1; i < nconns; i++)
				same &= conns[i].reply_len == conns[0].reply_len;
			if (same)
				replies = received / conns[0].reply_len;
		}
		printf("{\"mode\":\"%s\",\"conns\":%d,\"cmds\":\"%s\","
		       "\"seconds\":%.6f,\"wall\":%.6f,\"bytes_out\":%llu,"
		       "\"requests\":%llu,\"bytes_in\":%llu,\"replies\":%llu,"
		       "\"closed\":%llu,\"cpu_s\":%.6f}\n",
		       mode == FLOOD ? "flood" : "nonreader", nconns,
		       mode == FLOOD ? cmds : "02ff", seconds,
		       (double)(now_ns() - start) / 1e9,
		       (unsigned long long)sent, (unsigned long long)requests,
		       (unsigned long long)received,
		       (unsigned long long)replies, (unsigned long long)closed,
		       cpu_seconds());
	}
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: egdload victim|flood|nonreader -p PORT [-h HOST] "
		"[-b SRCADDR] [-c CONNS] [-s SECONDS] [-n SIZE] "
		"[-t TIMEOUT_MS] [-x CMDS] [-m MAXBYTES] [-r]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	enum mode mode;
	int opt;

	if (argc < 2)
		usage();
	if (!strcmp(argv[1], "victim"))
		mode = VICTIM;
	else if (!strcmp(argv[1], "flood"))
		mode = FLOOD;
	else if (!strcmp(argv[1], "nonreader"))
		mode = NONREADER;
	else
		usage();
	optind = 2;
	while ((opt = getopt(argc, argv, "p:h:b:c:s:n:t:x:m:r")) != -1) {
		switch (opt) {
		case 'p': port = atoi(optarg); break;
		case 'h': host = optarg; break;
		case 'b': source = optarg; break;
		case 'c': nconns = atoi(optarg); break;
		case 's': seconds = atof(optarg); break;
		case 'n': size = atoi(optarg); break;
		case 't': timeout_ms = atoi(optarg); break;
		case 'x': cmds = optarg; break;
		case 'm': max_bytes = strtoull(optarg, NULL, 10); break;
		case 'r': say_ready = 1; break;
		default: usage();
		}
	}
	if (port <= 0 || port > 65535 || nconns < 1 || nconns > MAX_CONNS ||
	    size < 1 || size > 255 || timeout_ms < 1 || seconds <= 0 ||
	    seconds > 3600 || max_bytes < 2)
		usage();
	{
		struct sigaction sa = { .sa_handler = on_stop };
		sigaction(SIGTERM, &sa, NULL);
		sigaction(SIGINT, &sa, NULL);
	}
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1");
	return mode == VICTIM ? run_victim() : run_pump(mode);
}
