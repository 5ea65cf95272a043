/*
 * The modes of the "hostile" benchmark: a victim at depth 1 with a timeout,
 * and neighbours that flood cheap requests or never read their replies.
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

#define FLOOD_CHUNK 65536
#define DISCARD 262144

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

static struct conn *conns;

static void alloc_conns(void)
{
	conns = calloc((size_t)opt.conns, sizeof *conns);
	if (!conns)
		die("calloc");
}

static void drop(int i)
{
	if (conns[i].open) {
		close(conns[i].fd);
		conns[i].open = 0;
	}
}

/* ---- victim ---------------------------------------------------------- */

static void victim_send(int i)
{
	unsigned char req[2] = { 0x02, (unsigned char)opt.size };
	if (write(conns[i].fd, req, 2) != 2)
		die("write");
	conns[i].busy = 1;
	conns[i].got = 0;
	conns[i].sent_at = now_ns();
}

static void victim_open(int i)
{
	conns[i].fd = connect_blocking(i);
	conns[i].open = 1;
	watch(conns[i].fd, (uint32_t)i, EPOLLIN, EPOLL_CTL_ADD);
}

int run_victim(void)
{
	static unsigned char buf[256];
	static struct samples lat;
	uint64_t start, deadline, timeout = (uint64_t)opt.timeout_ms * 1000000u;
	uint64_t requests = 0, bytes = 0, timeouts = 0, errors = 0, late = 0;
	double wall;
	struct epoll_event evs[MAX_EVENTS];
	int i, n, k, active;

	alloc_conns();
	for (i = 0; i < opt.conns; i++)
		victim_open(i);
	start = now_ns();
	deadline = start + (uint64_t)(opt.seconds * 1e9);
	for (i = 0; i < opt.conns; i++)
		victim_send(i);
	say("ready");
	for (;;) {
		uint64_t t = now_ns(), wake;
		if (stopping && deadline > t)
			deadline = t;
		wake = deadline > t ? deadline : t + timeout;
		active = 0;
		for (i = 0; i < opt.conns; i++) {
			if (!conns[i].busy)
				continue;
			if (t - conns[i].sent_at >= timeout) {
				/* Frozen server: count it, replace the connection. */
				sample_add(&lat, t - conns[i].sent_at);
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
		n = epoll_wait(ep, evs, MAX_EVENTS,
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
			r = read(c->fd, buf, (size_t)opt.size - c->got);
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
			if (c->got < (size_t)opt.size)
				continue;
			t = now_ns();
			sample_add(&lat, t - c->sent_at);
			c->busy = 0;
			if (c->sent_at < deadline) {
				if (t <= deadline) {
					requests++;
					bytes += (uint64_t)opt.size;
				} else {
					late++;
				}
			}
			if (t < deadline)
				victim_send(i);
		}
	}
	wall = (double)(now_ns() - start) / 1e9;
	samples_sort(&lat);
	printf("{\"mode\":\"victim\",\"conns\":%d,\"size\":%d,\"seconds\":%.6f,"
	       "\"wall\":%.6f,\"requests\":%llu,\"bytes\":%llu,\"late\":%llu,"
	       "\"timeouts\":%llu,\"errors\":%llu,\"timeout_ms\":%d,"
	       "\"samples\":%zu,\"p50_us\":%u,\"p99_us\":%u,\"max_us\":%u,"
	       "\"cpu_s\":%.6f}\n",
	       opt.conns, opt.size, opt.seconds, wall,
	       (unsigned long long)requests, (unsigned long long)bytes,
	       (unsigned long long)late, (unsigned long long)timeouts,
	       (unsigned long long)errors, opt.timeout_ms, lat.n,
	       samples_pct(&lat, 0.50), samples_pct(&lat, 0.99),
	       samples_max(&lat), cpu_seconds());
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

int run_pump(int nonreader)
{
	/* Room for a chunk starting at any phase of a command. */
	static unsigned char out[4][FLOOD_CHUNK + 2];
	static unsigned char sink[DISCARD];
	uint64_t start, deadline, sent = 0, received = 0, closed = 0;
	struct epoll_event evs[MAX_EVENTS];
	const char *p = opt.cmds;
	int i, n, k;

	alloc_conns();
	for (i = 0; i < opt.conns; i++) {
		struct conn *c = &conns[i];
		if (nonreader) {
			c->cmd = CMD_READ255, c->cmd_len = 2, c->reply_len = 255;
		} else {
			const char *end = strchr(p, ',');
			size_t len = end ? (size_t)(end - p) : strlen(p);
			pick_cmd(c, p, len);
			p = end ? end + 1 : opt.cmds;
		}
		c->fd = connect_blocking(i);
		c->open = 1;
		c->writing = 1;
		watch(c->fd, (uint32_t)i, nonreader ? EPOLLOUT : EPOLLIN | EPOLLOUT,
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
	deadline = start + (uint64_t)(opt.seconds * 1e9);
	say("ready");
	for (;;) {
		uint64_t t = now_ns();
		if (t >= deadline || stopping)
			break;
		n = epoll_wait(ep, evs, MAX_EVENTS,
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
				if (opt.max_bytes - c->sent < want)
					want = (size_t)(opt.max_bytes - c->sent);
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
				if (c->sent >= opt.max_bytes) {
					c->writing = 0;
					if (nonreader)
						epoll_ctl(ep, EPOLL_CTL_DEL,
							  c->fd, NULL);
					else
						watch(c->fd, (uint32_t)i,
						      EPOLLIN, EPOLL_CTL_MOD);
				}
			}
		}
	}
	{
		uint64_t requests = 0, replies = 0;
		for (i = 0; i < opt.conns; i++) {
			requests += conns[i].sent / conns[i].cmd_len;
			drop(i);
		}
		/* Replies are only counted when every connection's are the
		 * same size; mixed floods report bytes. */
		if (!nonreader && conns[0].reply_len) {
			int same = 1;
			for (i = 1; i < opt.conns; i++)
				same &= conns[i].reply_len == conns[0].reply_len;
			if (same)
				replies = received / conns[0].reply_len;
		}
		printf("{\"mode\":\"%s\",\"conns\":%d,\"cmds\":\"%s\","
		       "\"seconds\":%.6f,\"wall\":%.6f,\"bytes_out\":%llu,"
		       "\"requests\":%llu,\"bytes_in\":%llu,\"replies\":%llu,"
		       "\"closed\":%llu,\"cpu_s\":%.6f}\n",
		       nonreader ? "nonreader" : "flood", opt.conns,
		       nonreader ? "02ff" : opt.cmds, opt.seconds,
		       (double)(now_ns() - start) / 1e9,
		       (unsigned long long)sent, (unsigned long long)requests,
		       (unsigned long long)received,
		       (unsigned long long)replies, (unsigned long long)closed,
		       cpu_seconds());
	}
	return 0;
}
