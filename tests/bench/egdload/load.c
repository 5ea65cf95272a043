/*
 * load: throughput and latency at a fixed pipeline depth.
 *
 * Each of -c connections writes -d requests (`02 N`, or `01 N` with -N) in one
 * write, reads every reply, and writes the next batch once the batch's last
 * reply is complete. A request's latency runs from its batch's write to the
 * last byte of its reply. Counting starts after -w seconds of warm-up (with
 * -r, "measuring" is printed then) and lasts -s seconds; replies still owed at
 * the end are reported as unfinished, not waited for, so a frozen server gives
 * a figure rather than a hang. A connection the server closes is counted as an
 * error and reopened.
 *
 * -P adds each connection's byte count in the window ("per_conn"); -g US adds
 * every silence of at least US microseconds between two reads that delivered
 * bytes, on any connection ("gaps": [end, length] in CLOCK_MONOTONIC seconds).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "egdload.h"

#define MAX_GAPS 100000

struct lconn {
	int fd;
	int open;
	int pending;	  /* replies of the current batch still owed */
	int need;	  /* bytes of the current reply owed; -1: its count byte */
	uint64_t sent_at; /* when the current batch was written */
	uint64_t bytes;	  /* entropy bytes received in the window */
};

static struct lconn *conns;
static unsigned char *batch;
static size_t batch_len;
static uint64_t window_start, deadline;
static struct samples lat;
static uint64_t requests, bytes, errors;
static uint64_t last_rx;
static double (*gaps)[2];
static size_t ngaps;

static int reply_start(void)
{
	return opt.nonblocking ? -1 : opt.size;
}

static void drop(struct lconn *c)
{
	if (c->open) {
		close(c->fd);
		c->open = 0;
	}
	c->pending = 0;
}

static void send_batch(struct lconn *c)
{
	ssize_t w = send(c->fd, batch, batch_len, MSG_NOSIGNAL | MSG_DONTWAIT);
	if (w != (ssize_t)batch_len) {
		/* The previous batch was answered in full, so the send queue
		 * is empty: a short write means the connection is gone. */
		errors++;
		drop(c);
		return;
	}
	c->pending = opt.depth;
	c->need = reply_start();
	c->sent_at = now_ns();
}

static void open_conn(int i)
{
	struct lconn *c = &conns[i];
	c->fd = connect_blocking(i);
	c->open = 1;
	watch(c->fd, (uint32_t)i, EPOLLIN, EPOLL_CTL_ADD);
}

static void reply_done(struct lconn *c, uint64_t t)
{
	if (t >= window_start && t <= deadline) {
		requests++;
		if (c->sent_at >= window_start)
			sample_add(&lat, t - c->sent_at);
	}
	c->pending--;
	c->need = reply_start();
}

/* Parse replies; -1 when the server sent bytes nobody asked for. */
static int consume(struct lconn *c, const unsigned char *p, size_t r,
		   uint64_t t)
{
	int counted = t >= window_start && t <= deadline;
	while (r) {
		size_t take;
		if (!c->pending)
			return -1;
		if (c->need < 0) {
			c->need = *p++;
			r--;
			if (!c->need)
				reply_done(c, t);
			continue;
		}
		take = r < (size_t)c->need ? r : (size_t)c->need;
		c->need -= (int)take;
		p += take;
		r -= take;
		if (counted) {
			bytes += take;
			c->bytes += take;
		}
		if (!c->need)
			reply_done(c, t);
	}
	return 0;
}

static void note_gap(uint64_t t)
{
	if (opt.gap_us && last_rx &&
	    t - last_rx >= (uint64_t)opt.gap_us * 1000u && ngaps < MAX_GAPS) {
		gaps[ngaps][0] = mono_seconds(t);
		gaps[ngaps][1] = (double)(t - last_rx) / 1e9;
		ngaps++;
	}
	last_rx = t;
}

static void report(double wall, double cpu, uint64_t connect_ns)
{
	uint64_t unfinished = 0;
	size_t i;
	for (i = 0; i < (size_t)opt.conns; i++)
		unfinished += (uint64_t)conns[i].pending;
	samples_sort(&lat);
	printf("{\"mode\":\"load\",\"conns\":%d,\"size\":%d,\"depth\":%d,"
	       "\"command\":\"%s\",\"seconds\":%.6f,\"wall\":%.6f,"
	       "\"connect_s\":%.6f,\"requests\":%llu,\"bytes\":%llu,"
	       "\"errors\":%llu,\"unfinished\":%llu,\"samples\":%zu,"
	       "\"p50_us\":%u,\"p99_us\":%u,\"max_us\":%u,\"cpu_s\":%.6f,"
	       "\"cpu_total_s\":%.6f",
	       opt.conns, opt.size, opt.depth, opt.nonblocking ? "01" : "02",
	       opt.seconds, wall, (double)connect_ns / 1e9,
	       (unsigned long long)requests, (unsigned long long)bytes,
	       (unsigned long long)errors, (unsigned long long)unfinished,
	       lat.n, samples_pct(&lat, 0.50), samples_pct(&lat, 0.99),
	       samples_max(&lat), cpu, cpu_seconds());
	if (opt.per_conn) {
		printf(",\"per_conn\":[");
		for (i = 0; i < (size_t)opt.conns; i++)
			printf("%s%llu", i ? "," : "",
			       (unsigned long long)conns[i].bytes);
		printf("]");
	}
	if (opt.gap_us) {
		printf(",\"gaps\":[");
		for (i = 0; i < ngaps; i++)
			printf("%s[%.6f,%.6f]", i ? "," : "", gaps[i][0],
			       gaps[i][1]);
		printf("]");
	}
	printf("}\n");
}

int run_load(void)
{
	static unsigned char buf[65536];
	struct epoll_event evs[MAX_EVENTS];
	uint64_t begin, start, t;
	double cpu0 = 0;
	int measuring = 0, i, k, n;

	conns = calloc((size_t)opt.conns, sizeof *conns);
	batch_len = (size_t)opt.depth * 2;
	batch = malloc(batch_len);
	gaps = calloc(MAX_GAPS, sizeof *gaps);
	if (!conns || !batch || !gaps)
		die("calloc");
	for (k = 0; k < opt.depth; k++) {
		batch[2 * k] = opt.nonblocking ? 0x01 : 0x02;
		batch[2 * k + 1] = (unsigned char)opt.size;
	}
	begin = now_ns();
	for (i = 0; i < opt.conns; i++)
		open_conn(i);
	start = now_ns();
	window_start = start + (uint64_t)(opt.warmup * 1e9);
	deadline = window_start + (uint64_t)(opt.seconds * 1e9);
	for (i = 0; i < opt.conns; i++)
		send_batch(&conns[i]);
	for (;;) {
		t = now_ns();
		if (stopping && deadline > t) {
			if (window_start > t)
				window_start = t;
			deadline = t;
		}
		if (!measuring && t >= window_start) {
			measuring = 1;
			cpu0 = cpu_seconds();
			say("measuring");
		}
		if (t >= deadline)
			break;
		n = epoll_wait(
			ep, evs, MAX_EVENTS,
			(int)(((measuring ? deadline : window_start) - t) /
			      1000000u) + 1);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (k = 0; k < n; k++) {
			struct lconn *c;
			ssize_t r;
			i = (int)evs[k].data.u32;
			c = &conns[i];
			if (!c->open)
				continue;
			r = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
			if (r < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			t = now_ns();
			if (r > 0)
				note_gap(t);
			if (r <= 0 || consume(c, buf, (size_t)r, t) < 0) {
				errors++;
				drop(c);
				if (t < deadline) {
					open_conn(i);
					send_batch(c);
				}
				continue;
			}
			if (!c->pending && t < deadline)
				send_batch(c);
		}
	}
	report((double)(now_ns() - window_start) / 1e9, cpu_seconds() - cpu0,
	       start - begin);
	return 0;
}
