/*
 * balloond kit workload: a static program run inside the test guest.
 *
 *   workload touch MIB             map MIB MiB, write every page, unmap it (the guest frees it)
 *   workload hold MIB SEED DIR     fill MIB MiB with a pattern derived from SEED, then keep it
 *                                  in a background server answering requests on DIR/req
 *   workload verify DIR            ask the holder to check every byte; exit 0 only if all match
 *   workload release DIR           ask the holder to check every byte one last time and exit
 *   workload corrupt DIR           flip one bit of the held region, then verify (proves that
 *                                  verification can fail)
 *   workload meminfo [FIELD...]    print /proc/meminfo lines (all, or the named fields)
 *   workload pagefault1 SECONDS TASKS
 *                                  will-it-scale's page_fault1 in TASKS processes: each maps
 *                                  128 MiB, writes one byte per 4 KiB page, unmaps, repeats;
 *                                  prints the pages touched per second, all tasks together
 *
 * Every 8-byte word of the held region is a function of (SEED, word index), so any page the
 * host drops or zeroes while the guest still owns it shows up as a mismatch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)
#define PAGE 4096UL
#define MAX_REPORTED 16

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* The expected word: one multiply-mix per page, then a cheap per-word step. */
static inline uint64_t page_key(uint64_t seed, uint64_t page)
{
	return mix(seed * 0x100000001b3ULL + page) | 1;
}

static inline uint64_t word_value(uint64_t key, uint64_t word)
{
	return key * (word + 0x9e37ULL) ^ (word << 40);
}

static unsigned long parse_mib(const char *text)
{
	char *end;
	unsigned long value = strtoul(text, &end, 10);

	if (*text == '\0' || *end != '\0' || value == 0 || value > 1024UL * 1024UL) {
		fprintf(stderr, "workload: bad size in MiB: %s\n", text);
		exit(2);
	}
	return value;
}

static void *map_region(unsigned long mib)
{
	void *region = mmap(NULL, mib * MIB, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	if (region == MAP_FAILED) {
		fprintf(stderr, "workload: mmap %lu MiB: %s\n", mib, strerror(errno));
		exit(1);
	}
	return region;
}

static int cmd_touch(unsigned long mib)
{
	double start = now();
	unsigned char *region = map_region(mib);
	unsigned long pages = mib * MIB / PAGE;

	for (unsigned long i = 0; i < pages; i++)
		region[i * PAGE] = (unsigned char)(i | 1);
	double touched = now();
	if (munmap(region, mib * MIB) != 0) {
		fprintf(stderr, "workload: munmap: %s\n", strerror(errno));
		return 1;
	}
	printf("touched %lu MiB in %.2f s, freed\n", mib, touched - start);
	return 0;
}

static void fill(uint64_t *words, unsigned long mib, uint64_t seed)
{
	unsigned long pages = mib * MIB / PAGE;

	for (unsigned long p = 0; p < pages; p++) {
		uint64_t key = page_key(seed, p);
		uint64_t *page = words + p * (PAGE / 8);

		for (unsigned long w = 0; w < PAGE / 8; w++)
			page[w] = word_value(key, w);
	}
}

/* Check every word; report the first mismatches to OUT; return the number of bad words. */
static unsigned long check(const uint64_t *words, unsigned long mib, uint64_t seed, FILE *out)
{
	unsigned long pages = mib * MIB / PAGE;
	unsigned long bad = 0, bad_pages = 0, zero_pages = 0;

	for (unsigned long p = 0; p < pages; p++) {
		uint64_t key = page_key(seed, p);
		const uint64_t *page = words + p * (PAGE / 8);
		unsigned long bad_here = 0, zero_here = 0;

		for (unsigned long w = 0; w < PAGE / 8; w++) {
			uint64_t want = word_value(key, w);

			if (page[w] == want)
				continue;
			bad_here++;
			zero_here += page[w] == 0;
			if (bad < MAX_REPORTED)
				fprintf(out, "mismatch page=%lu word=%lu want=%016llx got=%016llx\n",
					p, w, (unsigned long long)want, (unsigned long long)page[w]);
			bad++;
		}
		bad_pages += bad_here != 0;
		zero_pages += bad_here == PAGE / 8 && zero_here == PAGE / 8;
	}
	if (bad)
		fprintf(out, "summary bad_words=%lu bad_pages=%lu zeroed_pages=%lu\n", bad,
			bad_pages, zero_pages);
	return bad;
}

static void fifo_path(char *buf, size_t size, const char *dir, const char *name)
{
	if ((size_t)snprintf(buf, size, "%s/%s", dir, name) >= size) {
		fprintf(stderr, "workload: path too long: %s\n", dir);
		exit(2);
	}
}

/* The holder: answers "verify" and "release" lines on DIR/req, writing one line to DIR/resp. */
static void serve(uint64_t *words, unsigned long mib, uint64_t seed, const char *dir)
{
	char req_path[4096], resp_path[4096], line[64];

	fifo_path(req_path, sizeof(req_path), dir, "req");
	fifo_path(resp_path, sizeof(resp_path), dir, "resp");
	for (;;) {
		FILE *req = fopen(req_path, "r");

		if (!req)
			_exit(1);
		if (!fgets(line, sizeof(line), req)) {
			fclose(req);
			continue;
		}
		fclose(req);
		int release = strncmp(line, "release", 7) == 0;

		if (strncmp(line, "corrupt", 7) == 0)
			words[(mib * MIB / 8) / 3] ^= 1ULL << 17;
		FILE *resp = fopen(resp_path, "w");

		if (!resp)
			_exit(1);
		double start = now();
		unsigned long bad = check(words, mib, seed, resp);

		fprintf(resp, "%s mib=%lu seed=%llu bad_words=%lu seconds=%.2f\n",
			bad ? "@@verify-bad" : "@@verify-ok", mib, (unsigned long long)seed, bad,
			now() - start);
		fclose(resp);
		if (release) {
			unlink(req_path);
			unlink(resp_path);
			_exit(0);
		}
	}
}

static int cmd_hold(unsigned long mib, const char *seed_text, const char *dir)
{
	uint64_t seed = strtoull(seed_text, NULL, 0);
	char req_path[4096], resp_path[4096];
	int ready[2];

	fifo_path(req_path, sizeof(req_path), dir, "req");
	fifo_path(resp_path, sizeof(resp_path), dir, "resp");
	if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
		fprintf(stderr, "workload: mkdir %s: %s\n", dir, strerror(errno));
		return 1;
	}
	if ((mkfifo(req_path, 0600) != 0 && errno != EEXIST) ||
	    (mkfifo(resp_path, 0600) != 0 && errno != EEXIST)) {
		fprintf(stderr, "workload: mkfifo in %s: %s\n", dir, strerror(errno));
		return 1;
	}
	if (pipe(ready) != 0)
		return 1;
	fflush(stdout);
	pid_t pid = fork();

	if (pid < 0) {
		fprintf(stderr, "workload: fork: %s\n", strerror(errno));
		return 1;
	}
	if (pid == 0) {
		close(ready[0]);
		setsid();
		signal(SIGHUP, SIG_IGN);
		double start = now();
		uint64_t *words = map_region(mib);

		fill(words, mib, seed);
		char msg[128];
		int len = snprintf(msg, sizeof(msg), "filled %lu MiB seed=%llu in %.2f s pid=%d\n",
				   mib, (unsigned long long)seed, now() - start, (int)getpid());
		if (write(ready[1], msg, (size_t)len) != len)
			_exit(1);
		close(ready[1]);
		int devnull = open("/dev/null", O_RDWR);

		dup2(devnull, 0);
		dup2(devnull, 1);
		dup2(devnull, 2);
		serve(words, mib, seed, dir);
	}
	close(ready[1]);
	char msg[128];
	ssize_t got = read(ready[0], msg, sizeof(msg) - 1);

	if (got <= 0) {
		fprintf(stderr, "workload: holder died before filling\n");
		return 1;
	}
	msg[got] = '\0';
	fputs(msg, stdout);
	return 0;
}

static int cmd_ask(const char *dir, const char *what)
{
	char req_path[4096], resp_path[4096], line[256];
	int ok = 0;

	fifo_path(req_path, sizeof(req_path), dir, "req");
	fifo_path(resp_path, sizeof(resp_path), dir, "resp");
	FILE *req = fopen(req_path, "w");

	if (!req) {
		fprintf(stderr, "workload: no holder at %s: %s\n", dir, strerror(errno));
		return 2;
	}
	fprintf(req, "%s\n", what);
	fclose(req);
	FILE *resp = fopen(resp_path, "r");

	if (!resp) {
		fprintf(stderr, "workload: %s: %s\n", resp_path, strerror(errno));
		return 2;
	}
	while (fgets(line, sizeof(line), resp)) {
		fputs(line, stdout);
		if (strncmp(line, "@@verify-ok", 11) == 0)
			ok = 1;
	}
	fclose(resp);
	return ok ? 0 : 1;
}

static int cmd_meminfo(int argc, char **argv)
{
	FILE *file = fopen("/proc/meminfo", "r");
	char line[256];

	if (!file) {
		fprintf(stderr, "workload: /proc/meminfo: %s\n", strerror(errno));
		return 1;
	}
	while (fgets(line, sizeof(line), file)) {
		int wanted = argc == 0;

		for (int i = 0; i < argc && !wanted; i++) {
			size_t len = strlen(argv[i]);

			wanted = strncmp(line, argv[i], len) == 0 && line[len] == ':';
		}
		if (wanted)
			fputs(line, stdout);
	}
	fclose(file);
	return 0;
}

/* will-it-scale's page_fault1 testcase, timed: pages touched in `seconds`. */
static unsigned long long page_fault1(double seconds)
{
	const unsigned long size = 128 * MIB;
	unsigned long long pages = 0;
	double end = now() + seconds;

	while (now() < end) {
		char *c = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			       -1, 0);

		if (c == MAP_FAILED) {
			fprintf(stderr, "workload: mmap: %s\n", strerror(errno));
			exit(1);
		}
		for (unsigned long i = 0; i < size; i += PAGE) {
			c[i] = 0;
			pages++;
		}
		munmap(c, size);
	}
	return pages;
}

static int cmd_pagefault1(const char *seconds_text, const char *tasks_text)
{
	double seconds = strtod(seconds_text, NULL);
	long tasks = strtol(tasks_text, NULL, 10);
	unsigned long long total = 0;
	int fds[2];

	if (seconds <= 0 || tasks <= 0 || tasks > 64 || pipe(fds) != 0) {
		fprintf(stderr, "workload: pagefault1 SECONDS TASKS (1-64 tasks)\n");
		return 2;
	}
	double start = now();
	for (long t = 0; t < tasks; t++) {
		pid_t pid = fork();

		if (pid < 0) {
			fprintf(stderr, "workload: fork: %s\n", strerror(errno));
			return 1;
		}
		if (pid == 0) {
			unsigned long long pages = page_fault1(seconds);

			if (write(fds[1], &pages, sizeof pages) != sizeof pages)
				_exit(1);
			_exit(0);
		}
	}
	close(fds[1]);
	for (long t = 0; t < tasks; t++) {
		unsigned long long pages;

		if (read(fds[0], &pages, sizeof pages) != sizeof pages) {
			fprintf(stderr, "workload: a pagefault1 task failed\n");
			return 1;
		}
		total += pages;
	}
	while (wait(NULL) > 0)
		;
	double elapsed = now() - start;
	printf("@@pagefault1 tasks=%ld seconds=%.2f pages=%llu per_second=%.0f\n", tasks, elapsed,
	       total, (double)total / elapsed);
	return 0;
}

static int usage(void)
{
	fputs("usage: workload touch MIB | hold MIB SEED DIR | verify|release|corrupt DIR | "
	      "meminfo [FIELD...] | pagefault1 SECONDS TASKS\n",
	      stderr);
	return 2;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 3 && strcmp(argv[1], "touch") == 0)
		return cmd_touch(parse_mib(argv[2]));
	if (argc == 5 && strcmp(argv[1], "hold") == 0)
		return cmd_hold(parse_mib(argv[2]), argv[3], argv[4]);
	if (argc == 3 && strcmp(argv[1], "verify") == 0)
		return cmd_ask(argv[2], "verify");
	if (argc == 3 && strcmp(argv[1], "release") == 0)
		return cmd_ask(argv[2], "release");
	if (argc == 3 && strcmp(argv[1], "corrupt") == 0)
		return cmd_ask(argv[2], "corrupt");
	if (argc >= 2 && strcmp(argv[1], "meminfo") == 0)
		return cmd_meminfo(argc - 2, argv + 2);
	if (argc == 4 && strcmp(argv[1], "pagefault1") == 0)
		return cmd_pagefault1(argv[2], argv[3]);
	return usage();
}
