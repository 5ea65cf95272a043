/*
 * What every egdload mode shares: the clock, connecting, CPU time, samples.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "egdload.h"

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

/* Latency samples kept at most (microseconds, 4 bytes each). */
#define MAX_SAMPLES (64u << 20)

struct options opt = {
	.host = "127.0.0.1",
	.sources = 1,
	.conns = 1,
	.seconds = 3.0,
	.size = 32,
	.depth = 1,
	.timeout_ms = 1000,
	.period_ms = 1000,
	.max_bytes = (uint64_t)1 << 30,
	.cmds = "00",
};
volatile sig_atomic_t stopping;
int ep;

uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* CLOCK_MONOTONIC in seconds: Python's time.monotonic() on Linux. */
double mono_seconds(uint64_t ns)
{
	return (double)ns / 1e9;
}

void die(const char *what)
{
	fprintf(stderr, "egdload: %s: %s\n", what, strerror(errno));
	exit(2);
}

void raise_nofile(int wanted)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) < 0)
		die("getrlimit");
	if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)wanted) {
		rl.rlim_cur = rl.rlim_max == RLIM_INFINITY ||
				      rl.rlim_max >= (rlim_t)wanted
				      ? (rlim_t)wanted
				      : rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
			die("setrlimit");
	}
	if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)wanted) {
		fprintf(stderr,
			"egdload: RLIMIT_NOFILE hard limit %llu < %d needed\n",
			(unsigned long long)rl.rlim_max, wanted);
		exit(2);
	}
}

static struct sockaddr_in target(void)
{
	struct sockaddr_in to = { .sin_family = AF_INET,
				  .sin_port = htons((uint16_t)opt.port) };
	if (inet_pton(AF_INET, opt.host, &to.sin_addr) != 1) {
		fprintf(stderr, "egdload: bad host %s\n", opt.host);
		exit(2);
	}
	return to;
}

/*
 * A socket bound to source address number `index % opt.sources`. The port
 * is left to connect() (IP_BIND_ADDRESS_NO_PORT), which picks it per
 * destination, so 10,000 connections from one address do not exhaust the
 * ephemeral range the way bind() to port 0 would.
 */
static int bound_socket(int index, int flags)
{
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | flags, 0);
	if (fd < 0)
		die("socket");
	if (opt.source) {
		struct sockaddr_in from = { .sin_family = AF_INET };
		uint32_t first;
		if (inet_pton(AF_INET, opt.source, &from.sin_addr) != 1) {
			fprintf(stderr, "egdload: bad source %s\n", opt.source);
			exit(2);
		}
		first = ntohl(from.sin_addr.s_addr);
		from.sin_addr.s_addr =
			htonl(first + (uint32_t)(index % opt.sources));
		setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one,
			   sizeof one);
		if (bind(fd, (struct sockaddr *)&from, sizeof from) < 0)
			die("bind");
	}
	return fd;
}

int connect_blocking(int index)
{
	struct sockaddr_in to = target();
	struct timeval tv = { .tv_sec = 2 };
	int one = 1;
	int fd = bound_socket(index, 0);
	/* SO_SNDTIMEO bounds a blocking connect(). */
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
	if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0)
		die("connect");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	return fd;
}

/* A non-blocking socket whose connect() is under way; -1 if it failed. */
int connect_start(int index)
{
	struct sockaddr_in to = target();
	int one = 1;
	int fd = bound_socket(index, SOCK_NONBLOCK);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0 &&
	    errno != EINPROGRESS) {
		close(fd);
		return -1;
	}
	return fd;
}

int connect_error(int fd)
{
	int err = 0;
	socklen_t len = sizeof err;
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		return errno;
	return err;
}

void watch(int fd, uint32_t tag, uint32_t events, int op)
{
	struct epoll_event ev = { .events = events, .data.u32 = tag };
	if (epoll_ctl(ep, op, fd, &ev) < 0)
		die("epoll_ctl");
}

double cpu_seconds(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
	       (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

void say(const char *line)
{
	if (opt.say_ready) {
		printf("%s\n", line);
		fflush(stdout);
	}
}

void sample_add(struct samples *s, uint64_t ns)
{
	uint64_t us = ns / 1000;
	if (s->n == s->cap) {
		if (s->cap >= MAX_SAMPLES)
			return;
		s->cap = s->cap ? s->cap * 2 : 65536;
		s->v = realloc(s->v, s->cap * sizeof *s->v);
		if (!s->v)
			die("realloc");
	}
	s->v[s->n++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return (x > y) - (x < y);
}

void samples_sort(struct samples *s)
{
	if (s->n)
		qsort(s->v, s->n, sizeof *s->v, cmp_u32);
}

uint32_t samples_pct(const struct samples *s, double p)
{
	if (!s->n)
		return 0;
	return s->v[(size_t)(p * (double)(s->n - 1) + 0.5)];
}

uint32_t samples_max(const struct samples *s)
{
	return s->n ? s->v[s->n - 1] : 0;
}
