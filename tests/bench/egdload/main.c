/*
 * egdload: a compiled EGD load client for the benchmarks.
 *
 * Built at bench time by tests/bench/loadclient.py (cc -O2). Loopback only.
 * Every mode stops by itself, then prints one JSON line with what it did and
 * its own CPU time (getrusage), so a report can show the client was not the
 * bottleneck.
 *
 *   egdload load      -p PORT [-c CONNS] [-n SIZE] [-d DEPTH] [-N] [-s SEC]
 *                     [-w WARMUP] [-P] [-g GAP_US]
 *       Throughput and latency at a pipeline depth (load.c).
 *   egdload qemu      -p PORT [-c CONNS] [-n SIZE] [-i PERIOD_MS] [-s SEC]
 *       Thousands of connections, one small read each per period (qemu.c).
 *   egdload victim    -p PORT [-c CONNS] [-n SIZE] [-s SEC] [-t TIMEOUT_MS]
 *       Depth-1 reads with a timeout that replaces the connection (hostile.c).
 *   egdload flood     -p PORT [-c CONNS] [-x CMDS] [-s SEC] [-m MAXBYTES]
 *       Pipelines cheap requests (`00`, `0200`, `0100`) and discards replies.
 *   egdload nonreader -p PORT [-c CONNS] [-s SEC] [-m MAXBYTES]
 *       Sends `02 FF` requests and never reads a reply.
 *
 * Common: -h HOST (default 127.0.0.1); -b SRCADDR binds before connecting, and
 * with -u COUNT connection i binds SRCADDR + (i mod COUNT), so the server sees
 * up to COUNT clients; -r prints progress lines ("ready", "measuring",
 * "connected N") for the caller. SIGTERM or SIGINT ends a run early and still
 * prints the results. The soft RLIMIT_NOFILE is raised to cover -c.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "egdload.h"

#define MAX_CONNS 100000

enum mode { LOAD, QEMU, VICTIM, FLOOD, NONREADER };

static void on_stop(int sig)
{
	(void)sig;
	stopping = 1;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: egdload load|qemu|victim|flood|nonreader -p PORT "
		"[-h HOST] [-b SRCADDR] [-u COUNT] [-c CONNS] [-s SECONDS] "
		"[-w WARMUP] [-n SIZE] [-d DEPTH] [-N] [-i PERIOD_MS] "
		"[-t TIMEOUT_MS] [-x CMDS] [-m MAXBYTES] [-g GAP_US] [-P] "
		"[-r]\n");
	exit(2);
}

static enum mode parse_mode(const char *name)
{
	static const char *names[] = { "load", "qemu", "victim", "flood",
				       "nonreader" };
	size_t i;
	for (i = 0; i < sizeof names / sizeof *names; i++)
		if (!strcmp(name, names[i]))
			return (enum mode)i;
	usage();
	return LOAD;
}

int main(int argc, char **argv)
{
	enum mode mode;
	int c;

	if (argc < 2)
		usage();
	mode = parse_mode(argv[1]);
	if (mode == QEMU)
		opt.size = 64;
	optind = 2;
	while ((c = getopt(argc, argv, "p:h:b:u:c:s:w:n:d:Ni:t:x:m:g:Pr")) != -1) {
		switch (c) {
		case 'p': opt.port = atoi(optarg); break;
		case 'h': opt.host = optarg; break;
		case 'b': opt.source = optarg; break;
		case 'u': opt.sources = atoi(optarg); break;
		case 'c': opt.conns = atoi(optarg); break;
		case 's': opt.seconds = atof(optarg); break;
		case 'w': opt.warmup = atof(optarg); break;
		case 'n': opt.size = atoi(optarg); break;
		case 'd': opt.depth = atoi(optarg); break;
		case 'N': opt.nonblocking = 1; break;
		case 'i': opt.period_ms = atoi(optarg); break;
		case 't': opt.timeout_ms = atoi(optarg); break;
		case 'x': opt.cmds = optarg; break;
		case 'm': opt.max_bytes = strtoull(optarg, NULL, 10); break;
		case 'g': opt.gap_us = atoi(optarg); break;
		case 'P': opt.per_conn = 1; break;
		case 'r': opt.say_ready = 1; break;
		default: usage();
		}
	}
	if (opt.port <= 0 || opt.port > 65535 || opt.conns < 1 ||
	    opt.conns > MAX_CONNS || opt.sources < 1 || opt.size < 1 ||
	    opt.size > 255 || opt.depth < 1 || opt.depth > 4096 ||
	    opt.timeout_ms < 1 || opt.period_ms < 1 || opt.seconds <= 0 ||
	    opt.seconds > 3600 || opt.warmup < 0 || opt.warmup > 3600 ||
	    opt.gap_us < 0 || opt.max_bytes < 2)
		usage();
	raise_nofile(opt.conns + 64);
	{
		struct sigaction sa = { .sa_handler = on_stop };
		sigaction(SIGTERM, &sa, NULL);
		sigaction(SIGINT, &sa, NULL);
	}
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1");
	switch (mode) {
	case LOAD: return run_load();
	case QEMU: return run_qemu();
	case VICTIM: return run_victim();
	case FLOOD: return run_pump(0);
	case NONREADER: return run_pump(1);
	}
	return 2;
}
