/*
 * egdload: a compiled EGD load client for the benchmarks (see main.c).
 *
 * Shared by every mode: the options, the clock, connecting from a spread of
 * loopback source addresses, CPU time and latency samples.
 */
#ifndef EGDLOAD_H
#define EGDLOAD_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_EVENTS 1024

struct options {
	const char *host;
	const char *source; /* first source address, or NULL: the kernel picks */
	int sources;	    /* consecutive source addresses connections use */
	int port;
	int conns;
	double seconds;
	double warmup;
	int size;
	int depth;
	int nonblocking; /* `01 N` instead of `02 N` */
	int timeout_ms;
	int period_ms;
	uint64_t max_bytes;
	const char *cmds;
	int say_ready;
	int per_conn;
	int gap_us;
};

extern struct options opt;
extern volatile sig_atomic_t stopping;
extern int ep;

uint64_t now_ns(void);
double mono_seconds(uint64_t ns);
void die(const char *what);
void raise_nofile(int wanted);
int connect_blocking(int index);
int connect_start(int index);
int connect_error(int fd);
void watch(int fd, uint32_t tag, uint32_t events, int op);
double cpu_seconds(void);
void say(const char *line);

struct samples {
	uint32_t *v;
	size_t n;
	size_t cap;
};

void sample_add(struct samples *s, uint64_t ns);
void samples_sort(struct samples *s);
uint32_t samples_pct(const struct samples *s, double p);
uint32_t samples_max(const struct samples *s);

int run_victim(void);
int run_pump(int nonreader);
int run_load(void);
int run_qemu(void);

#endif
