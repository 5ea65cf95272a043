/*
 * qemu: many quiet guests, each asking for a little entropy every period.
 *
 * -c connections (thousands) are opened with at most CONNECTING connects under
 * way at once, spread over -u source addresses starting at -b. With -r,
 * "connected N" is printed and the run waits for a line on stdin, so the
 * caller can measure the server with every connection open and idle. Each
 * connection then sends `02 N` (-n, 64 by default) every -i milliseconds at
 * its own random phase, as a guest's virtio-rng does through QEMU's rng-egd,
 * and times the reply from the write to its last byte. A connection whose
 * previous request is still unanswered at its next tick skips that tick (an
 * overrun). After -s seconds nothing more is sent, and replies still owed are
 * awaited for up to one period. With -r the connections then stay open until
 * stdin reaches EOF, so the caller can measure the server again.
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

#define CONNECTING 256
#define CONNECT_SECONDS 120

enum qstate { Q_DEAD, Q_CONNECTING, Q_IDLE, Q_WAITING };

struct qconn {
	int fd;
	enum qstate state;
	int got;
	uint32_t done;
	uint64_t phase;
	uint64_t sent_at;
};

static struct qconn *conns;
static int *order;
static int live;
static uint64_t seed = 0x9e3779b97f4a7c15u;

static uint64_t next_random(void)
{
	/* xorshift64*: a fixed seed gives every run the same phases. */
	seed ^= seed >> 12;
	seed ^= seed << 25;
	seed ^= seed >> 27;
	return seed * 0x2545f4914f6cdd1du;
}

static int by_phase(const void *a, const void *b)
{
	uint64_t x = conns[*(const int *)a].phase;
	uint64_t y = conns[*(const int *)b].phase;
	return (x > y) - (x < y);
}

static void kill_conn(struct qconn *c)
{
	if (c->state != Q_DEAD) {
		close(c->fd);
		c->state = Q_DEAD;
	}
}

static int connect_all(uint64_t *failed)
{
	struct epoll_event evs[MAX_EVENTS];
	uint64_t limit = now_ns() + (uint64_t)CONNECT_SECONDS * 1000000000u;
	int next = 0, inflight = 0, connected = 0, i, k, n;

	while ((next < opt.conns || inflight) && now_ns() < limit && !stopping) {
		while (inflight < CONNECTING && next < opt.conns) {
			struct qconn *c = &conns[next];
			c->fd = connect_start(next);
			if (c->fd < 0) {
				(*failed)++;
			} else {
				c->state = Q_CONNECTING;
				watch(c->fd, (uint32_t)next, EPOLLOUT,
				      EPOLL_CTL_ADD);
				inflight++;
			}
			next++;
		}
		n = epoll_wait(ep, evs, MAX_EVENTS, 100);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (k = 0; k < n; k++) {
			struct qconn *c = &conns[evs[k].data.u32];
			if (c->state != Q_CONNECTING)
				continue;
			inflight--;
			if (connect_error(c->fd)) {
				kill_conn(c);
				(*failed)++;
				continue;
			}
			c->state = Q_IDLE;
			watch(c->fd, evs[k].data.u32, EPOLLIN, EPOLL_CTL_MOD);
			connected++;
		}
	}
	for (i = 0; i < opt.conns; i++) {
		if (conns[i].state == Q_CONNECTING) {
			kill_conn(&conns[i]);
			(*failed)++;
		}
	}
	*failed += (uint64_t)(opt.conns - next);
	return connected;
}

static void wait_line(void)
{
	char line[64];
	if (opt.say_ready && !fgets(line, sizeof line, stdin))
		stopping = 1;
}

int run_qemu(void)
{
	static unsigned char buf[4096];
	static struct samples lat;
	struct epoll_event evs[MAX_EVENTS];
	uint64_t period = (uint64_t)opt.period_ms * 1000000u;
	uint64_t failed = 0, requests = 0, overruns = 0, errors = 0, extra = 0;
	uint64_t begin, start, deadline, end, round = 0, t;
	uint32_t fewest = UINT32_MAX;
	double cpu0;
	char line[64];
	int connected, cursor = 0, waiting = 0, sending = 1, i, k, n;

	conns = calloc((size_t)opt.conns, sizeof *conns);
	order = calloc((size_t)opt.conns, sizeof *order);
	if (!conns || !order)
		die("calloc");
	begin = now_ns();
	connected = connect_all(&failed);
	for (i = 0; i < opt.conns; i++) {
		if (conns[i].state == Q_IDLE) {
			conns[i].phase = next_random() % period;
			order[live++] = i;
		}
	}
	qsort(order, (size_t)live, sizeof *order, by_phase);
	snprintf(line, sizeof line, "connected %d", connected);
	say(line);
	wait_line();
	cpu0 = cpu_seconds();
	start = now_ns();
	deadline = start + (uint64_t)(opt.seconds * 1e9);
	end = deadline + period;
	while (live && !stopping) {
		uint64_t due = 0, wake;
		t = now_ns();
		while (sending) {
			struct qconn *c = &conns[order[cursor]];
			due = start + round * period + c->phase;
			if (due >= deadline) {
				sending = 0;
				break;
			}
			if (due > t)
				break;
			if (c->state == Q_IDLE) {
				unsigned char req[2] = { 0x02,
							 (unsigned char)opt.size };
				if (send(c->fd, req, 2, MSG_NOSIGNAL) != 2) {
					errors++;
					kill_conn(c);
				} else {
					c->state = Q_WAITING;
					c->got = 0;
					c->sent_at = now_ns();
					waiting++;
				}
			} else if (c->state == Q_WAITING) {
				overruns++;
			}
			if (++cursor == live) {
				cursor = 0;
				round++;
			}
		}
		if (!sending && (!waiting || t >= end))
			break;
		wake = sending ? due : end;
		n = epoll_wait(ep, evs, MAX_EVENTS,
			       (int)((wake > t ? wake - t : 0) / 1000000u) + 1);
		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (k = 0; k < n; k++) {
			struct qconn *c = &conns[evs[k].data.u32];
			ssize_t r;
			if (c->state == Q_DEAD)
				continue;
			r = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
			if (r < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (r <= 0 || c->state != Q_WAITING ||
			    c->got + r > opt.size) {
				if (r > 0)
					extra++;
				if (c->state == Q_WAITING)
					waiting--;
				errors++;
				kill_conn(c);
				continue;
			}
			c->got += (int)r;
			if (c->got < opt.size)
				continue;
			t = now_ns();
			sample_add(&lat, t - c->sent_at);
			requests++;
			c->done++;
			c->state = Q_IDLE;
			waiting--;
		}
	}
	for (i = 0; i < live; i++)
		if (conns[order[i]].done < fewest)
			fewest = conns[order[i]].done;
	samples_sort(&lat);
	printf("{\"mode\":\"qemu\",\"conns\":%d,\"connected\":%d,"
	       "\"connect_failed\":%llu,\"connect_s\":%.6f,\"period_ms\":%d,"
	       "\"size\":%d,\"seconds\":%.6f,\"wall\":%.6f,\"requests\":%llu,"
	       "\"overruns\":%llu,\"errors\":%llu,\"extra\":%llu,"
	       "\"unfinished\":%d,\"fewest_per_conn\":%u,\"samples\":%zu,"
	       "\"p50_us\":%u,\"p99_us\":%u,\"p999_us\":%u,\"max_us\":%u,"
	       "\"cpu_s\":%.6f}\n",
	       opt.conns, connected, (unsigned long long)failed,
	       (double)(start - begin) / 1e9, opt.period_ms, opt.size,
	       opt.seconds, (double)(now_ns() - start) / 1e9,
	       (unsigned long long)requests, (unsigned long long)overruns,
	       (unsigned long long)errors, (unsigned long long)extra, waiting,
	       live ? fewest : 0, lat.n, samples_pct(&lat, 0.50),
	       samples_pct(&lat, 0.99), samples_pct(&lat, 0.999),
	       samples_max(&lat), cpu_seconds() - cpu0);
	fflush(stdout);
	if (opt.say_ready)
		while (fgets(line, sizeof line, stdin))
			;
	return 0;
}
