/*
 * run - uffd-handler's test suite: a table of named cases, one line each.
 *
 *   run [-l] [-H HANDLER] [-R RELEASE] [-V VMM] [PATTERN...]
 *
 * -l lists the cases; PATTERNs (shell globs) pick cases by name. HANDLER is
 * the build the integration cases run (the sanitizer build under
 * ./build.sh test); RELEASE is the static binary, for the checks of what
 * ships. Ends with "N passed, N failed, N skipped".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sched.h>
#include <grp.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

#include "../uffd.h"
#include "abi.h"

enum { PASS, FAIL, SKIP };

static struct {
	const char *handler, *release, *vmm, *unit;
	const char *tsan;		/* the ThreadSanitizer build */
	const char *prefix;		/* of every name: "tsan/" in its pass */
	char dir[64];
	char snap[128];			/* 8,4,4 MiB */
	char big[128];			/* 32,16,16 MiB */
	char r64[128];			/* 64 regions of 1 MiB */
	const char *fuzz;
	char why[8192];
	long huge_old;			/* nr_hugepages to restore, or -1 */
	int signal;			/* what send_signal sends */
	int seq;
} T = { .huge_old = -1, .prefix = "" };

static int __attribute__((format(printf, 1, 2)))
fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(T.why, sizeof(T.why), fmt, ap);
	va_end(ap);
	return FAIL;
}

static int __attribute__((format(printf, 1, 2)))
skip(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(T.why, sizeof(T.why), fmt, ap);
	va_end(ap);
	return SKIP;
}

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void
read_text(const char *path, char *buf, size_t cap)
{
	FILE *f = fopen(path, "r");
	size_t n = 0;

	if (f != NULL) {
		n = fread(buf, 1, cap - 1, f);
		fclose(f);
	}
	buf[n] = '\0';
}

/*
 * Processes.
 */

struct proc {
	pid_t pid;
	int status;			/* from wait4, or -1 while running */
	struct rusage ru;
	int64_t ended;			/* now_ms() when reaped */
	char out[160], err[160];
};

static void
spawn(struct proc *p, char *const argv[], const char *root)
{
	int n = ++T.seq;

	snprintf(p->out, sizeof(p->out), "%s/%d.out", T.dir, n);
	snprintf(p->err, sizeof(p->err), "%s/%d.err", T.dir, n);
	p->status = -1;
	if ((p->pid = fork()) != 0)
		return;
	if (freopen(p->out, "w", stdout) == NULL || freopen(p->err, "w", stderr) == NULL)
		_exit(126);
	if (root != NULL && (chroot(root) < 0 || chdir("/") < 0))
		_exit(126);
	execv(argv[0], argv);
	_exit(127);
}


/* Returns 0 once reaped, -1 if still running after ms (then kills it). */
static int
reap(struct proc *p, int ms)
{
	int64_t end = now_ms() + ms;

	if (p->status != -1)
		return 0;
	for (;;) {
		if (wait4(p->pid, &p->status, WNOHANG, &p->ru) == p->pid) {
			p->ended = now_ms();
			return 0;
		}
		if (now_ms() >= end)
			break;
		usleep(5000);
	}
	kill(p->pid, SIGKILL);
	wait4(p->pid, &p->status, 0, &p->ru);
	p->ended = now_ms();
	p->status = -2;
	return -1;
}

static int
exited(const struct proc *p, int code)
{
	return p->status >= 0 && WIFEXITED(p->status) && WEXITSTATUS(p->status) == code;
}

static int
killed(const struct proc *p)
{
	return p->status >= 0 && WIFSIGNALED(p->status) && WTERMSIG(p->status) == SIGKILL;
}

static const char *
how(const struct proc *p)
{
	static char s[4][48];
	static int i;
	char *b = s[i++ % 4];

	if (p->status == -2)
		return "hung (killed by the test)";
	if (WIFEXITED(p->status))
		snprintf(b, 48, "exit %d", WEXITSTATUS(p->status));
	else
		snprintf(b, 48, "signal %d", WTERMSIG(p->status));
	return b;
}

/* 0 once p's standard error says text; -1 if p exited first (reaped,
 * its status kept) or after ms. */
static int
wait_text_or_exit(struct proc *p, const char *text, int ms)
{
	char err[4096];

	for (int64_t end = now_ms() + ms; now_ms() < end; usleep(2000)) {
		read_text(p->err, err, sizeof(err));
		if (strstr(err, text))
			return 0;
		if (p->status == -1 &&
		    wait4(p->pid, &p->status, WNOHANG, &p->ru) == p->pid) {
			p->ended = now_ms();
			return -1;
		}
	}
	return -1;
}

/* The handler is ready once it says so: a stale socket file may exist
 * before it is replaced. */
static int
wait_listening(struct proc *h)
{
	return wait_text_or_exit(h, "listening on", 2000);
}

/* How many times text is in s. */
static int
count_text(const char *s, const char *text)
{
	int n = 0;

	for (const char *at = s; (at = strstr(at, text)); at++)
		n++;
	return n;
}

/* 0 once the file at path holds text n times or more; -1 after ms. */
static int
wait_count(const char *path, const char *text, int n, int ms)
{
	static char buf[1 << 18];

	for (int64_t end = now_ms() + ms; now_ms() < end; usleep(1000)) {
		read_text(path, buf, sizeof(buf));
		if (count_text(buf, text) >= n)
			return 0;
	}
	return -1;
}

/* A process as /proc/PID/stat gives it. */
struct pinfo {
	pid_t pid, ppid, pgrp;
	char state;			/* 'T': stopped; 0: no such process */
};

static struct pinfo
proc_info(pid_t pid)
{
	char path[64], line[512];
	struct pinfo p = { pid, 0, 0, 0 };
	const char *rp;
	int ppid, pgrp;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	read_text(path, line, sizeof(line));
	if ((rp = strrchr(line, ')')) != NULL &&
	    sscanf(rp + 1, " %c %d %d", &p.state, &ppid, &pgrp) == 3) {
		p.ppid = ppid;
		p.pgrp = pgrp;
	} else {
		p.state = 0;
	}
	return p;
}

static char
proc_state(pid_t pid)
{
	return proc_info(pid).state;
}

/* The handler's server: the keeper's child (0 if none). */
static pid_t
server_of(pid_t keeper)
{
	char path[96], buf[256];

	snprintf(path, sizeof(path), "/proc/%d/task/%d/children", (int)keeper,
	    (int)keeper);
	read_text(path, buf, sizeof(buf));
	return (pid_t)atoi(buf);
}

/*
 * A restore: the handler under test and the test VMM, side by side.
 */

#define MAXARG 24

struct pair {
	const char *hargs[MAXARG];	/* handler options */
	const char *vargs[MAXARG];	/* vmm run options */
	const char *snap;		/* default T.snap */
	const char *base;		/* the handler's MEMFILE, if not snap */
	char *const *diffs;		/* and its DIFFs, NULL-terminated */
	const char *handler;		/* default T.handler */
	const char *root;		/* chroot for the handler */
	int vmm_ms;			/* how long the VMM may take (60 s) */
	int during_ms;			/* then call during() */
	void (*during)(struct pair *);
	struct proc h, v;
	char hout[16384], herr[16384], vout[4096], verr[4096];
	char sock[160];
	struct stat sock_st;		/* the socket once the handler listens */
	char status[4096];		/* /proc/PID/status, if read_status ran */
	int tasks, tasks_2;		/* its threads, those with 2 filters */
};

static void
start_pair(struct pair *p)
{
	char *argv[MAXARG * 2 + 256];
	char hsock[160], hsnap[160];
	int n = 0;

	snprintf(p->sock, sizeof(p->sock), "%s/%s/s%d.sock", T.dir,
	    p->root ? "jail" : ".", ++T.seq);
	snprintf(hsock, sizeof(hsock), "%s", p->root ? strrchr(p->sock, '/') : p->sock);
	snprintf(hsnap, sizeof(hsnap), "%s", p->root ? "/mem" : p->base ? p->base :
	    p->snap ? p->snap : T.snap);
	argv[n++] = (char *)(p->handler ? p->handler : T.handler);
	for (int i = 0; p->hargs[i]; i++)
		argv[n++] = (char *)p->hargs[i];
	argv[n++] = hsock;
	argv[n++] = hsnap;
	for (int i = 0; p->diffs && p->diffs[i] && n < MAXARG * 2 + 255; i++)
		argv[n++] = p->diffs[i];
	argv[n] = NULL;
	spawn(&p->h, argv, p->root);
}

/* Starts the handler alone; -1 (and T.why) if it never listens. */
static int
start_handler(struct pair *p)
{
	start_pair(p);
	if (wait_listening(&p->h) == 0)
		return 0;
	reap(&p->h, 1000);
	fail("the handler did not start");
	return -1;
}

/* A test VMM with the pair's options, against its handler's socket. */
static void
spawn_vmm(struct pair *p, struct proc *v)
{
	char *argv[MAXARG * 2];
	int n = 0;

	argv[n++] = (char *)T.vmm;
	argv[n++] = "run";
	argv[n++] = p->sock;
	argv[n++] = (char *)(p->snap ? p->snap : T.snap);
	for (int i = 0; p->vargs[i]; i++)
		argv[n++] = (char *)p->vargs[i];
	argv[n] = NULL;
	spawn(v, argv, NULL);
}

/* Starts the handler and, once it listens, the VMM; -1 if it never listens. */
static int
start_both(struct pair *p)
{
	start_pair(p);
	if (wait_listening(&p->h) < 0) {
		p->v.status = -2;
		return -1;
	}
	stat(p->sock, &p->sock_st);
	spawn_vmm(p, &p->v);
	return 0;
}

/* The pair's during(), during_ms after its start, if it has one. */
static void
call_during(struct pair *p)
{
	if (p->during) {
		usleep((useconds_t)p->during_ms * 1000);
		p->during(p);
	}
}

/* Reaps both (the VMM first, within vmm_ms) and reads what they printed. */
static void
finish_pair(struct pair *p)
{
	if (p->v.status != -2)
		reap(&p->v, p->vmm_ms ? p->vmm_ms : 60000);
	reap(&p->h, 10000);
	read_text(p->h.out, p->hout, sizeof(p->hout));
	read_text(p->h.err, p->herr, sizeof(p->herr));
	read_text(p->v.out, p->vout, sizeof(p->vout));
	read_text(p->v.err, p->verr, sizeof(p->verr));
}

static void
run_pair(struct pair *p)
{
	if (start_both(p) == 0)
		call_during(p);
	finish_pair(p);
}

/* A pair whose handler must end while its VM still runs (--detach): the
 * handler is reaped first, so the two end times say which came first. */
static void
run_detached(struct pair *p)
{
	if (start_both(p) == 0)
		reap(&p->h, 10000);
	finish_pair(p);
}

static int cell_two_vms(struct pair *);

static uint64_t
counter(const struct pair *p, const char *key)
{
	char pat[64];
	const char *at;

	snprintf(pat, sizeof(pat), "\"%s\":", key);
	if ((at = strstr(p->hout, pat)) == NULL)
		return UINT64_MAX;
	return strtoull(at + strlen(pat), NULL, 10);
}

static int
pair_fail(const struct pair *p, const char *what)
{
	return fail("%s: handler %s, vmm %s\n--- handler stderr:\n%s--- handler "
	    "stdout:\n%s--- vmm:\n%s%s", what, how(&p->h), how(&p->v), p->herr,
	    p->hout, p->vout, p->verr);
}

/* Whether a counter of the handler's line went below zero (past 2^63). */
static int
counter_wrapped(const struct pair *p)
{
	for (const char *at = p->hout; (at = strstr(at, "\":")) != NULL; at++)
		if (at[2] >= '0' && at[2] <= '9' &&
		    strtoull(at + 2, NULL, 10) >= UINT64_C(1) << 63)
			return 1;
	return 0;
}

/* The handler, its VMM and a second VMM with the same options, at once;
 * then during(), if any. -1 (and T.why) if the handler never listens. */
static int
start_two(struct pair *p, struct proc *v2)
{
	if (start_both(p) < 0) {
		finish_pair(p);
		pair_fail(p, "the handler did not start");
		return -1;
	}
	spawn_vmm(p, v2);
	call_during(p);
	return 0;
}

static int verified(struct pair *p);

/* The VMM verified every byte and the handler then exited 0 promptly. */
static int
restored(struct pair *p)
{
	run_pair(p);
	return verified(p);
}

/* A pair that has run: the VMM verified, the handler ended well. */
static int
verified(struct pair *p)
{
	if (!exited(&p->v, 0))
		return pair_fail(p, "the VMM did not verify its memory");
	if (!exited(&p->h, 0))
		return pair_fail(p, "the handler did not exit 0 after the VM");
	if (p->h.ended - p->v.ended > 2000)
		return pair_fail(p, "the handler took over 2 s to notice the VM exit");
	if (counter(p, "faults") == 0 || counter(p, "faults") == UINT64_MAX)
		return pair_fail(p, "no faults counted");
	if (counter_wrapped(p))
		return pair_fail(p, "a counter went below zero");
	return PASS;
}

/* A VMM the handler gave up on must be dead, not left frozen. */
static int
rejected(struct pair *p, int code, const char *logged)
{
	run_pair(p);
	if (!exited(&p->h, code))
		return pair_fail(p, "unexpected handler exit");
	if (!killed(&p->v))
		return pair_fail(p, "the VMM was not killed");
	if (strstr(p->herr, logged) == NULL)
		return pair_fail(p, "the log does not say why");
	return PASS;
}

/*
 * Machine facilities: skip, by name, what the machine lacks.
 */

static long
read_long(const char *path)
{
	char buf[64];

	read_text(path, buf, sizeof(buf));
	return buf[0] ? strtol(buf, NULL, 10) : -1;
}

static int
write_long(const char *path, long v)
{
	FILE *f = fopen(path, "w");
	int rc;

	if (f == NULL)
		return -1;
	rc = fprintf(f, "%ld\n", v) < 0;
	return (fclose(f) != 0 || rc) ? -1 : 0;
}

static const char nr_huge[] = "/proc/sys/vm/nr_hugepages";

/* HugePages_Free and HugePages_Total from /proc/meminfo. */
static void
huge_counts(long *free_pages, long *total)
{
	char mi[8192], *at;

	read_text("/proc/meminfo", mi, sizeof(mi));
	*free_pages = (at = strstr(mi, "HugePages_Free:")) ? atol(at + 15) : -1;
	*total = (at = strstr(mi, "HugePages_Total:")) ? atol(at + 16) : -1;
}

/*
 * Reserves n 2 MiB pages; the runner restores the old value after the case.
 * The pages of an earlier case's VMM may still be on their way back to the
 * pool (the kernel frees hugetlb pages from a workqueue): wait for them
 * first, up to 2 s, so that a case counting free pages counts right.
 */
static int
huge_reserve(long n)
{
	long old = read_long(nr_huge), free_pages, total;

	for (int i = 0; i < 200; i++) {
		huge_counts(&free_pages, &total);
		if (free_pages >= total)
			break;
		usleep(10000);
	}
	if (old < 0 || write_long(nr_huge, old + n) < 0)
		return -1;
	T.huge_old = old;
	if (read_long(nr_huge) >= old + n)
		return 0;
	/* Free memory in pieces (the page cache full of the cases' files):
	 * compacting it, and then dropping clean cache, makes the 2 MiB
	 * pages. */
	for (int i = 0; i < 2 && read_long(nr_huge) < old + n; i++)
		if (write_long(i ? "/proc/sys/vm/drop_caches" :
		    "/proc/sys/vm/compact_memory", 1) < 0 ||
		    write_long(nr_huge, old + n) < 0)
			return -1;
	return read_long(nr_huge) >= old + n ? 0 : -1;
}

static void
huge_restore(void)
{
	if (T.huge_old >= 0)
		write_long(nr_huge, T.huge_old);
	T.huge_old = -1;
}

/* Sets the pool so that n 2 MiB pages are free; restored after the case. */
static int
huge_free(long n)
{
	long free_pages, total;

	huge_reserve(0);
	huge_counts(&free_pages, &total);
	return free_pages < 0 ? -1 : huge_reserve(n - free_pages);
}

static int
have_kvm(void)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return 0;
	close(fd);
	return 1;
}

/*
 * Parser and validation cases.
 */

static int
abi_matches_kernel(const void *arg)
{
	(void)arg;
	for (size_t i = 0; i < abi_count; i++)
		if (abi_ours[i].value != abi_kernel[i].value)
			return fail("%s: uffd.h says 0x%" PRIx64 ", the kernel 0x%"
			    PRIx64, abi_ours[i].name, abi_ours[i].value,
			    abi_kernel[i].value);
	return PASS;
}

struct parse_case {
	const char *json;
	int n;				/* expected result */
	uint64_t v[5];			/* first mapping: base size offset ps kib */
	unsigned fields;
};

#define ALL3	(MAP_HAS_BASE | MAP_HAS_SIZE | MAP_HAS_OFFSET)

static const struct parse_case gen1 = {
	"[{\"base_host_virt_addr\":140183504207872,\"size\":3221225472,"
	"\"offset\":0},{\"base_host_virt_addr\":140180282982400,\"size\":"
	"1073741824,\"offset\":3221225472}]", 2,
	{ 140183504207872ull, 3221225472ull, 0, 0, 0 }, ALL3 };
static const struct parse_case gen2 = {
	"[{\"base_host_virt_addr\":140183504207872,\"size\":3221225472,"
	"\"offset\":0,\"page_size_kib\":4096}]", 1,
	{ 140183504207872ull, 3221225472ull, 0, 0, 4096 },
	ALL3 | MAP_HAS_PAGE_SIZE_KIB };
static const struct parse_case gen3 = {
	"[{\"base_host_virt_addr\":18446744073709551615,\"size\":2097152,"
	"\"offset\":18446744073709547520,\"page_size\":2097152,"
	"\"page_size_kib\":2097152}]", 1,
	{ UINT64_MAX, 2097152, 18446744073709547520ull, 2097152, 2097152 },
	ALL3 | MAP_HAS_PAGE_SIZE | MAP_HAS_PAGE_SIZE_KIB };
static const struct parse_case unknown = {
	" [ {\"gpa_start\": -1.5e+10, \"is_guest_memfd\": false, \"x\": null,"
	"\"t\":true, \"s\": \"a\\\"b\\\\\\u00e9\\n\", \"o\": {\"a\": [1, {}, []],"
	" \"b\": {\"c\": 0.25E-3}}, \"e\": [], \"base_host_virt_addr\" : 4096 ,"
	"\n\"size\":\t8192, \"offset\":0, \"future\": [[[[\"deep\"]]]]} ]\r\n", 1,
	{ 4096, 8192, 0, 0, 0 }, ALL3 };

static int
parse_valid(const void *arg)
{
	const struct parse_case *c = arg;
	struct uffd_mapping m[4];
	struct json_error je = { 0, "" };
	int n = json_parse_mappings(c->json, strlen(c->json), m, 4, &je);
	uint64_t got[5];

	if (n != c->n)
		return fail("returned %d, expected %d (%s at byte %zu)", n, c->n,
		    je.reason, je.offset);
	got[0] = m[0].base;
	got[1] = m[0].size;
	got[2] = m[0].offset;
	got[3] = m[0].page_size;
	got[4] = m[0].page_size_kib;
	for (int i = 0; i < 5; i++)
		if (got[i] != c->v[i])
			return fail("field %d: %" PRIu64 ", expected %" PRIu64, i,
			    got[i], c->v[i]);
	if (m[0].fields != c->fields)
		return fail("fields 0x%x, expected 0x%x", m[0].fields, c->fields);
	return PASS;
}

/* Every proper prefix is partial; the whole is complete. */
static int
parse_in_pieces(const void *arg)
{
	const char *json = unknown.json;
	size_t len = strlen(json);
	struct uffd_mapping m[2];
	struct json_error je;
	int n;

	(void)arg;
	for (size_t i = 0; i < len; i++) {
		/* Trailing blanks after the array complete it early. */
		if (i > 0 && json[i - 1] == ']')
			break;
		n = json_parse_mappings(json, i, m, 2, &je);
		if (n != JSON_PARTIAL)
			return fail("prefix of %zu bytes: %d (%s), expected partial",
			    i, n, je.reason);
	}
	n = json_parse_mappings(json, len, m, 2, &je);
	return n == 1 ? PASS : fail("whole message: %d (%s)", n, je.reason);
}

struct reject_case {
	const char *json;
	int code;
	const char *reason;		/* a substring of the reason */
	const char *at;			/* where the error must point */
};

#define M1 "[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":0"

static const struct reject_case rj_garbage = { "hello", JSON_INVALID,
	"not a JSON array", "hello" };
static const struct reject_case rj_not_object = { "[4096]", JSON_INVALID,
	"expected an object", "4096" };
static const struct reject_case rj_negative = { M1 ",\"page_size\":-4096}]",
	JSON_RANGE, "negative", "-4096" };
static const struct reject_case rj_fraction = { M1 ",\"page_size\":4096.0}]",
	JSON_RANGE, "fraction", ".0" };
static const struct reject_case rj_exponent = { M1 ",\"page_size\":4e3}]",
	JSON_RANGE, "exponent", "e3" };
static const struct reject_case rj_overflow = {
	M1 ",\"page_size\":18446744073709551616}]", JSON_RANGE, "2^64",
	"6}]" };
static const struct reject_case rj_leading_zero = { M1 ",\"page_size\":04096}]",
	JSON_INVALID, "leading zero", "04096" };
static const struct reject_case rj_string_int = { M1 ",\"page_size\":\"4096\"}]",
	JSON_INVALID, "not a number", "\"4096\"}" };
static const struct reject_case rj_null_int = { M1 ",\"page_size\":null}]",
	JSON_INVALID, "not a number", "null" };
static const struct reject_case rj_duplicate = { M1 ",\"offset\":4096}]",
	JSON_INVALID, "duplicate", "offset\":4096" };
static const struct reject_case rj_missing = {
	"[{\"base_host_virt_addr\":4096,\"offset\":0}]", JSON_INVALID,
	"lacks size", "]" };
static const struct reject_case rj_trailing = { M1 "}] {}", JSON_INVALID,
	"after the array", "{}" };
static const struct reject_case rj_trailing_comma = { M1 "},]", JSON_INVALID,
	"expected an object", "]" };
static const struct reject_case rj_bad_escape = { M1 ",\"x\":\"\\q\"}]",
	JSON_INVALID, "bad escape", "\\q" };
static const struct reject_case rj_control = { M1 ",\"x\":\"a\tb\"}]",
	JSON_INVALID, "control character", "\tb" };
static const struct reject_case rj_bad_literal = { M1 ",\"x\":tru}]",
	JSON_INVALID, "unexpected character", "tru}" };
static const struct reject_case rj_bad_number = { M1 ",\"x\":-.5}]",
	JSON_INVALID, "bad number", ".5}" };
#define M2 "{\"base_host_virt_addr\":8192,\"size\":4096,\"offset\":0}"
static const struct reject_case rj_too_many = { M1 "}," M2 "," M2 "]",
	JSON_TOO_MANY, "too many", M2 "]" };

static int
parse_reject(const void *arg)
{
	const struct reject_case *c = arg;
	struct uffd_mapping m[2];
	struct json_error je = { 0, "" };
	int n = json_parse_mappings(c->json, strlen(c->json), m, 2, &je);
	size_t at = c->at ? (size_t)(strstr(c->json, c->at) - c->json) : je.offset;

	if (n != c->code)
		return fail("returned %d (%s at %zu), expected %d", n, je.reason,
		    je.offset, c->code);
	if (strstr(je.reason, c->reason) == NULL)
		return fail("reason \"%s\" lacks \"%s\"", je.reason, c->reason);
	if (je.offset != at)
		return fail("error at byte %zu, expected %zu", je.offset, at);
	return PASS;
}

/* 10,000 nested brackets in an unknown field stop at the depth bound. */
static int
parse_reject_deep(const void *arg)
{
	static char json[20100];
	struct uffd_mapping m[1];
	struct json_error je;
	size_t n = (size_t)snprintf(json, sizeof(json), "[{\"x\":");
	int rc;

	(void)arg;
	memset(json + n, '[', 10000);
	memset(json + n + 10000, ']', 10000);
	strcpy(json + n + 20000, "}]");
	rc = json_parse_mappings(json, strlen(json), m, 1, &je);
	if (rc != JSON_TOO_DEEP)
		return fail("returned %d (%s), expected too deep", rc, je.reason);
	return je.offset == n + JSON_MAX_DEPTH - 1 ? PASS :
	    fail("error at %zu, expected %zu", je.offset, n + JSON_MAX_DEPTH - 1);
}

struct validate_case {
	const char *json;
	uint64_t file_size;
	const char *reason;		/* NULL: must be accepted */
};

static const struct validate_case va_default_page = {
	"[{\"base_host_virt_addr\":8192,\"size\":8192,\"offset\":4096}]", 12288,
	NULL };
static const struct validate_case va_2m = {
	"[{\"base_host_virt_addr\":2097152,\"size\":4194304,\"offset\":4096,"
	"\"page_size\":2097152,\"page_size_kib\":2097152}]", 4198400, NULL };
static const struct validate_case va_no_mappings = { "[]", 4096,
	"no mappings" };
static const struct validate_case va_misaligned = {
	"[{\"base_host_virt_addr\":4097,\"size\":4096,\"offset\":0}]", 4096,
	"not aligned" };
static const struct validate_case va_2m_misaligned = {
	"[{\"base_host_virt_addr\":4096,\"size\":2097152,\"offset\":0,"
	"\"page_size\":2097152}]", 2097152, "not aligned" };
static const struct validate_case va_zero_size = {
	"[{\"base_host_virt_addr\":4096,\"size\":0,\"offset\":0}]", 4096,
	"size is zero" };
static const struct validate_case va_size_multiple = {
	"[{\"base_host_virt_addr\":4096,\"size\":6144,\"offset\":0}]", 8192,
	"not a multiple of page size" };
static const struct validate_case va_offset = {
	"[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":512}]", 8192,
	"offset 512" };
static const struct validate_case va_beyond_file = {
	"[{\"base_host_virt_addr\":4096,\"size\":8192,\"offset\":4096}]", 8192,
	"beyond the end" };
static const struct validate_case va_offset_overflow = {
	"[{\"base_host_virt_addr\":4096,\"size\":8192,\"offset\":"
	"18446744073709547520}]", 8192, "beyond the end" };
static const struct validate_case va_base_overflow = {
	"[{\"base_host_virt_addr\":18446744073709547520,\"size\":8192,"
	"\"offset\":0}]", 8192, "overflows" };
static const struct validate_case va_overlap = {
	"[{\"base_host_virt_addr\":8192,\"size\":8192,\"offset\":0},"
	"{\"base_host_virt_addr\":65536,\"size\":4096,\"offset\":8192},"
	"{\"base_host_virt_addr\":12288,\"size\":4096,\"offset\":12288}]", 16384,
	"mappings 0 and 2 overlap" };
static const struct validate_case va_bogus_page = {
	"[{\"base_host_virt_addr\":8192,\"size\":8192,\"offset\":0,"
	"\"page_size\":8192}]", 8192, "neither 4096 nor 2097152" };
static const struct validate_case va_disagree = {
	"[{\"base_host_virt_addr\":8192,\"size\":8192,\"offset\":0,"
	"\"page_size\":4096,\"page_size_kib\":4}]", 8192, "disagree" };

static int
validate(const void *arg)
{
	const struct validate_case *c = arg;
	struct uffd_mapping m[4];
	struct json_error je;
	char why[256] = "";
	int n = json_parse_mappings(c->json, strlen(c->json), m, 4, &je), rc;

	if (n < 0)
		return fail("parse: %s at %zu", je.reason, je.offset);
	rc = mappings_validate(m, (size_t)n, c->file_size, 4096, why, sizeof(why));
	if (c->reason == NULL)
		return rc == 0 ? PASS : fail("rejected: %s", why);
	if (rc != -EINVAL)
		return fail("accepted, expected \"%s\"", c->reason);
	return strstr(why, c->reason) ? PASS :
	    fail("reason \"%s\" lacks \"%s\"", why, c->reason);
}

/*
 * The fault path's own functions against a real uffd (test/unit.c).
 */
static int
unit(const void *arg)
{
	char *argv[] = { (char *)T.unit, (char *)arg, NULL };
	char err[4096];
	struct proc p;

	spawn(&p, argv, NULL);
	reap(&p, 20000);
	read_text(p.err, err, sizeof(err));
	if (exited(&p, 3))
		return skip("%s", err);
	return exited(&p, 0) ? PASS : fail("%s: %s", how(&p), err);
}

/* A unit case on hugetlb pages, with one 2 MiB page free in the pool. */
static int
unit_hugetlb(const void *arg)
{
	if (huge_free(1) < 0)
		return skip("cannot set the hugetlb pool");
	return unit(arg);
}

/*
 * Command line and socket setup.
 */

static int
run_handler(const char *const args[], int ms, struct proc *p, char *err, size_t cap)
{
	char *argv[MAXARG];
	int n = 0;

	argv[n++] = (char *)T.handler;
	for (int i = 0; args[i]; i++)
		argv[n++] = (char *)args[i];
	argv[n] = NULL;
	spawn(p, argv, NULL);
	reap(p, ms);
	read_text(p->err, err, cap);
	return p->status;
}

static int
cli_help_version(const void *arg)
{
	struct proc p;
	char out[4096];

	(void)arg;
	run_handler((const char *[]){ "--help", NULL }, 5000, &p, out, sizeof(out));
	read_text(p.out, out, sizeof(out));
	if (!exited(&p, 0) || !strstr(out, "Usage: uffd-handler") ||
	    !strstr(out, "Exit codes"))
		return fail("--help: %s, printed: %s", how(&p), out);
	run_handler((const char *[]){ "--version", NULL }, 5000, &p, out, sizeof(out));
	read_text(p.out, out, sizeof(out));
	if (!exited(&p, 0) || strncmp(out, "uffd-handler ", 13) != 0)
		return fail("--version: %s, printed: %s", how(&p), out);
	return PASS;
}

static int
cli_usage_errors(const void *arg)
{
	static const char *const cases[][4] = {
		{ NULL }, { "onlyone", NULL }, { "--max-vms", "-3", "a", NULL },
		{ "--bogus", "a", "b", NULL }, { "--log-level", "loud", "a", NULL },
		{ "--handshake-timeout", "0", "a", NULL },
		{ "--accept-timeout", "-1", "a", NULL },
		{ "--threads", "0", "a", NULL }, { "--threads", "65", "a", NULL },
		{ "--threads", "+4", "a", NULL }, { "--threads", "4x", "a", NULL },
		{ "", "a", NULL }, { "--populate=", "a", NULL },
		{ "--record=", "a", NULL }, { "--metrics=", "a", NULL },
		{ "--metrics-interval", "0", "a", NULL }, { "--check", "a", NULL },
		{ "--check", "--self-test", NULL }, { "--self-test", "a", NULL },
		{ "--check", "--metrics", "m.prom", NULL },
		{ "--max-vms", "2", "--check", NULL },
		{ "--self-test", "--threads", "2", NULL },
		{ "--self-test", "--uid", "5", NULL },
	};
	struct proc p;
	char err[2048];

	(void)arg;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const char *args[6] = { NULL };

		int tool = 0;

		for (int j = 0; j < 4 && cases[i][j]; j++) {
			args[j] = cases[i][j];
			tool |= strcmp(args[j], "--check") == 0 ||
			    strcmp(args[j], "--self-test") == 0;
		}
		if (i >= 2 && i != 3 && !tool)
			args[3] = "b";
		run_handler(args, 5000, &p, err, sizeof(err));
		if (!exited(&p, 2) || strchr(err, '\n') != strrchr(err, '\n') ||
		    strncmp(err, "uffd-handler", 12) != 0)
			return fail("case %zu: %s, expected exit 2 and one line: %s",
			    i, how(&p), err);
	}
	return PASS;
}

/*
 * An option whose value is missing at the end is named as given, and the
 * help says how many threads population runs on. The release binary's:
 * musl's getopt leaves nothing in argv to name a short option by.
 */
static int
cli_value_missing_named(const void *arg)
{
	static const char *const opts[] = { "-l", "--log-level", "--threads",
		"--populate", "--socket-owner" };
	const char *handler = T.handler;
	struct proc p;
	char err[2048], want[64];

	(void)arg;
	T.handler = T.release;
	for (size_t i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
		run_handler((const char *[]){ opts[i], NULL }, 5000, &p, err,
		    sizeof(err));
		snprintf(want, sizeof(want), "uffd-handler: %s needs a value", opts[i]);
		if (!exited(&p, 2) || strncmp(err, want, strlen(want)) != 0) {
			T.handler = handler;
			return fail("%s alone: %s: %s", opts[i], how(&p), err);
		}
	}
	T.handler = handler;
	run_handler((const char *[]){ "--help", NULL }, 5000, &p, err, sizeof(err));
	read_text(p.out, err, sizeof(err));
	if (strstr(err, "one more") || !strstr(err, "from N more"))
		return fail("--help misstates the population threads: %s", err);
	return PASS;
}

/*
 * Options that contradict each other: exit 2 with one line saying why,
 * before anything is opened for writing. The --record file named (also
 * as the --populate list, or the memory file) keeps its bytes.
 */
static int
cli_option_conflicts(const void *arg)
{
	char keep[160], mem[160], sock[160], err[2048], buf[16];
	const char *const cases[][8] = {
		{ "--populate", "all", "--populate", keep, sock, T.snap, NULL },
		{ "--populate", keep, "--populate", "all", sock, T.snap, NULL },
		{ "--populate", "all", "--detach", "--populate", keep, sock, T.snap },
		{ "--record", keep, "--populate", keep, sock, T.snap, NULL },
		{ "--record", keep, "--populate", "all", sock, T.snap, NULL },
		{ "--record", mem, sock, mem, NULL },
	};
	static const char *const why[] = { "--populate given twice",
		"--populate given twice", "--populate given twice",
		"--record needs a restore without --populate",
		"--record needs a restore without --populate",
		"is the memory file; not overwriting it" };
	struct proc p;
	FILE *f;

	(void)arg;
	snprintf(keep, sizeof(keep), "%s/keep.txt", T.dir);
	snprintf(mem, sizeof(mem), "%s/keep.mem", T.dir);
	snprintf(sock, sizeof(sock), "%s/conflict.sock", T.dir);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const char *args[10] = { NULL };

		for (int j = 0; j < 8 && cases[i][j]; j++)
			args[j] = cases[i][j];
		for (int j = 0; j < 2; j++) {
			if ((f = fopen(j ? mem : keep, "w")) == NULL)
				return fail("fopen: %s", strerror(errno));
			fputs(j ? "4096" : "0\n", f);
			fclose(f);
		}
		run_handler(args, 5000, &p, err, sizeof(err));
		if (!exited(&p, 2) || strchr(err, '\n') != strrchr(err, '\n') ||
		    !strstr(err, why[i]))
			return fail("case %zu: %s, expected exit 2 and one line "
			    "saying \"%s\": %s", i, how(&p), why[i], err);
		read_text(i == 5 ? mem : keep, buf, sizeof(buf));
		if (strcmp(buf, i == 5 ? "4096" : "0\n") != 0)
			return fail("case %zu: the file named was emptied", i);
	}
	return PASS;
}

static int
cli_missing_memfile(const void *arg)
{
	char sock[160], err[2048];
	struct proc p;

	(void)arg;
	snprintf(sock, sizeof(sock), "%s/nomem.sock", T.dir);
	run_handler((const char *[]){ sock, "/nonexistent/mem", NULL }, 5000, &p,
	    err, sizeof(err));
	if (!exited(&p, 3) || !strstr(err, "open(/nonexistent/mem): No such file"))
		return fail("%s: %s", how(&p), err);
	return PASS;
}

static int
socket_not_a_socket(const void *arg)
{
	char path[160], err[2048], buf[8] = "";
	struct proc p;
	FILE *f;

	(void)arg;
	snprintf(path, sizeof(path), "%s/regular-file", T.dir);
	if ((f = fopen(path, "w")) == NULL)
		return fail("fopen: %s", strerror(errno));
	fputs("keep", f);
	fclose(f);
	run_handler((const char *[]){ path, T.snap, NULL }, 5000, &p, err, sizeof(err));
	read_text(path, buf, sizeof(buf));
	if (!exited(&p, 3) || !strstr(err, "is not a socket") || strcmp(buf, "keep"))
		return fail("%s, file now \"%s\": %s", how(&p), buf, err);
	return PASS;
}

/* A socket file left by a killed handler is replaced and served. */
static int
socket_stale_replaced(const void *arg)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	struct pair p = { .vargs = { "--threads", "2", NULL } };
	int fd = socket(AF_UNIX, SOCK_STREAM, 0), rc;

	(void)arg;
	snprintf(a.sun_path, sizeof(a.sun_path), "%s/s%d.sock", T.dir, T.seq + 1);
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
		return fail("bind: %s", strerror(errno));
	close(fd);
	rc = restored(&p);
	if (rc == PASS && !strstr(p.herr, "replaced stale socket"))
		return pair_fail(&p, "no log line about the stale socket");
	return rc;
}

static int
accept_timeout(const void *arg)
{
	char sock[160], err[2048];
	struct proc p;

	(void)arg;
	snprintf(sock, sizeof(sock), "%s/lonely.sock", T.dir);
	run_handler((const char *[]){ "--accept-timeout", "1", sock, T.snap, NULL },
	    5000, &p, err, sizeof(err));
	if (!exited(&p, 3) || !strstr(err, "no VMM connected within 1 s"))
		return fail("%s: %s", how(&p), err);
	if (access(sock, F_OK) == 0)
		return fail("the socket file was left behind");
	return PASS;
}

/*
 * SIGUSR1 while waiting for the first VMM prints and goes on waiting: the
 * accept timeout still ends the wait. A timeout of 4294968 s (past what an
 * int of milliseconds holds) or of a year (the most there is) waits, and
 * SIGTERM still stops it.
 */
static int
accept_timeout_signals(const void *arg)
{
	char sock[160], err[2048];
	const char *secs = arg ? arg : "2";
	char *argv[] = { (char *)T.handler, "--accept-timeout", (char *)secs, sock,
		T.snap, NULL };
	struct proc p;

	snprintf(sock, sizeof(sock), "%s/usr1-%s.sock", T.dir, secs);
	spawn(&p, argv, NULL);
	usleep(300000);
	kill(p.pid, SIGUSR1);
	if (arg) {
		usleep(1200000);
		kill(p.pid, SIGTERM);
	}
	reap(&p, 5000);
	read_text(p.err, err, sizeof(err));
	if (!exited(&p, arg ? 5 : 3) || !strstr(err, arg ? "received Terminated" :
	    "no VMM connected within 2 s"))
		return fail("%s: %s", how(&p), err);
	if (access(sock, F_OK) == 0)
		return fail("the socket file was left behind");
	return PASS;
}

/*
 * Restores.
 */

static int
restore(const void *arg)
{
	struct pair p = { 0 };
	const char *const *v = arg;

	for (int i = 0; v[i]; i++)
		p.vargs[i] = v[i];
	return restored(&p);
}

static const char *const r_gen1[] = { "--gen", "1", NULL };
static const char *const r_gen2[] = { "--gen", "2", NULL };
static const char *const r_gen3[] = { "--gen", "3", NULL };
static const char *const r_gen3_closed[] = { "--gen", "3", "--close", NULL };
static const char *const r_regions[] = { "--regions", "2,6,4,4", "--threads",
	"8", NULL };
static const char *const r_split[] = { "--split", "5", "--extra-fds", "2", NULL };
static const char *const r_two_fds[] = { "--extra-fds", "1", NULL };

/*
 * The fault path: sequential access is served in growing runs and all-zero
 * snapshot pages as zero pages; --no-optimize serves one page per fault.
 */
static int
fault_path(const void *arg)
{
	struct pair p = { .hargs = { arg, NULL }, .vargs = { "--threads", "1",
	    "--balloon", "after", NULL } };
	int rc = restored(&p);
	uint64_t ahead = counter(&p, "prefetched"), zero = counter(&p,
	    "zero_data_pages");

	if (rc != PASS)
		return rc;
	if (arg == NULL && (ahead == 0 || zero == 0 ||
	    counter(&p, "faults") * 4 > counter(&p, "pages_copied")))
		return pair_fail(&p, "no runs or no zero pages on sequential access");
	if (arg != NULL && (ahead != 0 || zero != 0 ||
	    counter(&p, "pages_copied") + counter(&p, "zero_pages") !=
	    counter(&p, "faults") - counter(&p, "already_present")))
		return pair_fail(&p, "not one page per fault");
	return PASS;
}

/*
 * --detach while eight vCPUs fault, write and balloon: a fault that queued
 * while UNREGISTER ran (after its wake, before the VMA was cleared) sleeps
 * forever unless woken once more; the VMM then times out. Without that
 * wake one run in about ten hung here, so the case runs fifteen.
 */
static int
populate_detach_stress(const void *arg)
{
	(void)arg;
	/* Fifteen against the ASan build; the TSan pass looks for races,
	 * which eight runs show as well. */
	for (int i = 0; i < (T.prefix[0] ? 8 : 15); i++) {
		struct pair p = { .hargs = { "--threads", "4", "--populate", "all",
		    "--detach", NULL }, .vargs = { "--stress", "1", "--threads", "8",
		    NULL }, .vmm_ms = 15000 };

		run_pair(&p);
		if (!exited(&p.v, 0) || !exited(&p.h, 0))
			return pair_fail(&p, "a VM hung or saw a wrong page after "
			    "the handler detached");
		if (!strstr(p.herr, "without a handler"))
			return pair_fail(&p, "the handler did not detach");
	}
	return PASS;
}

/*
 * --populate all --detach: the handler installs every page, unregisters and
 * exits while the VM runs on; the VMM then reads every page and balloons.
 * A REMOVE left unanswered would hang it, and the case by its timeout.
 */
static int
populate_detach(const void *arg)
{
	struct pair p = { .hargs = { "--populate", "all", "--detach", NULL },
	    .vargs = { "--delay", "1500", "--threads", "2", "--balloon", "after",
	    NULL } };

	(void)arg;
	run_detached(&p);
	if (!exited(&p.v, 0) || !exited(&p.h, 0))
		return pair_fail(&p, "the VM did not verify, or the handler failed");
	if (p.h.ended >= p.v.ended || !strstr(p.herr, "without a handler"))
		return pair_fail(&p, "the handler did not detach before the VM ended");
	/* The last quarter of the last region is a hole: it reads as zero
	 * without a handler, so population leaves it out. */
	if (counter(&p, "populated") != 4096 - 256 ||
	    counter(&p, "populate_skipped") != 256 || counter(&p, "faults") != 0)
		return pair_fail(&p, "not every data page populated before any "
		    "fault, or a hole populated");
	return PASS;
}

/* Pages of ps bytes wholly inside holes of the file at path. */
static uint64_t
hole_pages(const char *path, uint64_t ps)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	off_t end = fd < 0 ? 0 : lseek(fd, 0, SEEK_END), pos = 0;
	uint64_t n = 0;

	while (fd >= 0 && pos < end) {
		off_t hole = lseek(fd, pos, SEEK_HOLE), data;

		if (hole < 0 || hole >= end)
			break;
		data = lseek(fd, hole, SEEK_DATA);
		data = data < 0 ? end : data;
		if ((uint64_t)data / ps > ((uint64_t)hole + ps - 1) / ps)
			n += (uint64_t)data / ps - ((uint64_t)hole + ps - 1) / ps;
		pos = data;
	}
	if (fd >= 0)
		close(fd);
	return n;
}

/*
 * --populate all --detach on a region cut into several VMAs (split), or a
 * hotplug region with unplugged PROT_NONE slots: every data page must be
 * in before the handler lets go, since afterwards a missing page reads as
 * zero; the holes (never-plugged slots among them) are left out, costing
 * nothing. The VM then reads, writes, balloons and plugs slots alone.
 */
static int
populate_detach_layout(const void *arg)
{
	const char *const *v = arg;
	char snap[160], cmd[512];
	struct pair p = { .snap = snap, .hargs = { "--populate", "all",
	    "--detach", NULL }, .vargs = { "--regions", "4,4,8", "--delay", "1500",
	    "--threads", "2", "--access", "seq", "--write", "--balloon", "during",
	    "--layout", v[0], NULL } };
	int huge = strcmp(v[1], "--huge") == 0, n = 13;
	uint64_t ps = huge ? PAGE_2M : 4096, holes;

	for (int i = 1; v[i]; i++)
		p.vargs[n++] = v[i];
	if (huge && huge_reserve(8) < 0)
		return skip("cannot reserve 8 hugetlb pages of 2 MiB");
	snprintf(snap, sizeof(snap), "%s/detach-%s%s.mem", T.dir, v[0],
	    huge ? "-2m" : "");
	snprintf(cmd, sizeof(cmd), "%s mksnap %s --regions 4,4,8 --slot %s%s "
	    ">/dev/null", T.vmm, snap, huge ? "2048" : "1024",
	    strcmp(v[0], "hotplug") == 0 ? " --hotplug" : "");
	if (system(cmd) != 0)
		return fail("%s failed", cmd);
	holes = hole_pages(snap, ps);
	run_detached(&p);
	if (!exited(&p.v, 0) || !exited(&p.h, 0))
		return pair_fail(&p, "the VM did not verify, or the handler failed");
	if (p.h.ended >= p.v.ended || !strstr(p.herr, "without a handler"))
		return pair_fail(&p, "the handler did not detach before the VM ended");
	if (counter(&p, "populate_skipped") != holes ||
	    counter(&p, "populated") + holes != 16 * 1048576 / ps)
		return pair_fail(&p, "population did not install exactly the pages "
		    "outside holes");
	return PASS;
}

static const char *const pd_split[] = { "split", "--slot", "1024", NULL };
static const char *const pd_hotplug[] = { "hotplug", "--slot", "1024", NULL };
static const char *const pd_split_2m[] = { "split", "--huge", "--slot", "2048",
	NULL };
static const char *const pd_hotplug_2m[] = { "hotplug", "--huge", "--slot",
	"2048", NULL };

/*
 * --record writes the pages a VM needed; --populate FILE installs exactly
 * those first, so the next VM, touching the same pages, takes no fault.
 */
static int
record_then_populate(const void *arg)
{
	char list[160], text[8192];
	struct pair rec = { .hargs = { "--record", list, NULL },
	    .vargs = { "--threads", "2", NULL } };
	struct pair pop = { .hargs = { "--populate", list, NULL },
	    .vargs = { "--threads", "2", "--delay", "500", NULL } };
	int rc, lines = 0;

	(void)arg;
	snprintf(list, sizeof(list), "%s/working-set.txt", T.dir);
	if ((rc = restored(&rec)) != PASS)
		return rc;
	read_text(list, text, sizeof(text));
	for (char *c = text; *c; c++)
		lines += *c == '\n';
	if (lines == 0 || !strstr(rec.herr, "recorded 4096 pages"))
		return pair_fail(&rec, "no working set recorded");
	run_pair(&pop);
	if (!exited(&pop.v, 0) || !exited(&pop.h, 0))
		return pair_fail(&pop, "the populated restore failed");
	if (counter(&pop, "populated") != 4096 || counter(&pop, "faults") != 0)
		return pair_fail(&pop, "the recorded pages were not installed first");
	return PASS;
}

static int
populate_bad_list(const void *arg)
{
	char list[160], sock[160], err[2048];
	struct proc p;
	FILE *f;

	(void)arg;
	snprintf(list, sizeof(list), "%s/bad-list.txt", T.dir);
	snprintf(sock, sizeof(sock), "%s/bad-list.sock", T.dir);
	if ((f = fopen(list, "w")) == NULL)
		return fail("fopen: %s", strerror(errno));
	fputs("0\n4096\n4097\n", f);
	fclose(f);
	run_handler((const char *[]){ "--populate", list, sock, T.snap, NULL }, 5000,
	    &p, err, sizeof(err));
	if (!exited(&p, 3) || !strstr(err, "bad-list.txt:3: not a page-aligned"))
		return fail("%s: %s", how(&p), err);
	return PASS;
}

/* Population while the guest faults and balloons: faults go first. */
static int
populate_with_faults(const void *arg)
{
	struct pair p = { .snap = T.big, .hargs = { "--populate", "all", NULL },
	    .vargs = { "--regions", "32,16,16", "--balloon", "during", NULL } };
	int rc = restored(&p);

	(void)arg;
	if (rc != PASS)
		return rc;
	if (counter(&p, "populated") == 0 || counter(&p, "faults") == 0)
		return pair_fail(&p, "population or faults did not happen");
	return PASS;
}

static int
balloon(const void *arg)
{
	struct pair p = { .snap = T.big, .vargs = { "--regions", "32,16,16",
	    "--balloon", arg, NULL } };
	int rc = restored(&p);

	if (rc != PASS)
		return rc;
	if (counter(&p, "remove_events") == 0 || counter(&p, "zero_pages") == 0)
		return pair_fail(&p, "no removes or no zero pages counted");
	if (strcmp(arg, "during") == 0 && counter(&p, "deferred") == 0)
		return pair_fail(&p, "the EAGAIN path never ran (deferred 0)");
	return PASS;
}

static int
hugetlb(const void *arg)
{
	struct pair p = { .snap = T.big, .vargs = { "--regions", "32,16,16",
	    "--huge", arg ? "--balloon" : NULL, arg, NULL } };
	int rc;

	if (huge_reserve(36) < 0)
		return skip("cannot reserve 36 hugetlb pages of 2 MiB");
	if ((rc = restored(&p)) != PASS)
		return rc;
	if (counter(&p, "bytes_copied") != counter(&p, "pages_copied") * PAGE_2M)
		return pair_fail(&p, "pages were not served 2 MiB at a time");
	if (arg && (counter(&p, "zero_pages") == 0 || counter(&p, "deferred") == 0))
		return pair_fail(&p, "no zero pages or no deferrals");
	return PASS;
}

static int
kvm(const void *arg)
{
	/* Guest memory under this machine's kvm_pvm costs ~2.5 ms of shadow
	 * paging per 4 KiB page, so the KVM cases use the small snapshot. */
	struct pair p = { .vargs = { "--kvm", "--threads", "2", arg, NULL } };
	int rc;

	if (!have_kvm())
		return skip("no usable /dev/kvm");
	if (arg && huge_reserve(12) < 0)
		return skip("cannot reserve 12 hugetlb pages of 2 MiB");
	if ((rc = restored(&p)) != PASS)
		return rc;
	return strstr(p.vout, "kvm: 2 vCPUs") ? PASS :
	    pair_fail(&p, "the guest did not run");
}

/*
 * Endings: the VM goes away, or something is wrong.
 */

static int
vmm_crash(const void *arg)
{
	struct pair p = { .vargs = { "--crash", NULL } };

	(void)arg;
	run_pair(&p);
	if (!killed(&p.v))
		return pair_fail(&p, "the VMM did not crash as told");
	if (!exited(&p.h, 0))
		return pair_fail(&p, "the handler did not exit 0");
	if (p.h.ended - p.v.ended > 1000)
		return pair_fail(&p, "the handler took over 1 s to notice");
	return PASS;
}

static int
stray_fault(const void *arg)
{
	struct pair p = { .vargs = { "--stray-fault", NULL } };

	(void)arg;
	return rejected(&p, 1, "outside every mapping");
}

static int
bad_handshake(const void *arg)
{
	struct pair p = { .hargs = { "--handshake-timeout", "1", NULL } };
	const char *const *v = arg;
	int i;

	for (i = 0; v[i + 1]; i++)
		p.vargs[i] = v[i + 1];
	return rejected(&p, 4, v[0]);
}

static const char *const hs_garbage[] = { "rejected: message is not a JSON array",
	"--raw", "hello", NULL };
static const char *const hs_no_fd[] = { "rejected: no file descriptor", "--no-fd",
	NULL };
static const char *const hs_beyond[] = { "beyond the end of the memory file",
	"--raw", "[{\"base_host_virt_addr\":4096,\"size\":1073741824,\"offset\":0}]",
	NULL };
static const char *const hs_cut[] = { "incomplete after 1 s",
	"--raw", "[{\"base_host_virt_addr\":4096,\"size\":", NULL };

static void
send_signal(struct pair *p)
{
	kill(p->h.pid, T.signal);
}

/* A stopping signal while serving: the VMM is killed, never left frozen. */
static int
sigterm(const void *arg)
{
	const int *sig = arg;
	struct pair p = { .vargs = { "--linger", "30", NULL }, .during_ms = 1000,
	    .during = send_signal };
	char logged[64];

	T.signal = *sig;
	snprintf(logged, sizeof(logged), "received %s", strsignal(*sig));
	return rejected(&p, 5, logged);
}

static const int sig_term = SIGTERM, sig_hup = SIGHUP, sig_quit = SIGQUIT;

static void
send_sigusr1(struct pair *p)
{
	kill(p->h.pid, SIGUSR1);
}

/* SIGUSR1 prints the counters while serving, and serving goes on. */
static int
sigusr1_counters(const void *arg)
{
	struct pair p = { .vargs = { "--linger", "1", NULL }, .during_ms = 500,
	    .during = send_sigusr1 };
	const char *second;
	int rc;

	(void)arg;
	if ((rc = restored(&p)) != PASS)
		return rc;
	second = strchr(p.hout, '\n');
	if (strncmp(p.hout, "{\"exit_code\":-1,", 16) != 0 || second == NULL ||
	    strncmp(second + 1, "{\"exit_code\":0,", 15) != 0 ||
	    counter(&p, "faults") == 0)
		return pair_fail(&p, "no live counter line before the final one");
	return PASS;
}

static void
truncate_snap(struct pair *p)
{
	if (truncate(p->snap, 4 * 1024 * 1024) < 0)
		fprintf(stderr, "truncate(%s): %s\n", p->snap, strerror(errno));
}

/* The memory file shrinks under a running VM: a clear error, no SIGBUS. */
static int
memfile_truncated(const void *arg)
{
	char copy[160], cmd[512];
	struct pair p = { .snap = copy, .vargs = { "--delay", "500", NULL },
	    .during_ms = 200, .during = truncate_snap };

	(void)arg;
	snprintf(copy, sizeof(copy), "%s/shrinking.mem", T.dir);
	snprintf(cmd, sizeof(cmd), "cp %s %s", T.snap, copy);
	if (system(cmd) != 0)
		return fail("%s failed", cmd);
	return rejected(&p, 1, "shrank from 16777216 to 4194304 bytes");
}

/*
 * Two VMs from one handler, the memory file truncated under both: each
 * session's read of the file takes a SIGBUS. Both VMMs are killed, and the
 * handler survives the second SIGBUS as it did the first (exit 1, not
 * death by signal).
 */
static int
memfile_truncated_two_vms(const void *arg)
{
	char copy[160], cmd[512], *at;
	struct pair p = { .snap = copy, .hargs = { "--max-vms", "2", NULL },
	    .vargs = { "--delay", "500", "--access", "seq", "--threads", "1",
	    NULL }, .during_ms = 200, .during = truncate_snap };
	int n = 0;

	(void)arg;
	snprintf(copy, sizeof(copy), "%s/shrinking2.mem", T.dir);
	snprintf(cmd, sizeof(cmd), "cp %s %s", T.snap, copy);
	if (system(cmd) != 0)
		return fail("%s failed", cmd);
	struct proc v2;

	if (start_two(&p, &v2) < 0)
		return FAIL;
	reap(&v2, 60000);
	finish_pair(&p);
	for (at = p.herr; (at = strstr(at, ": SIGBUS")) != NULL; at++)
		n++;
	if (!exited(&p.h, 1) || !killed(&p.v) || !killed(&v2) || n != 2)
		return pair_fail(&p, "expected both VMMs killed after a SIGBUS each, "
		    "and the handler to exit 1");
	return PASS;
}

/*
 * Hostile handshakes through the real handler: each is rejected with one
 * line saying what and where, exit 4, and the VMM killed.
 */

#define RAW1(f)	"[{\"base_host_virt_addr\":" f "}]"

static const char *const hs_past_2_64[] = { "integer exceeds 2^64-1 at byte 43",
	"--raw", RAW1("18446744073709551616,\"size\":4096,\"offset\":0"), NULL };
static const char *const hs_negative[] = { "negative number in an integer "
	"field at byte 24", "--raw", RAW1("-4096,\"size\":4096,\"offset\":0"), NULL };
static const char *const hs_fraction[] = { "fraction in an integer field at "
	"byte 28", "--raw", RAW1("4096.5,\"size\":4096,\"offset\":0"), NULL };
static const char *const hs_exponent[] = { "exponent in an integer field at "
	"byte 25", "--raw", RAW1("4e3,\"size\":4096,\"offset\":0"), NULL };
static const char *const hs_misaligned[] = { "mapping 0: base_host_virt_addr "
	"0x1001 is not aligned to page size 4096", "--raw",
	RAW1("4097,\"size\":4096,\"offset\":0"), NULL };
static const char *const hs_overlap[] = { "mappings 0 and 1 overlap", "--raw",
	"[{\"base_host_virt_addr\":8192,\"size\":8192,\"offset\":0},"
	"{\"base_host_virt_addr\":12288,\"size\":4096,\"offset\":8192}]", NULL };
static const char *const hs_zero_size[] = { "mapping 0: size is zero", "--raw",
	RAW1("4096,\"size\":0,\"offset\":0"), NULL };
static const char *const hs_page_size[] = { "page size 65536 is neither", "--raw",
	RAW1("65536,\"size\":65536,\"offset\":0,\"page_size\":65536"), NULL };

static int
deep_brackets(const void *arg)
{
	static char json[20100];
	const char *v[] = { "nesting deeper than 32 levels at byte 37", "--raw",
		json, NULL };
	size_t n = (size_t)snprintf(json, sizeof(json), "[{\"x\":");

	(void)arg;
	memset(json + n, '[', 10000);
	memset(json + n + 10000, ']', 10000);
	strcpy(json + n + 20000, "}]");
	return bad_handshake(v);
}

/* 64 regions, blanks and unknown fields of every type: accepted, served. */
static int
padded_64_regions(const void *arg)
{
	struct pair p = { .snap = T.r64, .vargs = { "--regions", "64x1", "--pad",
	    "--threads", "4", NULL } };
	const char *at;
	int rc;

	(void)arg;
	if ((rc = restored(&p)) != PASS)
		return rc;
	if ((at = strstr(p.vout, "handshake: ")) == NULL || atoi(at + 11) <= 8192)
		return pair_fail(&p, "the message was not over 8 KiB");
	return strstr(p.herr, "64 region(s)") ? PASS :
	    pair_fail(&p, "not all 64 regions were taken");
}

/*
 * Diff-snapshot chains: T.snap as the base and three diffs of about 10%
 * each, their dirty runs overlapping, one page in eight written all zero.
 * The VMM checks every page against the chain merged the way
 * snapshot-editor's rebase does it (vmm merge), oldest diff first.
 */
static char chain_file[4][160];
static char *chain_diffs[4];

static int
chain_fixture(void)
{
	char cmd[2048];
	int n = 0;

	for (int i = 0; i < 4; i++)
		snprintf(chain_file[i], sizeof(chain_file[i]), "%s/%s.mem", T.dir,
		    i < 3 ? (const char *[]){ "diff1", "diff2", "diff3" }[i] : "merged");
	for (int i = 0; i < 3; i++)
		chain_diffs[i] = chain_file[i];
	if (access(chain_file[3], F_OK) == 0)
		return 0;
	for (int i = 0; i < 3; i++)
		n += snprintf(cmd + n, sizeof(cmd) - (size_t)n, "%s mkdiff %s %s "
		    "--seed %d >/dev/null && ", T.vmm, T.snap, chain_file[i], i + 1);
	snprintf(cmd + n, sizeof(cmd) - (size_t)n, "%s merge %s %s %s %s %s",
	    T.vmm, chain_file[3], T.snap, chain_file[0], chain_file[1], chain_file[2]);
	if (system(cmd) == 0)
		return 0;
	fail("%s failed", cmd);
	return -1;
}

static int
chain_pair(struct pair *p, const char *const *vargs)
{
	if (chain_fixture() < 0)
		return -1;
	p->base = T.snap;
	p->diffs = chain_diffs;
	p->snap = chain_file[3];
	for (int i = 0; vargs && vargs[i]; i++)
		p->vargs[i] = vargs[i];
	return 0;
}

/* A chain restores exactly like its merged file: with threads, on 2 MiB
 * pages (a page put together from blocks of several layers), under a
 * balloon that removes pages while writes and faults race. */
static int
chain_restore(const void *arg)
{
	const char *const *v = arg;
	struct pair p = { 0 };
	int rc;

	if (chain_pair(&p, v) < 0)
		return FAIL;
	if (v && strcmp(v[0], "--huge") == 0 && huge_reserve(12) < 0)
		return skip("cannot reserve 12 hugetlb pages of 2 MiB");
	if ((rc = restored(&p)) != PASS)
		return rc;
	return strstr(p.herr, "4 layers of 16777216 bytes") ? PASS :
	    pair_fail(&p, "the chain was not taken as 4 layers");
}

static const char *const ch_threads[] = { "--threads", "4", NULL };
static const char *const ch_huge[] = { "--huge", NULL };
static const char *const ch_balloon[] = { "--balloon", "during", "--access",
	"rand", "--write", NULL };
static const char *const ch_balloon_huge[] = { "--huge", "--balloon", "during",
	"--access", "seq", NULL };

/*
 * The chain across the oracle's configurations, cell by cell: page size,
 * access order, reads or writes, no balloon or one removing pages while the
 * guest runs. Every page is checked against the merged chain as modified
 * by the guest. The first cell that fails names itself.
 */
static int
chain_cells(const void *arg)
{
	static const char *const access[] = { "seq", "rand", "ws10" };
	static const char *const balloon[] = { "none", "during" };
	int huge_ok = huge_reserve(12) == 0, cells = 0;

	(void)arg;
	for (int pg = 0; pg < 2; pg++)
		for (int a = 0; a < 3; a++)
			for (int w = 0; w < 2; w++)
				for (int b = 0; b < 2; b++) {
					struct pair p = { .vmm_ms = 20000 };
					const char *v[] = { "--access", access[a], "--balloon",
						balloon[b], w ? "--write" : pg ? "--huge" : NULL,
						w && pg ? "--huge" : NULL, NULL };
					if (pg && !huge_ok)
						continue;
					if (chain_pair(&p, v) < 0)
						return FAIL;
					run_pair(&p);
					if (!exited(&p.v, 0) || !exited(&p.h, 0)) {
						char what[128];

						snprintf(what, sizeof(what), "cell %s %s %s balloon "
						    "%s", pg ? "2m" : "4k", access[a], w ? "write" :
						    "read", balloon[b]);
						return pair_fail(&p, what);
					}
					cells++;
				}
	printf("  %d cells%s\n", cells, huge_ok ? "" : " (no hugetlb pages: 4k only)");
	return huge_ok ? PASS : skip("cannot reserve 12 hugetlb pages of 2 MiB: "
	    "the 4k cells passed");
}

/* Two VMs from one handler share the chain. */
static int
chain_two_vms(const void *arg)
{
	struct pair p = { .hargs = { "--max-vms", "2", NULL } };

	(void)arg;
	if (chain_pair(&p, NULL) < 0)
		return FAIL;
	return cell_two_vms(&p);
}

/* --populate all --detach over a chain: every page in, then let go. */
static int
chain_populate_detach(const void *arg)
{
	struct pair p = { .hargs = { "--populate", "all", "--detach", NULL } };
	static const char *const v[] = { "--delay", "1500", "--threads", "2", NULL };

	(void)arg;
	if (chain_pair(&p, v) < 0)
		return FAIL;
	run_pair(&p);
	if (!exited(&p.v, 0) || !exited(&p.h, 0))
		return pair_fail(&p, "the VM did not verify, or the handler failed");
	return strstr(p.herr, "without a handler") ? PASS :
	    pair_fail(&p, "the handler did not detach");
}

/* --record on a chain, then --populate with the list: no fault at all. */
static int
chain_record_populate(const void *arg)
{
	char list[160];
	struct pair rec = { .hargs = { "--record", list, NULL } };
	struct pair pop = { .hargs = { "--populate", list, NULL } };
	static const char *const v[] = { "--threads", "2", "--delay", "500", NULL };
	int rc;

	(void)arg;
	snprintf(list, sizeof(list), "%s/chain-set.txt", T.dir);
	if (chain_pair(&rec, NULL) < 0 || chain_pair(&pop, v) < 0)
		return FAIL;
	if ((rc = restored(&rec)) != PASS)
		return rc;
	run_pair(&pop);
	if (!exited(&pop.v, 0) || !exited(&pop.h, 0))
		return pair_fail(&pop, "the populated restore failed");
	return counter(&pop, "faults") == 0 ? PASS :
	    pair_fail(&pop, "the recorded pages were not installed first");
}

/* 64 layers: T.snap and 63 diffs of about 1% each. */
static int
chain_64_layers(const void *arg)
{
	static char names[63][160], merged[160], *diffs[64];
	char cmd[16384];
	struct pair p = { .base = T.snap, .diffs = diffs, .snap = merged,
	    .vargs = { "--threads", "2", NULL } };
	int n = 0, rc;

	(void)arg;
	snprintf(merged, sizeof(merged), "%s/merged64.mem", T.dir);
	n = snprintf(cmd, sizeof(cmd), "%s merge %s %s", T.vmm, merged, T.snap);
	for (int i = 0; i < 63; i++) {
		char mk[512];

		snprintf(names[i], sizeof(names[i]), "%s/d64-%d.mem", T.dir, i);
		diffs[i] = names[i];
		snprintf(mk, sizeof(mk), "%s mkdiff %s %s --dirty 1 --seed %d "
		    ">/dev/null", T.vmm, T.snap, names[i], 100 + i);
		if (system(mk) != 0)
			return fail("%s failed", mk);
		n += snprintf(cmd + n, sizeof(cmd) - (size_t)n, " %s", names[i]);
	}
	if (system(cmd) != 0)
		return fail("vmm merge of 64 layers failed");
	if ((rc = restored(&p)) != PASS)
		return rc;
	return strstr(p.herr, "64 layers") ? PASS :
	    pair_fail(&p, "the chain was not taken as 64 layers");
}

static char shrinking[160];

static void
truncate_layer(struct pair *p)
{
	(void)p;
	if (truncate(shrinking, 4 * 1024 * 1024) < 0)
		fprintf(stderr, "truncate(%s): %s\n", shrinking, strerror(errno));
}

/* A diff layer shrinks under a running VM: fatal for it, and named. */
static int
chain_layer_truncated(const void *arg)
{
	char cmd[512], logged[256], *diffs[4];
	struct pair p = { .vargs = { "--delay", "500", NULL }, .during_ms = 200,
	    .during = truncate_layer };

	(void)arg;
	if (chain_pair(&p, NULL) < 0)
		return FAIL;
	/* Only now are the fixture's names set. */
	diffs[0] = chain_diffs[0];
	diffs[1] = chain_diffs[1];
	diffs[2] = shrinking;
	diffs[3] = NULL;
	p.diffs = diffs;
	p.vargs[0] = "--delay";
	p.vargs[1] = "500";
	snprintf(shrinking, sizeof(shrinking), "%s/shrinking-diff.mem", T.dir);
	snprintf(cmd, sizeof(cmd), "cp --sparse=always %s %s", chain_diffs[2],
	    shrinking);
	if (system(cmd) != 0)
		return fail("%s failed", cmd);
	snprintf(logged, sizeof(logged), "memory file %s shrank", shrinking);
	return rejected(&p, 1, logged);
}

/*
 * Bad chains: exit 3 before any VMM, one line naming the file. A layer of
 * another size, a missing one, one named twice, a FIFO, too many.
 */
static int
chain_bad(const void *arg)
{
	char sock[160], short_f[160], fifo[160], err[4096];
	static char *many[260];
	struct proc p;
	int n;
	struct {
		const char *args[5];
		const char *want;
	} cases[] = {
		{ { sock, T.snap, short_f, NULL }, "has 4096 bytes, the base" },
		{ { sock, T.snap, "/nonexistent.mem", NULL }, "open(/nonexistent.mem)" },
		{ { sock, T.snap, chain_file[0], chain_file[0], NULL },
		    "are the same file" },
		{ { sock, T.snap, fifo, NULL }, "is not a regular file" },
	};

	(void)arg;
	if (chain_fixture() < 0)
		return FAIL;
	snprintf(sock, sizeof(sock), "%s/badchain.sock", T.dir);
	snprintf(short_f, sizeof(short_f), "%s/short.mem", T.dir);
	snprintf(fifo, sizeof(fifo), "%s/layer.fifo", T.dir);
	if ((n = open(short_f, O_CREAT | O_WRONLY | O_TRUNC, 0644)) < 0 ||
	    ftruncate(n, 4096) < 0 || close(n) < 0)
		return fail("%s: %s", short_f, strerror(errno));
	if (access(fifo, F_OK) != 0 && mkfifo(fifo, 0600) < 0)
		return fail("mkfifo: %s", strerror(errno));
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		run_handler(cases[i].args, 3000, &p, err, sizeof(err));
		if (!exited(&p, 3) || !strstr(err, cases[i].want) ||
		    strchr(err, '\n') != strrchr(err, '\n'))
			return fail("case %zu: %s, expected exit 3 and one line "
			    "with \"%s\": %s", i, how(&p), cases[i].want, err);
	}
	many[0] = (char *)T.handler;
	many[1] = sock;
	for (n = 2; n < 2 + 256; n++)
		many[n] = (char *)T.snap;
	many[n] = NULL;
	spawn(&p, many, NULL);
	reap(&p, 3000);
	read_text(p.err, err, sizeof(err));
	if (!exited(&p, 3) || !strstr(err, "256 layers: a chain has at most 255"))
		return fail("256 layers: %s: %s", how(&p), err);
	return access(sock, F_OK) != 0 ? PASS : fail("a socket file was left");
}

/* A diff copied without its holes overrides the whole base: warned. */
static int
chain_diff_without_holes(const void *arg)
{
	char full[160], sock[160], cmd[512], err[4096];
	struct proc p;

	(void)arg;
	if (chain_fixture() < 0)
		return FAIL;
	snprintf(full, sizeof(full), "%s/full-diff.mem", T.dir);
	snprintf(sock, sizeof(sock), "%s/fulldiff.sock", T.dir);
	snprintf(cmd, sizeof(cmd), "cp --sparse=never %s %s", chain_file[0], full);
	if (system(cmd) != 0)
		return fail("%s failed", cmd);
	run_handler((const char *[]){ "--accept-timeout", "1", sock, T.snap, full,
	    NULL }, 5000, &p, err, sizeof(err));
	if (!strstr(err, "has no holes") || !strstr(err, full))
		return fail("no warning naming %s: %s", full, err);
	return exited(&p, 3) ? PASS : fail("%s: %s", how(&p), err);
}

/*
 * Many VMs, one handler.
 */

static int
count_fds(pid_t pid)
{
	char cmd[96], out[32] = "";
	FILE *f;

	snprintf(cmd, sizeof(cmd), "ls /proc/%d/fd | wc -l", (int)pid);
	if ((f = popen(cmd, "r")) == NULL || fgets(out, sizeof(out), f) == NULL)
		out[0] = '\0';
	if (f != NULL)
		pclose(f);
	return out[0] ? atoi(out) : -1;
}

/* Starts n VMMs at once against one handler; odd is the one given extra. */
static void
start_vmms(struct proc *v, int n, const char *sock, const char *extra)
{
	for (int i = 0; i < n; i++) {
		char *argv[] = { (char *)T.vmm, "run", (char *)sock, T.snap,
			"--threads", "1", i == n / 2 ? (char *)extra : NULL, NULL };

		spawn(&v[i], argv, NULL);
	}
}

/* Starts n VMMs at once, each staying secs seconds once verified. */
static void
start_lingering(struct proc *v, int n, char *sock, char *secs)
{
	for (int i = 0; i < n; i++) {
		char *argv[] = { (char *)T.vmm, "run", sock, T.snap, "--threads",
			"1", "--linger", secs, NULL };

		spawn(&v[i], argv, NULL);
	}
}

/*
 * 16 VMMs at once from one template, one crashing midway: the other 15
 * verify every byte, the handler then exits 0 and prints 16 counter lines.
 */
static int
many_vms(const void *arg)
{
	struct pair p = { .hargs = { "--max-vms", "16", NULL } };
	const char *extra = arg ? arg : "--crash";
	struct proc v[16];
	char *line;
	int lines = 0;

	if (start_handler(&p) < 0)
		return FAIL;
	start_vmms(v, 16, p.sock, extra);
	for (int i = 0; i < 16; i++) {
		reap(&v[i], 60000);
		if (i == 8 ? !killed(&v[i]) : !exited(&v[i], 0)) {
			reap(&p.h, 10000);
			read_text(p.h.err, p.herr, sizeof(p.herr));
			return fail("VMM %d: %s\n%s", i, how(&v[i]), p.herr);
		}
	}
	reap(&p.h, 10000);
	read_text(p.h.out, p.hout, sizeof(p.hout));
	read_text(p.h.err, p.herr, sizeof(p.herr));
	for (line = p.hout; (line = strchr(line, '\n')) != NULL; line++)
		lines++;
	if (!exited(&p.h, arg ? 1 : 0) || lines != 16)
		return fail("handler %s, %d counter lines:\n%s", how(&p.h), lines,
		    p.herr);
	return PASS;
}

/* No limit: after 16 VMs came and went the handler holds the fds it held
 * before the first; SIGTERM then ends it with no VM to kill. */
static int
many_vms_no_fd_left(const void *arg)
{
	struct pair p = { .hargs = { "--max-vms", "0", NULL } };
	struct proc v[16];
	int before, after, sbefore, safter;

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	before = count_fds(p.h.pid);
	sbefore = count_fds(server_of(p.h.pid));
	start_vmms(v, 16, p.sock, NULL);
	for (int i = 0; i < 16; i++)
		if (reap(&v[i], 60000) < 0 || !exited(&v[i], 0))
			return fail("VMM %d: %s", i, how(&v[i]));
	usleep(200000);
	after = count_fds(p.h.pid);
	safter = count_fds(server_of(p.h.pid));
	kill(p.h.pid, SIGTERM);
	reap(&p.h, 5000);
	if (before < 0 || after != before || sbefore < 0 || safter != sbefore)
		return fail("fds before the first VM: keeper %d, server %d; after "
		    "16: %d and %d", before, sbefore, after, safter);
	return exited(&p.h, 5) ? PASS : fail("SIGTERM: handler %s", how(&p.h));
}

/*
 * Faults in the world.
 */

static int
wait_text(const char *path, const char *text, int ms)
{
	char buf[4096];

	for (int i = 0; i < ms; i += 2) {
		read_text(path, buf, sizeof(buf));
		if (strstr(buf, text))
			return 0;
		usleep(2000);
	}
	return -1;
}

/* One VMM SIGKILLed a random time after connecting; returns the handler's
 * delay in noticing, or -1 with T.why set. */
static int
kill_once(unsigned *seed, int *in_handshake, int *before_send)
{
	struct pair p = { .hargs = { "--accept-timeout", "1", NULL },
	    .vargs = { "--split", "3", "--balloon", "during", NULL } };
	int delay = (int)(rand_r(seed) % 250);

	if (start_both(&p) < 0 || wait_text(p.v.out, "connected", 2000) < 0) {
		finish_pair(&p);
		pair_fail(&p, "the VMM never connected");
		return -1;
	}
	usleep((useconds_t)delay * 1000);
	kill(p.v.pid, SIGKILL);
	finish_pair(&p);
	/* Killed between connect and send, it was a peer that sent nothing:
	 * not a VMM, so the handler listens on to its accept timeout. */
	if (exited(&p.h, 3) && strstr(p.herr, "hung up")) {
		*before_send += 1;
		return 0;
	}
	if (!exited(&p.h, 0)) {
		char what[64];

		snprintf(what, sizeof(what), "VMM killed %d ms after connecting: "
		    "the handler did not exit 0", delay);
		pair_fail(&p, what);
		return -1;
	}
	*in_handshake += strstr(p.herr, "during the handshake") != NULL;
	return (int)(p.h.ended - p.v.ended);
}

static int
vmm_killed_50_times(const void *arg)
{
	unsigned seed = (unsigned)time(NULL);
	int worst = 0, in_handshake = 0, before_send = 0, ms;

	(void)arg;
	for (int i = 0; i < 50; i++) {
		if ((ms = kill_once(&seed, &in_handshake, &before_send)) < 0)
			return FAIL;
		if (ms > 1000)
			return fail("kill %d: the handler took %d ms to exit", i, ms);
		worst = ms > worst ? ms : worst;
	}
	printf("  50 kills (%d during the handshake, %d before sending): the "
	    "handler exited 0 within %d ms at worst\n", in_handshake,
	    before_send, worst);
	return PASS;
}

/*
 * The lifecycle: peers that send nothing, signals, timeouts, descriptors,
 * exit codes.
 */

static int
connect_to(const char *sock, int flags)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | flags, 0);

	snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/*
 * A process of silent peers: for ms it connects every every_ms and sends
 * nothing, holding up to hold connections (the oldest closed first), then
 * exits 0 (hold is at most 256). The handler must never kill it.
 */
static void
pester(struct proc *p, const char *sock, int ms, int every_ms, int hold)
{
	int fds[256], n = 0;
	int64_t end;

	p->status = -1;
	snprintf(p->out, sizeof(p->out), "%s/%d.out", T.dir, ++T.seq);
	snprintf(p->err, sizeof(p->err), "%s/%d.err", T.dir, T.seq);
	if ((p->pid = fork()) != 0)
		return;
	end = now_ms() + ms;
	while (now_ms() < end) {
		if (n == hold) {
			close(fds[0]);
			memmove(fds, fds + 1, (size_t)--n * sizeof(int));
		}
		if ((fds[n] = connect_to(sock, 0)) >= 0)
			n++;
		usleep((useconds_t)every_ms * 1000);
	}
	_exit(0);
}

/* Starts the test VMM's bench of random first touches against sock. */
static void
spawn_bench(struct proc *v, const char *sock)
{
	char *argv[] = { (char *)T.vmm, "bench", (char *)sock, T.big,
		"--backend", "uffd", "--workload", "rand2", "--regions", "32,16,16",
		NULL };

	spawn(v, argv, NULL);
}

/* Its worst first-touch latency in us, or -1. */
static double
bench_worst_us(struct proc *v, char *out, size_t cap)
{
	const char *at;

	reap(v, 60000);
	read_text(v->out, out, cap);
	if (!exited(v, 0) || (at = strstr(out, "\"max_us\":")) == NULL)
		return -1;
	return atof(at + 9);
}

static void
stop_handler(struct pair *p, int sig)
{
	kill(p->h.pid, sig);
	reap(&p->h, 10000);
	read_text(p->h.out, p->hout, sizeof(p->hout));
	read_text(p->h.err, p->herr, sizeof(p->herr));
}

/*
 * A VM faulting randomly while silent peers connect every 20 ms and linger
 * past --handshake-timeout: its worst first touch stays far below what a
 * handshake read in line would cost (a second here), and no peer is
 * killed. The same VM alone, first, gives the figure to compare with.
 */
static int
silent_peers_during_serving(const void *arg)
{
	struct pair p = { .snap = T.big, .hargs = { "--max-vms", "0",
	    "--handshake-timeout", "1", NULL } };
	struct proc silent, v;
	char out[1024];
	double quiet, busy;

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	spawn_bench(&v, p.sock);
	quiet = bench_worst_us(&v, out, sizeof(out));
	spawn_bench(&v, p.sock);
	usleep(20000);
	pester(&silent, p.sock, 3000, 20, 60);
	busy = bench_worst_us(&v, out, sizeof(out));
	reap(&silent, 10000);
	stop_handler(&p, SIGTERM);
	printf("  worst first touch of 16384 random pages: %.0f us alone, %.0f us "
	    "with silent peers\n", quiet, busy);
	if (quiet < 0 || busy < 0)
		return pair_fail(&p, out);
	if (!exited(&silent, 0))
		return pair_fail(&p, "the silent peers were killed");
	if (!strstr(p.herr, "was silent past --handshake-timeout"))
		return pair_fail(&p, "no silent peer timed out");
	if (busy > 100000)
		return pair_fail(&p, "silent peers held up serving");
	return exited(&p.h, 5) ? PASS : pair_fail(&p, "SIGTERM did not end it");
}

/*
 * One-VM mode: a peer that connects and waits past --handshake-timeout and
 * one that hangs up at once are closed, not killed, and the handler goes on
 * listening for the VMM, which it then serves; waiting costs no CPU.
 */
static int
silent_peers_then_vmm(const void *arg)
{
	struct pair p = { .hargs = { "--handshake-timeout", "1", NULL } };
	struct proc silent;
	long cpu_ms;

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	pester(&silent, p.sock, 1, 0, 1);
	reap(&silent, 5000);
	pester(&silent, p.sock, 1500, 2000, 1);
	reap(&silent, 5000);
	spawn_vmm(&p, &p.v);
	finish_pair(&p);
	if (!exited(&silent, 0))
		return pair_fail(&p, "a silent peer was killed");
	if (!exited(&p.v, 0) || !exited(&p.h, 0))
		return pair_fail(&p, "the VMM after the silent peers was not served");
	if (!strstr(p.herr, "hung up") ||
	    !strstr(p.herr, "was silent past --handshake-timeout"))
		return pair_fail(&p, "the log does not name both silent peers");
	cpu_ms = (p.h.ru.ru_utime.tv_sec + p.h.ru.ru_stime.tv_sec) * 1000 +
	    (p.h.ru.ru_utime.tv_usec + p.h.ru.ru_stime.tv_usec) / 1000;
	return cpu_ms < 300 ? PASS : pair_fail(&p, "the wait used CPU");
}

/* A second handler on a live socket exits 3; its probe leaves the first,
 * which then serves the VMM, undisturbed. */
static int
second_instance(const void *arg)
{
	struct pair p = { 0 };
	char *argv[] = { (char *)T.handler, p.sock, T.snap, NULL };
	struct proc second;
	char err[2048];

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	spawn(&second, argv, NULL);
	reap(&second, 5000);
	read_text(second.err, err, sizeof(err));
	usleep(100000);
	spawn_vmm(&p, &p.v);
	finish_pair(&p);
	if (!exited(&second, 3) || !strstr(err, "another process is listening"))
		return fail("the second handler: %s: %s", how(&second), err);
	if (!exited(&p.v, 0) || !exited(&p.h, 0))
		return pair_fail(&p, "the first handler did not serve the VMM");
	return strstr(p.herr, "hung up") ? PASS :
	    pair_fail(&p, "the probe was not seen as a peer that sent nothing");
}

static int
alive(const struct proc *p)
{
	siginfo_t si = { 0 };

	return p->status == -1 && waitid(P_PID, (id_t)p->pid, &si,
	    WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == 0;
}

/*
 * A VM served, a VMM whose handshake stops halfway and a silent peer, all
 * at once: SIGUSR1 prints the served VM's counters and ends nothing;
 * SIGTERM then kills both VMMs, leaves the silent peer alone, removes the
 * socket and exits 5.
 */
static int
signals_during_handshake(const void *arg)
{
	struct pair p = { .hargs = { "--max-vms", "0", "--handshake-timeout",
	    "30", NULL }, .vargs = { "--linger", "30", NULL } };
	struct pair half = { .vargs = { "--raw", "[{\"base_host_virt_addr\":",
	    NULL } };
	struct proc silent;

	(void)arg;
	if (start_both(&p) < 0 || wait_text(p.v.out, "verified", 10000) < 0)
		return pair_fail(&p, "the first VM was not served");
	snprintf(half.sock, sizeof(half.sock), "%s", p.sock);
	spawn_vmm(&half, &half.v);
	pester(&silent, p.sock, 1500, 1000, 1);
	if (wait_text(half.v.out, "connected", 2000) < 0)
		return pair_fail(&p, "the second VMM did not connect");
	usleep(300000);
	kill(p.h.pid, SIGUSR1);
	usleep(300000);
	if (!alive(&p.v) || !alive(&half.v) || !alive(&p.h))
		return pair_fail(&p, "SIGUSR1 ended something");
	read_text(p.h.out, p.hout, sizeof(p.hout));
	if (strncmp(p.hout, "{\"exit_code\":-1,", 16) != 0)
		return pair_fail(&p, "SIGUSR1 printed no counters");
	stop_handler(&p, SIGTERM);
	reap(&p.v, 5000);
	reap(&half.v, 5000);
	reap(&silent, 5000);
	if (!exited(&p.h, 5) || !killed(&p.v) || !killed(&half.v))
		return pair_fail(&p, "SIGTERM did not kill both VMMs with exit 5");
	if (!exited(&silent, 0))
		return pair_fail(&p, "the silent peer was killed");
	return access(p.sock, F_OK) != 0 ? PASS :
	    pair_fail(&p, "the socket file was left behind");
}

/* --accept-timeout with --max-vms: exit 3 when no VMM ever came; 0 one
 * idle period after the last VM, when all went well. */
static int
accept_timeout_many(const void *arg)
{
	struct pair p = { .hargs = { "--max-vms", "0", "--accept-timeout", "1",
	    NULL } };

	if (arg == NULL) {
		start_pair(&p);
		reap(&p.h, 5000);
		read_text(p.h.err, p.herr, sizeof(p.herr));
		if (!exited(&p.h, 3) || !strstr(p.herr, "no VMM connected within 1 s"))
			return pair_fail(&p, "no exit 3 at the accept timeout");
	} else {
		run_pair(&p);
		finish_pair(&p);
		if (!exited(&p.v, 0) || !exited(&p.h, 0) ||
		    !strstr(p.herr, "no VMM for 1 s"))
			return pair_fail(&p, "no exit 0 an idle second after the VM");
		if (p.h.ended - p.v.ended < 900 || p.h.ended - p.v.ended > 3000)
			return pair_fail(&p, "the idle second was not one");
	}
	return access(p.sock, F_OK) != 0 ? PASS :
	    pair_fail(&p, "the socket file was left behind");
}

/* --handshake-timeout at its maximum, a year: a VMM that stops halfway is
 * still waited for (no overflow into the past), and SIGTERM kills it. */
static int
handshake_timeout_max(const void *arg)
{
	struct pair p = { .hargs = { "--handshake-timeout", "31536000", NULL },
	    .vargs = { "--raw", "[{\"size\":", NULL }, .during_ms = 700,
	    .during = send_signal };

	(void)arg;
	T.signal = SIGTERM;
	return rejected(&p, 5, "received Terminated");
}

/*
 * 100 connections while the handler is stopped all complete: the backlog
 * is not 1. They then hang up having sent nothing, and the VMM after them
 * is served. The connections come from a child: a handler that took them
 * for VMMs would kill their process.
 */
static int
backlog_100(const void *arg)
{
	struct pair p = { 0 };
	struct proc c = { .status = -1 };

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	kill(p.h.pid, SIGSTOP);
	if ((c.pid = fork()) == 0) {
		int ok = 0;

		for (int i = 0; i < 100; i++)
			ok += connect_to(p.sock, SOCK_NONBLOCK) >= 0;
		kill(p.h.pid, SIGCONT);
		usleep(100000);
		_exit(ok == 100 ? 0 : 1);
	}
	reap(&c, 5000);
	kill(p.h.pid, SIGCONT);
	usleep(200000);
	spawn_vmm(&p, &p.v);
	finish_pair(&p);
	if (!exited(&c, 0))
		return pair_fail(&p, "not every connect completed");
	return exited(&p.v, 0) && exited(&p.h, 0) ? PASS :
	    pair_fail(&p, "the VMM after 100 silent peers was not served");
}

/*
 * 20 VMMs connect and send while the handler (--max-vms 1) is stopped: one
 * is served. The others, accepted with it or left in the backlog when the
 * socket closes, would wait forever with their memory registered: each is
 * killed.
 */
static int
backlog_drained_at_limit(const void *arg)
{
	struct pair p = { .vargs = { "--threads", "1", NULL } };
	struct proc v[20];
	int served = 0, killed_n = 0;

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	kill(p.h.pid, SIGSTOP);
	for (int i = 0; i < 20; i++)
		spawn_vmm(&p, &v[i]);
	for (int i = 0; i < 20; i++)
		if (wait_text(v[i].out, "connected", 5000) < 0)
			return fail("VMM %d did not connect", i);
	usleep(300000);
	kill(p.h.pid, SIGCONT);
	for (int i = 0; i < 20; i++) {
		reap(&v[i], 60000);
		served += exited(&v[i], 0);
		killed_n += killed(&v[i]);
	}
	p.v.status = 0;
	finish_pair(&p);
	printf("  20 VMMs at --max-vms 1: %d served, %d killed\n", served, killed_n);
	if (served != 1 || killed_n != 19)
		return pair_fail(&p, "not one VMM served and the others killed");
	if (!exited(&p.h, 4) || !strstr(p.herr, "came after the last VMM"))
		return pair_fail(&p, "no exit 4, or no refusal from the backlog");
	return PASS;
}

static uint64_t
syscr(pid_t pid)
{
	char path[64], buf[512];
	const char *at;

	snprintf(path, sizeof(path), "/proc/%d/io", (int)pid);
	read_text(path, buf, sizeof(buf));
	return (at = strstr(buf, "syscr: ")) ? strtoull(at + 7, NULL, 10) : 0;
}

/*
 * The cost of an event does not grow with the sessions: with 16 VMs idle,
 * a VM faulting one page at a time costs the handler under 3 reads a
 * fault (reading every session's uffd on each wake would cost over 16).
 */
static int
event_cost_16_idle(const void *arg)
{
	struct pair p = { .hargs = { "--max-vms", "0", "--no-optimize", NULL },
	    .vargs = { "--threads", "1", NULL } };
	struct proc idle[16];
	uint64_t r0, reads, faults;
	char pat[48];
	const char *line;

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	start_lingering(idle, 16, p.sock, "30");
	for (int i = 0; i < 16; i++)
		if (wait_text(idle[i].out, "verified", 20000) < 0)
			return fail("idle VMM %d was not served", i);
	r0 = syscr(server_of(p.h.pid));
	spawn_vmm(&p, &p.v);
	reap(&p.v, 60000);
	usleep(100000);
	reads = syscr(server_of(p.h.pid)) - r0;
	stop_handler(&p, SIGTERM);
	for (int i = 0; i < 16; i++)
		reap(&idle[i], 5000);
	snprintf(pat, sizeof(pat), "\"vmm_pid\":%d,\"faults\":", (int)p.v.pid);
	if (!exited(&p.v, 0) || (line = strstr(p.hout, pat)) == NULL)
		return pair_fail(&p, "the active VM was not served");
	faults = strtoull(line + strlen(pat), NULL, 10);
	printf("  %" PRIu64 " faults, %" PRIu64 " reads with 16 VMs idle\n",
	    faults, reads);
	return faults > 1000 && reads < 3 * faults ? PASS :
	    pair_fail(&p, "each event read more than the session it was for");
}

/*
 * RLIMIT_NOFILE 24 (ulimit -n; 9 are the handler's own) and 10 VMMs at
 * once: each is served, or refused and killed, or refused before it sent
 * (its send fails); none is left frozen, the loop does not spin, and a VMM
 * that comes later is served.
 */
static int
fd_exhaustion(const void *arg)
{
	struct pair p = { .handler = "/bin/sh", .hargs = { "-c",
	    "ulimit -n 24 && exec \"$0\" \"$@\"", T.release, "--max-vms", "0",
	    NULL } };
	struct proc v[10];
	int served = 0, refused = 0, lines = 0;
	char verr[1024];

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	start_lingering(v, 10, p.sock, "2");
	for (int i = 0; i < 10; i++) {
		reap(&v[i], 60000);
		read_text(v[i].err, verr, sizeof(verr));
		served += exited(&v[i], 0);
		refused += killed(&v[i]) || (exited(&v[i], 2) && strstr(verr, "sendmsg"));
	}
	spawn_vmm(&p, &p.v);
	reap(&p.v, 60000);
	stop_handler(&p, SIGTERM);
	for (const char *c = p.herr; (c = strchr(c, '\n')) != NULL; c++)
		lines++;
	printf("  10 VMMs at once: %d served, %d refused; %d log lines\n", served,
	    refused, lines);
	if (served + refused != 10 || served == 0 || refused == 0)
		return pair_fail(&p, "a VMM was neither served nor refused");
	if (!strstr(p.herr, "out of file descriptors"))
		return pair_fail(&p, "the log does not name the cause");
	if (lines > 100)
		return pair_fail(&p, "the log grew as if the loop spun");
	return exited(&p.v, 0) && exited(&p.h, 5) ? PASS :
	    pair_fail(&p, "the VMM after the refusals was not served");
}

/*
 * 150 silent peers against a handler with 200 descriptors: past 64 the
 * oldest make room, so they cannot use up the descriptors, and the VMM
 * that comes after them is served.
 */
static int
silent_flood_at_fd_limit(const void *arg)
{
	struct pair p = { .handler = "/bin/sh", .hargs = { "-c",
	    "ulimit -n 200 && exec \"$0\" \"$@\"", T.release,
	    "--handshake-timeout", "30", NULL } };
	struct proc silent;

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	pester(&silent, p.sock, 1500, 2, 150);
	usleep(700000);
	spawn_vmm(&p, &p.v);
	finish_pair(&p);
	reap(&silent, 5000);
	if (!exited(&silent, 0))
		return pair_fail(&p, "the silent peers were killed");
	return exited(&p.v, 0) && exited(&p.h, 0) ? PASS :
	    pair_fail(&p, "the VMM after 150 silent peers was not served");
}

/*
 * RLIMIT_NOFILE 16: the handler's 9 and three silent peers leave one free.
 * A peer that sent nothing gives up its descriptors, and the VMM after them
 * is served rather than refused.
 */
static int
silent_peers_give_way(const void *arg)
{
	struct pair p = { .handler = "/bin/sh", .hargs = { "-c",
	    "ulimit -n 16 && exec \"$0\" \"$@\"", T.release, "--max-vms", "0",
	    "--handshake-timeout", "30", NULL } };
	struct proc silent[3];

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	for (int i = 0; i < 3; i++)
		pester(&silent[i], p.sock, 2000, 2500, 1);
	usleep(300000);
	spawn_vmm(&p, &p.v);
	reap(&p.v, 60000);
	stop_handler(&p, SIGTERM);
	for (int i = 0; i < 3; i++)
		if (reap(&silent[i], 5000) < 0 || !exited(&silent[i], 0))
			return pair_fail(&p, "a silent peer was killed");
	read_text(p.v.out, p.vout, sizeof(p.vout));
	if (!exited(&p.v, 0) || !strstr(p.herr, "made room: out of descriptors"))
		return pair_fail(&p, "the VMM was not served in a silent peer's place");
	return exited(&p.h, 5) ? PASS : pair_fail(&p, "SIGTERM did not end it");
}

/* --record onto a FIFO nobody reads: a setup error at once, not a start
 * that hangs in open() with signals unanswered. */
static int
record_fifo_no_reader(const void *arg)
{
	char fifo[160], sock[160], err[2048];
	struct proc p;

	(void)arg;
	snprintf(fifo, sizeof(fifo), "%s/record.fifo", T.dir);
	snprintf(sock, sizeof(sock), "%s/fifo.sock", T.dir);
	if (mkfifo(fifo, 0600) < 0)
		return fail("mkfifo: %s", strerror(errno));
	run_handler((const char *[]){ "--record", fifo, sock, T.snap, NULL }, 3000,
	    &p, err, sizeof(err));
	if (!exited(&p, 3) || !strstr(err, "open(") || !strstr(err, fifo))
		return fail("%s: %s", how(&p), err);
	return access(sock, F_OK) != 0 ? PASS :
	    fail("the socket file was left behind");
}

/*
 * Setup and its edges: what lies at SOCKET and beside it, handlers starting
 * at once, descriptors and ids at setup, signals before the loop, a record
 * whose reader stalls, population threads with nothing left to claim, and
 * the --populate list's format.
 */

/* spawn, with hook(arg) run in the child just before exec. */
static void
spawn_hooked(struct proc *p, char *const argv[], void (*hook)(const void *),
    const void *arg)
{
	int n = ++T.seq;

	snprintf(p->out, sizeof(p->out), "%s/%d.out", T.dir, n);
	snprintf(p->err, sizeof(p->err), "%s/%d.err", T.dir, n);
	p->status = -1;
	if ((p->pid = fork()) != 0)
		return;
	if (freopen(p->out, "w", stdout) == NULL || freopen(p->err, "w", stderr) == NULL)
		_exit(126);
	hook(arg);
	execv(argv[0], argv);
	_exit(127);
}

/* A file of the user's named SOCKET.PID, the handler's own pid. */
static void
plant_pid_file(const void *arg)
{
	char path[200];
	FILE *f;

	snprintf(path, sizeof(path), "%s.%d", (const char *)arg, (int)getpid());
	if ((f = fopen(path, "w")) == NULL)
		_exit(125);
	fputs("keep", f);
	fclose(f);
}

/* A file beside SOCKET named as a handler might name a socket of its own
 * (SOCKET.PID) is the user's: the handler starts, and leaves it alone. */
static int
socket_pid_named_file_kept(const void *arg)
{
	char sock[160], planted[200], err[4096], buf[8] = "";
	char *argv[] = { (char *)T.handler, sock, T.snap, NULL };
	struct proc p;

	(void)arg;
	snprintf(sock, sizeof(sock), "%s/planted.sock", T.dir);
	spawn_hooked(&p, argv, plant_pid_file, sock);
	snprintf(planted, sizeof(planted), "%s.%d", sock, (int)p.pid);
	if (wait_listening(&p) < 0) {
		reap(&p, 1000);
		read_text(p.err, err, sizeof(err));
		return fail("the handler did not listen: %s: \"%s\"", how(&p), err);
	}
	kill(p.pid, SIGTERM);
	reap(&p, 5000);
	read_text(planted, buf, sizeof(buf));
	read_text(p.err, err, sizeof(err));
	if (!exited(&p, 5) || strcmp(buf, "keep") != 0)
		return fail("%s, %s now holds \"%s\": %s", how(&p), planted, buf, err);
	return PASS;
}

static pid_t pid1_init;

static void
forward_signal(int sig)
{
	kill(pid1_init, sig);
}

/* The handler as pid 1 of a pid namespace of its own, as in a container:
 * the child unshares, waits for its own child, the handler, and passes
 * SIGTERM on to it. */
static void
spawn_pid1(struct proc *p, char *const argv[])
{
	int n = ++T.seq, st;
	pid_t init;

	snprintf(p->out, sizeof(p->out), "%s/%d.out", T.dir, n);
	snprintf(p->err, sizeof(p->err), "%s/%d.err", T.dir, n);
	p->status = -1;
	if ((p->pid = fork()) != 0)
		return;
	if (freopen(p->out, "w", stdout) == NULL || freopen(p->err, "w", stderr) == NULL ||
	    unshare(CLONE_NEWPID) < 0)
		_exit(126);
	if ((init = fork()) == 0) {
		execv(argv[0], argv);
		_exit(127);
	}
	pid1_init = init;
	signal(SIGTERM, forward_signal);
	while (init > 0 && waitpid(init, &st, 0) < 0)
		if (errno != EINTR)
			_exit(126);
	_exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
}

/* 1 once the handler says it listens, 0 once it has exited (not reaped). */
static int
listens_or_exits(const struct proc *p)
{
	char err[4096];

	for (int64_t end = now_ms() + 5000; now_ms() < end; usleep(1000)) {
		read_text(p->err, err, sizeof(err));
		if (strstr(err, "info: listening on"))
			return 1;
		if (!alive(p))
			return 0;
	}
	return 0;
}

/*
 * Handlers started at once on one SOCKET: one listens and is reachable,
 * every other says the socket is taken and exits 3. Eight at a time, for
 * many rounds, since the outcome depends on how they interleave.
 */
#define RACERS	8

enum { AS_IS, AS_PID1, AS_NOBODY };	/* how the racing handlers run */

static void become_nobody(const void *arg);

static int
handlers_at_once(const char *sock, int mode, int stale, int round)
{
	char *argv[] = { (char *)T.handler, (char *)sock, T.snap, NULL };
	static char err[RACERS][2048];
	struct proc h[RACERS];
	int listening = -1, nlistening = 0, fd = -1, bad = 0;

	if (stale) {
		struct sockaddr_un a = { .sun_family = AF_UNIX };

		fd = socket(AF_UNIX, SOCK_STREAM, 0);
		snprintf(a.sun_path, sizeof(a.sun_path), "%s", sock);
		if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ||
		    (mode == AS_NOBODY && chown(sock, 65534, 65534) < 0))
			return fail("round %d: bind(%s): %s", round, sock, strerror(errno));
		close(fd);
	}
	for (int i = 0; i < RACERS; i++)
		if (mode == AS_PID1)
			spawn_pid1(&h[i], argv);
		else if (mode == AS_NOBODY)
			spawn_hooked(&h[i], argv, become_nobody, NULL);
		else
			spawn(&h[i], argv, NULL);
	for (int i = 0; i < RACERS; i++)
		if (listens_or_exits(&h[i])) {
			listening = i;
			nlistening++;
		}
	if (nlistening == 1 && (fd = connect_to(sock, 0)) >= 0)
		close(fd);
	for (int i = 0; i < RACERS; i++) {
		if (alive(&h[i]))
			kill(h[i].pid, SIGTERM);
		reap(&h[i], 5000);
		read_text(h[i].err, err[i], sizeof(err[i]));
		if (i != listening && (!exited(&h[i], 3) ||
		    !strstr(err[i], "another process is listening")))
			bad = i + 1;
	}
	if (nlistening != 1 || fd < 0 || !exited(&h[listening], 5) || bad)
		return fail("round %d: %d listening, %s; one that did not: %s: "
		    "\"%s\"", round, nlistening, fd < 0 ? "not reachable" :
		    "reachable", bad ? how(&h[bad - 1]) : "-", bad ? err[bad - 1] : "");
	return PASS;
}

/* Races of the path's own name show mostly under load: a busy process on
 * one CPU makes the handlers' steps interleave. */
static pid_t
hog_start(void)
{
	cpu_set_t one;
	pid_t hog = fork();

	if (hog != 0)
		return hog;
	CPU_ZERO(&one);
	CPU_SET(0, &one);
	sched_setaffinity(0, sizeof(one), &one);
	for (;;)
		;
}

static void
hog_stop(pid_t hog)
{
	if (hog > 0) {
		kill(hog, SIGKILL);
		waitpid(hog, NULL, 0);
	}
}

static int
socket_handlers_race(const void *arg)
{
	const char *how_ = arg;
	int pid1 = strcmp(how_, "pid1") == 0, stale = !pid1, rc = PASS;
	pid_t hog = -1;
	char sock[160];

	/* 104 bytes: too long for a name of SOCKET with a suffix. */
	if (strcmp(how_, "long") == 0)
		snprintf(sock, sizeof(sock), "%s/%0*d.sock", T.dir,
		    103 - (int)strlen(T.dir) - 6, 0);
	else
		snprintf(sock, sizeof(sock), "%s/race-%s.sock", T.dir, how_);
	if (strcmp(how_, "stale") == 0)
		hog = hog_start();
	for (int i = 0; i < (hog > 0 ? 80 : 20) && rc == PASS; i++) {
		rc = handlers_at_once(sock, pid1 ? AS_PID1 : AS_IS, stale, i);
		unlink(sock);
	}
	hog_stop(hog);
	return rc;
}

static void
limit_fds(const void *arg)
{
	struct rlimit r = { *(const rlim_t *)arg, *(const rlim_t *)arg };

	if (setrlimit(RLIMIT_NOFILE, &r) < 0)
		_exit(125);
}

/*
 * Out of descriptors during setup, at every limit from 6 to 12 with 4
 * layers: never a silent exit. Each start that fails exits 3 with a line
 * naming the call that failed, one of them socket(), and leaves nothing.
 */
static int
socket_emfile_logged(const void *arg)
{
	char sock[160], err[4096];
	char *argv[8] = { (char *)T.handler, sock, T.snap };
	int at_socket = 0;
	struct proc p;

	(void)arg;
	if (chain_fixture() < 0)
		return FAIL;
	for (int i = 0; i < 3; i++)
		argv[3 + i] = chain_diffs[i];
	snprintf(sock, sizeof(sock), "%s/emfile.sock", T.dir);
	for (rlim_t n = 6; n <= 12; n++) {
		spawn_hooked(&p, argv, limit_fds, &n);
		if (wait_text_or_exit(&p, "listening on", 2000) == 0)
			kill(p.pid, SIGTERM);
		reap(&p, 5000);
		read_text(p.err, err, sizeof(err));
		if (exited(&p, 5))
			continue;
		if (!exited(&p, 3) || !strstr(err, strerror(EMFILE)) ||
		    strstr(err, "error: ") == NULL)
			return fail("ulimit -n %d: %s, expected exit 3 and the call "
			    "that failed: \"%s\"", (int)n, how(&p), err);
		at_socket += strstr(err, "socket(AF_UNIX)") != NULL;
		if (access(sock, F_OK) == 0)
			return fail("ulimit -n %d: %s was left behind", (int)n, sock);
	}
	return at_socket ? PASS : fail("no limit made socket() the call that "
	    "failed");
}

static void
become_nobody(const void *arg)
{
	(void)arg;
	if (setgroups(0, NULL) < 0 || setgid(65534) < 0 || setuid(65534) < 0)
		_exit(125);
}

/* A socket made and then refused its owner is removed again. */
static int
socket_chown_fails_removed(const void *arg)
{
	char dir[160], sock[200], err[4096];
	char *argv[] = { (char *)T.handler, "--socket-owner", "0:0", sock, T.snap,
		NULL };
	struct proc p;

	(void)arg;
	snprintf(dir, sizeof(dir), "%s/nobody", T.dir);
	snprintf(sock, sizeof(sock), "%s/owner.sock", dir);
	if ((mkdir(dir, 0777) < 0 && errno != EEXIST) || chmod(dir, 0777) < 0)
		return fail("mkdir(%s): %s", dir, strerror(errno));
	spawn_hooked(&p, argv, become_nobody, NULL);
	reap(&p, 5000);
	read_text(p.err, err, sizeof(err));
	if (!exited(&p, 3) || !strstr(err, "chown("))
		return fail("%s, expected exit 3 naming chown(): \"%s\"", how(&p), err);
	return access(sock, F_OK) != 0 ? PASS : fail("%s was left behind", sock);
}

/* A chain of 255 layers (the base and 254 diffs of 10%, dirty runs of up
 * to 16 pages), which takes a while to map: the window for a signal
 * during setup. */
static char *long_chain[256];

static int
long_chain_fixture(void)
{
	static char names[254][160];
	char cmd[512];

	for (int i = 0; i < 254; i++) {
		snprintf(names[i], sizeof(names[i]), "%s/d255-%d.mem", T.dir, i);
		long_chain[i] = names[i];
		if (access(names[i], F_OK) == 0)
			continue;
		snprintf(cmd, sizeof(cmd), "%s mkdiff %s %s --dirty 10 --seed %d "
		    ">/dev/null", T.vmm, T.snap, names[i], 1000 + i);
		if (system(cmd) != 0)
			return fail("%s failed", cmd);
	}
	return 0;
}

/* Whether the process has a file open whose path contains name. */
static int
has_open(pid_t pid, const char *name)
{
	char dir[64], path[400], link[400];
	struct dirent *e;
	ssize_t n;
	DIR *d;
	int found = 0;

	snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)pid);
	if ((d = opendir(dir)) == NULL)
		return 0;
	while (!found && (e = readdir(d)) != NULL) {
		snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
		if ((n = readlink(path, link, sizeof(link) - 1)) > 0) {
			link[n] = '\0';
			found = strstr(link, name) != NULL;
		}
	}
	closedir(d);
	return found;
}

/* Stops the process once it has a file named name open. */
static int
stop_at_open(pid_t pid, const char *name, int ms)
{
	for (int64_t end = now_ms() + ms; now_ms() < end;)
		if (has_open(pid, name)) {
			kill(pid, SIGSTOP);
			return 0;
		}
	return -1;
}

/*
 * A signal while the chain is being opened and mapped: SIGTERM ends the
 * start with exit 5 and a line saying so, and leaves no socket; SIGUSR1
 * changes nothing, and the handler goes on to listen.
 */
static int
signal_during_setup(const void *arg)
{
	int sig = strcmp(arg, "term") == 0 ? SIGTERM : SIGUSR1;
	char sock[160], err[4096];
	char *argv[260] = { (char *)T.handler, sock, T.snap };
	struct proc p;

	if (long_chain_fixture() < 0)
		return FAIL;
	memcpy(argv + 3, long_chain, 254 * sizeof(char *));
	snprintf(sock, sizeof(sock), "%s/setup-%s.sock", T.dir, (const char *)arg);
	spawn(&p, argv, NULL);
	/* Stopped while it opens its layers, it takes the signal there. */
	if (stop_at_open(p.pid, "/d255-", 5000) < 0) {
		reap(&p, 1000);
		return fail("the handler never opened its layers: %s", how(&p));
	}
	usleep(20000);
	read_text(p.err, err, sizeof(err));
	if (strstr(err, "listening on") || access(sock, F_OK) == 0) {
		kill(p.pid, SIGKILL);
		reap(&p, 1000);
		return fail("the handler was stopped after setup; nothing was tested");
	}
	kill(p.pid, sig);
	kill(p.pid, SIGCONT);
	if (sig == SIGUSR1 && wait_listening(&p) == 0)
		kill(p.pid, SIGTERM);
	reap(&p, 10000);
	read_text(p.err, err, sizeof(err));
	if (!exited(&p, 5) || !strstr(err, "received"))
		return fail("%s, expected exit 5 and a line: \"%s\"", how(&p), err);
	if (sig == SIGTERM && (!strstr(err, "during setup") || strstr(err,
	    "listening on")))
		return fail("SIGTERM did not end the setup: \"%s\"", err);
	if (sig == SIGUSR1 && !strstr(err, "listening on"))
		return fail("SIGUSR1 ended the setup: \"%s\"", err);
	return access(sock, F_OK) != 0 ? PASS : fail("%s was left behind", sock);
}

/* A VMM that dies halfway through its message is no rejected handshake:
 * exit 0, and no line at error level. */
static int
vmm_dies_mid_handshake(const void *arg)
{
	struct pair p = { .vargs = { "--raw", "[{\"base_host_virt_addr\":", NULL } };

	(void)arg;
	for (int i = 0; i < 5; i++) {
		p.h.status = p.v.status = -1;
		if (start_both(&p) < 0 || wait_text(p.v.out, "connected", 5000) < 0) {
			finish_pair(&p);
			return pair_fail(&p, "the VMM never connected");
		}
		/* It sends at once after connecting, and then waits. */
		usleep(50000 + 20000 * (useconds_t)i);
		kill(p.v.pid, SIGKILL);
		finish_pair(&p);
		if (!exited(&p.h, 0) || strstr(p.herr, "error:") ||
		    !strstr(p.herr, "exited during the handshake"))
			return pair_fail(&p, "a VMM dead mid-handshake was taken for a "
			    "rejected one");
	}
	return PASS;
}

/* A reader that opens the FIFO and never reads. */
static void
stalled_reader(struct proc *r, const char *fifo)
{
	r->status = -1;
	if ((r->pid = fork()) != 0)
		return;
	if (open(fifo, O_RDONLY) < 0)
		_exit(1);
	pause();
	_exit(0);
}

/*
 * --record to a FIFO whose reader stalls once the pipe is full: the
 * handler neither freezes nor ignores a stopping signal; it says how many
 * pages it could not write. With a signal it exits 5 at once, without
 * one after the reader took nothing for a second.
 */
static int
record_fifo_stalled(const void *arg)
{
	int sig = arg != NULL;
	char fifo[160];
	struct pair p = { .snap = T.big, .hargs = { "--record", fifo, NULL },
	    .vargs = { "--regions", "32,16,16", NULL } };
	struct proc reader;
	int64_t t0;

	snprintf(fifo, sizeof(fifo), "%s/stalled-%d.fifo", T.dir, sig);
	if (mkfifo(fifo, 0600) < 0)
		return fail("mkfifo: %s", strerror(errno));
	stalled_reader(&reader, fifo);
	usleep(100000);
	if (start_both(&p) < 0)
		return pair_fail(&p, "the handler did not start");
	reap(&p.v, 60000);
	if (!exited(&p.v, 0))
		return pair_fail(&p, "the VM failed");
	usleep(200000);
	t0 = now_ms();
	if (sig)
		kill(p.h.pid, SIGTERM);
	reap(&p.h, 5000);
	kill(reader.pid, SIGKILL);
	reap(&reader, 1000);
	finish_pair(&p);
	if (!exited(&p.h, sig ? 5 : 0) || p.h.ended - t0 > (sig ? 500 : 2000))
		return pair_fail(&p, sig ? "SIGTERM was not honoured at once" :
		    "the stalled record held up the end");
	return strstr(p.herr, "pages lost") ? PASS :
	    pair_fail(&p, "the log does not say what was lost");
}

/*
 * --populate all with no faults: population threads with no step left
 * to claim wait rather than spin, so four threads make about the system
 * calls one does (the counter counts the loop's waits too: with one
 * thread, one a step).
 */
static int
populate_threads_no_spin(const void *arg)
{
	uint64_t calls[2];
	const char *threads[2] = { "1", "4" };

	(void)arg;
	for (int i = 0; i < 2; i++) {
		struct pair p = { .snap = T.big, .hargs = { "--populate", "all",
		    "--threads", threads[i], NULL }, .vargs = { "--regions",
		    "32,16,16", "--delay", "1500", "--threads", "1", NULL } };
		int rc = restored(&p);

		if (rc != PASS && counter(&p, "faults") != 0)
			return rc;
		if (!exited(&p.v, 0) || !exited(&p.h, 0))
			return pair_fail(&p, "the populated restore failed");
		calls[i] = counter(&p, "syscalls");
	}
	printf("  syscalls: %" PRIu64 " with --threads 1, %" PRIu64 " with 4\n",
	    calls[0], calls[1]);
	if (calls[1] > calls[0] + calls[0] / 2)
		return fail("--threads 4 made %" PRIu64 " syscalls against %" PRIu64
		    " for --threads 1: population threads spin", calls[1], calls[0]);
	return PASS;
}

/* The --populate list: CRLF line ends, blank lines and zero padding are
 * fine; a sign, a space, a NUL, a value past 2^64 (strtoull would wrap
 * -4096) or a last line without its newline (a list cut short) is not. */
static int
populate_list_format(const void *arg)
{
	static const char *const bad[] = { "-4096\n", "+4096\n", " 4096\n",
		"18446744073709551616\n", "4096x\n", "0x1000\n", "4096",
		"4096\r" };
	char list[160], sock[160], err[2048];
	struct pair p = { .hargs = { "--populate", list, NULL },
	    .vargs = { "--delay", "500", NULL } };
	struct proc h;
	FILE *f;
	int rc;

	(void)arg;
	snprintf(list, sizeof(list), "%s/list-format.txt", T.dir);
	snprintf(sock, sizeof(sock), "%s/list-format.sock", T.dir);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if ((f = fopen(list, "w")) == NULL)
			return fail("fopen: %s", strerror(errno));
		fprintf(f, "0\n%s", bad[i]);
		fclose(f);
		run_handler((const char *[]){ "--populate", list, sock, T.snap, NULL },
		    5000, &h, err, sizeof(err));
		if (!exited(&h, 3) || !strstr(err, "list-format.txt:2: not a page"))
			return fail("\"%.*s\" was taken: %s: %s", (int)strlen(bad[i]) - 1,
			    bad[i], how(&h), err);
	}
	/* A NUL in a line: no digits-only entry either. */
	if ((f = fopen(list, "w")) == NULL)
		return fail("fopen: %s", strerror(errno));
	fwrite("0\n4096\0abc\n", 1, 12, f);
	fclose(f);
	run_handler((const char *[]){ "--populate", list, sock, T.snap, NULL },
	    5000, &h, err, sizeof(err));
	if (!exited(&h, 3) || !strstr(err, "list-format.txt:2: not a page"))
		return fail("a NUL in an entry was taken: %s: %s", how(&h), err);
	if ((f = fopen(list, "w")) == NULL)
		return fail("fopen: %s", strerror(errno));
	for (int i = 0; i < 4096; i++)
		fprintf(f, "%d%s", i * 4096, i % 2 ? "\r\n" : "\n");
	/* Blank lines, and a long zero-padded entry ended by CRLF. */
	fputs("\n\r\n00000000000000000000000000000000000000000000000000000000"
	    "00000000004096\r\n", f);
	fclose(f);
	if ((rc = restored(&p)) != PASS && counter(&p, "faults") != 0)
		return rc;
	if (!exited(&p.h, 0) || counter(&p, "populated") != 4096)
		return pair_fail(&p, "a list with CRLF and blank lines was not "
		    "installed whole");
	return PASS;
}

/*
 * The exit code of one handler for two VMs, one after the other: the
 * gravest ending, a fatal error over a rejected handshake over 0, in
 * whichever order they came.
 */
struct exit_rule {
	const char *a[4], *b[4];
	int code;
};

static const struct exit_rule rule_rejected = { { NULL }, { "--raw", "[x",
	NULL }, 4 };
static const struct exit_rule rule_fatal = { { "--stray-fault", NULL },
	{ "--raw", "[x", NULL }, 1 };
static const struct exit_rule rule_crash = { { "--crash", NULL }, { NULL }, 0 };

static int
exit_rule(const void *arg)
{
	const struct exit_rule *r = arg;
	struct pair p = { .hargs = { "--max-vms", "2", NULL } };
	struct pair b = { 0 };

	for (int i = 0; r->a[i]; i++)
		p.vargs[i] = r->a[i];
	for (int i = 0; r->b[i]; i++)
		b.vargs[i] = r->b[i];
	if (start_both(&p) < 0)
		return fail("the handler did not start");
	reap(&p.v, 60000);
	snprintf(b.sock, sizeof(b.sock), "%s", p.sock);
	spawn_vmm(&b, &b.v);
	reap(&b.v, 60000);
	finish_pair(&p);
	return exited(&p.h, r->code) ? PASS : pair_fail(&p, "wrong exit code");
}

/* pair_fail, with what valgrind wrote to its log. */
static int
valgrind_fail(const struct pair *p, const char *what, const char *log)
{
	size_t n;

	pair_fail(p, what);
	n = strlen(T.why);
	snprintf(T.why + n, sizeof(T.why) - n, "--- valgrind log:\n%s", log);
	return FAIL;
}

/* Every fd valgrind saw open at exit came from the parent: the line after
 * each "Open file descriptor N:" says "<inherited from parent>". */
static int
fds_closed(const struct pair *p, const char *log)
{
	const char *at = log;

	if (strstr(log, "FILE DESCRIPTORS:") == NULL)
		return valgrind_fail(p, "valgrind printed no fd report", log);
	while ((at = strstr(at, "Open file descriptor")) != NULL) {
		const char *line = strchr(at, '\n');
		const char *end = line ? strchr(line + 1, '\n') : NULL;
		const char *inherited = line ? strstr(line, "<inherited from parent>") : NULL;

		if (inherited == NULL || (end != NULL && inherited > end))
			return valgrind_fail(p, "an fd of the handler's own was open at exit", log);
		at = line;
	}
	return PASS;
}

/*
 * The release binary under valgrind --track-fds: whatever ends the session
 * (the VM exits, is killed mid-serve, sends garbage, faults astray), the
 * handler's teardown closes every fd it opened. Valgrind writes to a log
 * file of its own, named on the command line so that neither VALGRIND_OPTS
 * nor a .valgrindrc can send the report elsewhere.
 */
static int
no_fds_left(const void *arg)
{
	static const char *const ends[][4] = {
		{ "--threads", "2", NULL }, { "--crash", NULL },
		{ "--raw", "garbage", NULL }, { "--stray-fault", NULL },
	};
	static char log[16384];
	char path[160], logopt[200];
	int rc = PASS;

	(void)arg;
	if (access("/usr/bin/valgrind", X_OK) != 0)
		return skip("valgrind is not installed");
	for (size_t i = 0; i < 4 && rc == PASS; i++) {
		struct pair p = { .handler = "/usr/bin/valgrind", .hargs = {
		    "--vgdb=no", "--track-fds=yes", logopt, T.release, NULL } };

		snprintf(path, sizeof(path), "%s/valgrind.%zu", T.dir, i);
		snprintf(logopt, sizeof(logopt), "--log-file=%s", path);
		for (int j = 0; ends[i][j]; j++)
			p.vargs[j] = ends[i][j];
		run_pair(&p);
		if (p.h.status < 0 || !WIFEXITED(p.h.status))
			return pair_fail(&p, "the handler did not exit");
		read_text(path, log, sizeof(log));
		rc = fds_closed(&p, log);
	}
	return rc;
}

/* Fewer 2 MiB pages than the guest needs: a clear error, the VMM killed. */
static int
hugetlb_pool_exhausted(const void *arg)
{
	struct pair p = { .vargs = { "--huge", NULL } };

	(void)arg;
	/* Four free pages for a guest of eight. */
	if (huge_free(4) < 0)
		return skip("cannot set the hugetlb pool");
	return rejected(&p, 1, "hugetlb pool exhausted");
}

/* A one-region snapshot of 16 MiB (eight 2 MiB pages) at path. */
static int
mksnap16(char *path, size_t cap, const char *name)
{
	char cmd[512];

	snprintf(path, cap, "%s/%s", T.dir, name);
	snprintf(cmd, sizeof(cmd), "%s mksnap %s --regions 16 >/dev/null", T.vmm,
	    path);
	return system(cmd) == 0 ? 0 : -1;
}

/*
 * A guest that reads the first 4 of its 8 huge pages in order, with 5
 * pages free in the pool: the window that grows to 4 pages at page 3 runs
 * out of pages at page 5, ahead of the fault. That ends the window, not
 * the VM, whose own pages fit.
 */
static int
hugetlb_readahead_enomem(const void *arg)
{
	char snap[160];
	struct pair p = { .snap = snap, .vargs = { "--regions", "16", "--huge",
	    "--access", "seq", "--threads", "1", "--limit-mib", "8", NULL } };
	int rc;

	(void)arg;
	if (mksnap16(snap, sizeof(snap), "h16.mem") < 0)
		return fail("vmm mksnap failed");
	if (huge_free(5) < 0)
		return skip("cannot set the hugetlb pool");
	if ((rc = restored(&p)) != PASS)
		return rc;
	return counter(&p, "pages_copied") == 5 ? PASS :
	    pair_fail(&p, "not exactly the 5 pages the pool holds were copied");
}

/*
 * The pool runs out inside one region, where the kernel answers the copy
 * with EEXIST rather than ENOMEM: a handler that takes that for "already
 * present" wakes the vCPU into the same fault forever. The VMM must be
 * killed, with the reason.
 */
static int
hugetlb_pool_eexist(const void *arg)
{
	char snap[160];
	int plain = strcmp(arg, "--no-optimize") == 0;
	struct pair p = { .snap = snap, .hargs = { plain ? arg : NULL, NULL },
	    .vargs = { "--regions", "16", "--huge", "--access", "rand",
	    "--threads", "2", NULL }, .vmm_ms = 40000 };

	if (mksnap16(snap, sizeof(snap), "h16.mem") < 0)
		return fail("vmm mksnap failed");
	if (huge_free(4) < 0)
		return skip("cannot set the hugetlb pool");
	return rejected(&p, 1, "hugetlb pool exhausted");
}

/*
 * A pool sized exactly to the guest (8 pages of 2 MiB), the guest touching
 * every page, in random order and in order: every page fits, so nothing
 * may fail. A copy whose source is not mapped in the handler takes a
 * second, temporary page, which the last page does not have.
 */
static int
hugetlb_pool_exact(const void *arg)
{
	char snap[160];
	struct pair p = { .snap = snap, .vargs = { "--regions", "16", "--huge",
	    "--access", arg, "--write", "--threads", "2", NULL } };

	if (mksnap16(snap, sizeof(snap), "h16x.mem") < 0)
		return fail("vmm mksnap failed");
	if (huge_free(8) < 0)
		return skip("cannot set the hugetlb pool");
	return restored(&p);
}

/* A stress run's seconds into secs (UFFD_STRESS_SECONDS, else dflt), and
 * the VMM's time limit that follows: a minute more. */
static int
stress_seconds(char *secs, size_t cap, int dflt)
{
	const char *env = getenv("UFFD_STRESS_SECONDS");
	int s = env && atoi(env) > 0 ? atoi(env) : dflt;

	snprintf(secs, cap, "%d", s);
	return (s + 60) * 1000;
}

/* Random faults, writes and removes with an exact oracle; see vmm.c. */
static int
stress(const void *arg)
{
	char secs[16];
	struct pair p = { .snap = T.big, .vargs = { "--regions", "32,16,16",
	    "--stress", secs, arg, NULL } };
	int rc;

	p.vmm_ms = stress_seconds(secs, sizeof(secs), arg ? 6 : 15);
	if (arg && huge_reserve(36) < 0)
		return skip("cannot reserve 36 hugetlb pages of 2 MiB");
	if ((rc = restored(&p)) != PASS)
		return rc;
	/* A 2 MiB copy takes long enough that a REMOVE rarely catches one. */
	if (counter(&p, "deferred") < (arg ? 10 : 1000))
		return pair_fail(&p, "too few deferrals: EAGAIN barely ran");
	return PASS;
}

/*
 * The oracle against a handler of 1 or 4 serving threads, 4 vCPUs taking
 * faults: removes race faults and writes, and with --populate all the
 * population thread's copies too (it goes on while the VM runs).
 */
struct stress_case {
	const char *threads;
	int huge, populate;
};

static const struct stress_case st_one = { "1", 0, 0 }, st_four = { "4", 0, 0 },
	st_four_huge = { "4", 1, 0 }, st_four_pop = { "4", 0, 1 },
	st_four_pop_huge = { "4", 1, 1 };

static int
stress_threads(const void *arg)
{
	const struct stress_case *c = arg;
	char secs[16];
	struct pair p = { .snap = T.big, .hargs = { "--threads", c->threads,
	    c->populate ? "--populate" : NULL, "all", NULL }, .vargs = {
	    "--regions", "32,16,16", "--stress", secs, "--threads", "4",
	    c->huge ? "--huge" : NULL, NULL } };
	int rc;

	p.vmm_ms = stress_seconds(secs, sizeof(secs), 4);
	if (c->huge && huge_reserve(36) < 0)
		return skip("cannot reserve 36 hugetlb pages of 2 MiB");
	if ((rc = restored(&p)) != PASS)
		return rc;
	if (c->populate && counter(&p, "populated") == 0)
		return pair_fail(&p, "nothing was populated");
	if (counter(&p, "deferred") < (c->huge ? 5 : 100))
		return pair_fail(&p, "too few deferrals: EAGAIN barely ran");
	return PASS;
}

/* The same oracle in two VMs served by one handler at once. */
static int
stress_two_vms(const void *arg)
{
	char secs[16];
	struct pair p = { .snap = T.big, .hargs = { "--max-vms", "2", NULL },
	    .vargs = { "--regions", "32,16,16", "--stress", secs, "--threads",
	    "2", NULL } };
	uint64_t deferred = 0;
	const char *at;
	int rc;

	(void)arg;
	p.vmm_ms = stress_seconds(secs, sizeof(secs), 6);
	if ((rc = cell_two_vms(&p)) != PASS)
		return rc;
	if (!exited(&p.v, 0) || !exited(&p.h, 0))
		return pair_fail(&p, "a VM saw a wrong page, or the handler failed");
	for (at = p.hout; (at = strstr(at, "\"deferred\":")) != NULL; at++)
		deferred += strtoull(at + 11, NULL, 10);
	return deferred >= 1000 ? PASS :
	    pair_fail(&p, "fewer than 1000 deferrals in both VMs together");
}

/* CPU ticks of a process, all its threads. */
static uint64_t
cpu_ticks(pid_t pid)
{
	char path[64], buf[1024];
	const char *at;
	unsigned long ut = 0, st = 0;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	read_text(path, buf, sizeof(buf));
	/* utime and stime: fields 14 and 15, after the parenthesised name. */
	if ((at = strrchr(buf, ')')) != NULL)
		sscanf(at + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
		    &ut, &st);
	return ut + st;
}

/* CPU ticks of the server's threads other than its loop's. */
static uint64_t
worker_ticks(pid_t srv)
{
	char path[64], buf[1024];
	const char *at;
	unsigned long ut = 0, st = 0;

	snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", (int)srv, (int)srv);
	read_text(path, buf, sizeof(buf));
	if ((at = strrchr(buf, ')')) != NULL)
		sscanf(at + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
		    &ut, &st);
	return cpu_ticks(srv) - (ut + st);
}

/*
 * Who serves (see "Threads" in uffd.c): a VM alone is served by the
 * server's loop, its serving threads idle, as with --threads 1; a second
 * VM moves both to the threads, the first in the midst of its faults and
 * REMOVEs. Seen in the CPU ticks of the threads other than the loop's,
 * while each VM runs the stress oracle.
 */
static int
threads_join_second_vm(const void *arg)
{
	struct pair p = { .snap = T.big, .hargs = { "--max-vms", "2", NULL },
	    .vargs = { "--regions", "32,16,16", "--stress", "4", "--threads",
	    "2", NULL } };
	struct proc v2;
	uint64_t all[3], w[3];
	pid_t srv;

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	spawn_vmm(&p, &p.v);
	wait_text(p.h.err, "VMM pid", 3000);
	usleep(300000);
	for (int i = 0; i < 3; i++) {
		if (i == 2)
			usleep(1500000);
		srv = server_of(p.h.pid);
		all[i] = cpu_ticks(srv);
		w[i] = worker_ticks(srv);
		if (i == 0)
			usleep(1500000);
		else if (i == 1)
			spawn_vmm(&p, &v2);
	}
	reap(&v2, 30000);
	finish_pair(&p);
	printf("  alone: %" PRIu64 " of %" PRIu64 " ticks on threads; with a "
	    "second VM: %" PRIu64 " of %" PRIu64 "\n", w[1] - w[0],
	    all[1] - all[0], w[2] - w[1], all[2] - all[1]);
	if (!exited(&p.v, 0) || !exited(&v2, 0) || !exited(&p.h, 0))
		return pair_fail(&p, "a VM saw a wrong page, or the handler failed");
	if (all[1] - all[0] < 10)
		return pair_fail(&p, "the stress gave the server no work to see");
	if (w[1] - w[0] > 2)
		return pair_fail(&p, "threads served a VM that was alone");
	return w[2] - w[1] >= 10 ? PASS :
	    pair_fail(&p, "a second VM did not bring the threads in");
}

/*
 * Restarts: the keeper holds what outlives its server, and a server that
 * dies is replaced by one that adopts every session.
 */

/* Waits for the keeper's server to be one other than last; 0 if none
 * came within ms. */
static pid_t
next_server(pid_t keeper, pid_t last, int ms)
{
	pid_t s = 0;

	for (int64_t end = now_ms() + ms; now_ms() < end; usleep(2000))
		if ((s = server_of(keeper)) != 0 && s != last)
			return s;
	return 0;
}

/*
 * SIGKILLs the keeper's server up to n times at random moments, a random
 * 150 to 900 ms apart, while the VMM v runs; the number killed.
 */
static int
kill_servers(pid_t keeper, int n, unsigned *seed, const struct proc *v)
{
	pid_t s = 0;
	int done = 0;

	for (int i = 0; i < n && alive(v); i++) {
		usleep((useconds_t)(150 + rand_r(seed) % 750) * 1000);
		if ((s = next_server(keeper, s, 2000)) == 0 || !alive(v))
			break;
		kill(s, SIGKILL);
		done++;
	}
	return done;
}

struct crash_cell {
	const char *h[6];		/* handler options */
	const char *vcpus;
	int huge, chain, vms;
};

static const struct crash_cell cr_t1 = { { "--threads", "1" }, "2", 0, 0, 1 },
	cr_t4 = { { "--threads", "4" }, "4", 0, 0, 1 },
	cr_t1_huge = { { "--threads", "1" }, "2", 1, 0, 1 },
	cr_t4_huge = { { "--threads", "4" }, "4", 1, 0, 1 },
	cr_chain = { { "--threads", "4" }, "4", 0, 1, 1 },
	cr_two = { { "--threads", "4", "--max-vms", "2" }, "2", 0, 0, 2 },
	cr_pop = { { "--threads", "4", "--populate", "all" }, "4", 0, 0, 1 },
	cr_pop_huge = { { "--threads", "1", "--populate", "all" }, "2", 1, 0, 1 };

#define CRASH_KILLS	4		/* under the keeper's limit of 5 */

/* The VMM either verified every page, or was killed where the log says
 * its server died reading a REMOVE; 1 for the latter, -1 for neither. */
static int
crash_outcome(const struct pair *p, const struct proc *v)
{
	char pat[128];

	if (exited(v, 0))
		return 0;
	snprintf(pat, sizeof(pat), "VMM pid %d: the server before died while "
	    "reading", (int)v->pid);
	return killed(v) && strstr(p->herr, pat) ? 1 : -1;
}

/* The longest touch the VMM saw (its "touches: max N us" line). */
static long
max_touch_us(const char *vout)
{
	const char *at = strstr(vout, "touches: max ");

	return at ? strtol(at + 13, NULL, 10) : -1;
}

/*
 * The stress oracle (random reads and writes, a balloon racing them)
 * while the server is SIGKILLed at random moments, CRASH_KILLS times:
 * every page right (the oracle) and no VM frozen (its watchdog), and a
 * VMM killed only where the log says why.
 */
static int
crash_oracle(const void *arg)
{
	const struct crash_cell *c = arg;
	char secs[16] = "5", vout[4096];
	struct pair p = { .snap = T.big };
	struct proc v[2];
	unsigned seed = (unsigned)time(NULL) ^ (unsigned)getpid();
	int kills, n = 0, lost = 0, uffd_kept;
	long worst = 0;

	for (int i = 0; i < 6 && c->h[i]; i++)
		p.hargs[i] = c->h[i];
	if (c->chain && chain_pair(&p, NULL) < 0)
		return FAIL;
	if (!c->chain) {
		p.vargs[n++] = "--regions";
		p.vargs[n++] = "32,16,16";
	}
	p.vargs[n++] = "--stress";
	p.vargs[n++] = secs;
	p.vargs[n++] = "--threads";
	p.vargs[n++] = c->vcpus;
	p.vargs[n++] = c->huge ? "--huge" : NULL;
	if (c->huge && huge_reserve(36) < 0)
		return skip("cannot reserve 36 hugetlb pages of 2 MiB");
	if (start_handler(&p) < 0)
		return FAIL;
	for (int i = 0; i < c->vms; i++)
		spawn_vmm(&p, &v[i]);
	/* Firecracker keeps its own copy of the uffd: without it a dead
	 * handler would let faults resolve as zero pages. */
	uffd_kept = wait_text(v[0].out, "connected", 10000) == 0 &&
	    has_open(v[0].pid, "userfaultfd");
	kills = kill_servers(p.h.pid, CRASH_KILLS, &seed, &v[0]);
	for (int i = 0; i < c->vms; i++)
		reap(&v[i], 90000);
	p.v = v[0];
	finish_pair(&p);
	for (int i = 0; i < c->vms; i++) {
		int rc = crash_outcome(&p, &v[i]);

		read_text(v[i].out, vout, sizeof(vout));
		if (rc < 0) {
			p.v = v[i];
			read_text(v[i].err, p.verr, sizeof(p.verr));
			snprintf(p.vout, sizeof(p.vout), "%s", vout);
			return pair_fail(&p, "a VMM saw a wrong page or froze, or was "
			    "killed for no reason the log gives");
		}
		lost += rc;
		worst = max_touch_us(vout) > worst ? max_touch_us(vout) : worst;
	}
	printf("  %d server kills; %d of %d VMs verified, %d killed in a REMOVE "
	    "window; longest touch %ld us\n", kills, c->vms - lost, c->vms, lost,
	    worst);
	if (!uffd_kept)
		return pair_fail(&p, "the test VMM does not keep its own uffd");
	if (kills < 2 && lost < c->vms)
		return pair_fail(&p, "the server was not killed at least twice");
	if (counter_wrapped(&p))
		return pair_fail(&p, "a counter went below zero");
	return exited(&p.h, lost ? 1 : 0) ? PASS :
	    pair_fail(&p, "the handler did not end as its VMs did");
}

/* A server killed while a VMM's handshake arrives in pieces: the next
 * reads it again, from the start, and serves the VM. */
static int
crash_during_handshake(const void *arg)
{
	struct pair p = { .vargs = { "--split", "4", NULL } };
	pid_t s;

	(void)arg;
	if (start_handler(&p) < 0)
		return FAIL;
	s = server_of(p.h.pid);
	spawn_vmm(&p, &p.v);
	if (wait_text(p.v.out, "connected", 5000) < 0)
		return fail("the VMM did not connect");
	usleep(60000);		/* a part or two of four, 50 ms apart */
	kill(s, SIGKILL);
	finish_pair(&p);
	if (!exited(&p.v, 0) || !exited(&p.h, 0))
		return pair_fail(&p, "the VMM was not served across the restart");
	return strstr(p.herr, "starting another") ? PASS :
	    pair_fail(&p, "the server was not restarted");
}

/*
 * A server that dies as soon as it starts, every time (killed here, five
 * times): after 5 deaths in 10 s the keeper fails closed, within that
 * window: the VMM killed, the socket removed, exit 1.
 */
static int
crash_loop_fails_closed(const void *arg)
{
	struct pair p = { .vargs = { "--linger", "30", NULL } };
	pid_t s = 0;
	int64_t t0;
	int kills = 0;

	(void)arg;
	if (start_both(&p) < 0 || wait_text(p.v.out, "verified", 10000) < 0) {
		finish_pair(&p);
		return pair_fail(&p, "the VM was not served");
	}
	t0 = now_ms();
	/* The documented five, each as soon as it is there; then no more:
	 * after that a child may be no server (the sanitizer's leak check
	 * forks one at exit). */
	while (kills < 5 && (s = next_server(p.h.pid, s, 2000)) != 0)
		kills += kill(s, SIGKILL) == 0;
	reap(&p.h, 5000);
	reap(&p.v, 5000);
	finish_pair(&p);
	printf("  %d server deaths; the keeper failed closed %" PRId64 " ms after "
	    "the first\n", kills, p.h.ended - t0);
	if (kills != 5)
		return pair_fail(&p, "fewer than 5 servers came to be killed");
	if (!exited(&p.h, 1) || !killed(&p.v) || !strstr(p.herr, "keeps dying"))
		return pair_fail(&p, "the crash loop did not fail closed");
	if (p.h.ended - t0 > 10000)
		return pair_fail(&p, "it took longer than the documented 10 s");
	return access(p.sock, F_OK) != 0 ? PASS :
	    pair_fail(&p, "the socket file was left behind");
}

/*
 * Upgrades in place (SIGUSR2): the binary at the handler's path replaced,
 * the keeper executes it with its pid and everything it holds.
 */

static char repo_dir[PATH_MAX];		/* the checkout the suite runs in */

/* Puts the file at from in place of the handler's binary at to, as an
 * operator would: a new file renamed over the old. */
static int
install_binary(const char *from, const char *to)
{
	char cmd[2 * PATH_MAX + 64];

	snprintf(cmd, sizeof(cmd), "cp '%s' '%s.new' && mv '%s.new' '%s'", from,
	    to, to, to);
	return system(cmd) == 0 ? 0 : -1;
}

/* The release build of the commit before HEAD, made once, at path; and
 * whether its hand-over and state are this one's (it can take ours). */
static int
previous_build(char path[PATH_MAX], size_t cap, int *same_formats)
{
	static char built[PATH_MAX];
	static int same = -1;
	char cmd[3 * PATH_MAX], dir[128];

	snprintf(dir, sizeof(dir), "%s/prev", T.dir);
	snprintf(path, cap, "%s/build/uffd-handler", dir);
	if (built[0] == '\0') {
		snprintf(cmd, sizeof(cmd), "git clone -q '%s' '%s' && cd '%s' && "
		    "git checkout -q HEAD~1 && grep -q HANDOVER_FORMAT uffd.c && "
		    "./build.sh >/dev/null 2>&1", repo_dir, dir, dir);
		if (system(cmd) != 0) {
			fail("the commit before HEAD has no upgrade in place, or did "
			    "not build: %s", cmd);
			return -1;
		}
		snprintf(cmd, sizeof(cmd), "cd '%s' && for d in HANDOVER_FORMAT "
		    "STATE_LAYOUT; do a=$(grep \"^#define $d\" '%s/uffd.c'); "
		    "b=$(grep \"^#define $d\" uffd.c); [ \"$a\" = \"$b\" ] || exit 1; "
		    "done", dir, repo_dir);
		same = system(cmd) == 0;
		snprintf(built, sizeof(built), "%s", path);
	}
	*same_formats = same;
	return 0;
}

/* The version line a binary prints. */
static void
version_of(const char *bin, char *out, size_t cap)
{
	char cmd[PATH_MAX + 32];
	FILE *f;

	snprintf(cmd, sizeof(cmd), "'%s' --version", bin);
	out[0] = '\0';
	if ((f = popen(cmd, "r")) != NULL) {
		if (fgets(out, (int)cap, f) != NULL)
			out[strcspn(out, "\n")] = '\0';
		pclose(f);
	}
}

/* Replaces the binary and sends SIGUSR2; 0 once the log says want. */
static int
upgrade_to(struct pair *p, const char *path, const char *bin, const char *want)
{
	if (install_binary(bin, path) < 0)
		return -1;
	kill(p->h.pid, SIGUSR2);
	return wait_text(p->h.err, want, 10000);
}

/*
 * The stress oracle while the handler is upgraded from the previous
 * commit's build to this one, and back, each while its VMs fault, write
 * and balloon: every page right, none frozen, the pid kept. Back goes
 * only if the two read each other's hand-over; else it must go back to
 * this one cleanly.
 */
static int
upgrade_oracle(const void *arg)
{
	const struct crash_cell *c = arg;
	char prev[PATH_MAX], path[PATH_MAX + 32], vprev[96], vcur[96], want[256];
	char secs[16] = "5";
	struct pair p = { .snap = T.big, .handler = path };
	struct proc v[2];
	int n = 0, same, lost = 0;

	if (previous_build(prev, sizeof(prev), &same) < 0)
		return FAIL;		/* T.why says why */
	snprintf(path, sizeof(path), "%s/upgrade-bin", T.dir);
	if (install_binary(prev, path) < 0)
		return fail("cannot install %s at %s", prev, path);
	version_of(prev, vprev, sizeof(vprev));
	version_of(T.release, vcur, sizeof(vcur));
	for (int i = 0; i < 6 && c->h[i]; i++)
		p.hargs[i] = c->h[i];
	if (c->chain && chain_pair(&p, NULL) < 0)
		return FAIL;
	if (!c->chain) {
		p.vargs[n++] = "--regions";
		p.vargs[n++] = "32,16,16";
	}
	p.vargs[n++] = "--stress";
	p.vargs[n++] = secs;
	p.vargs[n++] = "--threads";
	p.vargs[n++] = c->vcpus;
	p.vargs[n++] = c->huge ? "--huge" : NULL;
	if (c->huge && huge_reserve(36) < 0)
		return skip("cannot reserve 36 hugetlb pages of 2 MiB");
	if (start_handler(&p) < 0)
		return FAIL;
	for (int i = 0; i < c->vms; i++)
		spawn_vmm(&p, &v[i]);
	usleep(1200000);
	/* Builds that do not read each other's hand-over or state: the
	 * upgrade goes back, the previous build serves on, and the second
	 * upgrade is from it to itself. */
	if (same)
		snprintf(want, sizeof(want), "upgraded from %s to %s", vprev + 13,
		    vcur + 13);
	else
		snprintf(want, sizeof(want), "%s serves on", vprev + 13);
	if (upgrade_to(&p, path, T.release, want) < 0) {
		finish_pair(&p);
		return pair_fail(&p, "the upgrade to this build did not happen");
	}
	usleep(1500000);
	if (same)
		snprintf(want, sizeof(want), "upgraded from %s to %s", vcur + 13,
		    vprev + 13);
	else
		snprintf(want, sizeof(want), "upgraded from %s to %s", vprev + 13,
		    vprev + 13);
	if (upgrade_to(&p, path, prev, want) < 0) {
		finish_pair(&p);
		return pair_fail(&p, "the upgrade back did not go as it should");
	}
	for (int i = 0; i < c->vms; i++)
		reap(&v[i], 90000);
	p.v = v[0];
	finish_pair(&p);
	for (int i = 0; i < c->vms; i++) {
		int rc = crash_outcome(&p, &v[i]);

		if (rc < 0) {
			p.v = v[i];
			read_text(v[i].out, p.vout, sizeof(p.vout));
			read_text(v[i].err, p.verr, sizeof(p.verr));
			return pair_fail(&p, "a VMM saw a wrong page or froze across "
			    "the upgrades");
		}
		lost += rc;
	}
	printf("  %s -> %s -> %s%s; %d of %d VMs verified; longest touch %ld "
	    "us\n", vprev + 13, vcur + 13, vprev + 13, same ? "" : " (formats "
	    "differ: the first went back)", c->vms - lost, c->vms,
	    max_touch_us(p.vout));
	return exited(&p.h, lost ? 1 : 0) ? PASS :
	    pair_fail(&p, "the handler did not end as its VMs did");
}

/*
 * Binaries that cannot start under the keeper: missing, not executable,
 * not an ELF file, dynamically linked. Each is refused before the server
 * is touched, with a line; the running version serves on.
 */
static int
upgrade_refused(const void *arg)
{
	static const char *const why[] = { "No such file", "not a 64-bit ELF",
		"not an executable file", "dynamically linked" };
	char path[PATH_MAX + 32], cmd[4 * PATH_MAX];
	struct pair p = { .handler = path, .vargs = { "--linger", "3", NULL } };

	(void)arg;
	snprintf(path, sizeof(path), "%s/refused-bin", T.dir);
	if (install_binary(T.release, path) < 0)
		return fail("cannot install %s", T.release);
	if (start_both(&p) < 0 || wait_text(p.v.out, "verified", 10000) < 0) {
		finish_pair(&p);
		return pair_fail(&p, "the VM was not served");
	}
	for (size_t i = 0; i < sizeof(why) / sizeof(why[0]); i++) {
		snprintf(cmd, sizeof(cmd), i == 0 ? "rm -f '%s'" : i == 1 ?
		    "printf '#!/bin/sh\\n' > '%s' && chmod 755 '%s'" : i == 2 ?
		    "rm -f '%s' && cp /bin/true '%s' && chmod 644 '%s'" :
		    "rm -f '%s' && cp /bin/true '%s'", path, path, path);
		if (system(cmd) != 0)
			return fail("%s failed", cmd);
		kill(p.h.pid, SIGUSR2);
		if (wait_text(p.h.err, why[i], 5000) < 0) {
			finish_pair(&p);
			return pair_fail(&p, "a binary that cannot start was not refused "
			    "with its reason");
		}
	}
	finish_pair(&p);
	if (!exited(&p.v, 0) || !exited(&p.h, 0) || strstr(p.herr, "upgraded"))
		return pair_fail(&p, "the running version did not serve on");
	return PASS;
}

/*
 * An upgrade while the handler listens keeps the socket, the same file,
 * and serves the VMMs that come after it: before the first (arg NULL,
 * --max-vms 1), or between the first and the second (--max-vms 2).
 */
static int
upgrade_keeps_listening(const void *arg)
{
	char path[PATH_MAX + 32];
	struct pair p = { .handler = path, .hargs = { "--max-vms", arg ? "2" : "1",
	    NULL }, .vargs = { arg ? "--linger" : NULL, "2", NULL } };
	struct stat st;
	struct proc v2 = { .status = -2 };

	snprintf(path, sizeof(path), "%s/listen-bin", T.dir);
	if (install_binary(T.release, path) < 0)
		return fail("cannot install %s", T.release);
	if (arg ? start_both(&p) : start_handler(&p)) {
		finish_pair(&p);
		return pair_fail(&p, "the handler did not start");
	}
	stat(p.sock, &p.sock_st);
	if ((arg && wait_text(p.v.out, "verified", 10000) < 0) ||
	    upgrade_to(&p, path, T.release, "upgraded from") < 0) {
		finish_pair(&p);
		return pair_fail(&p, "no upgrade");
	}
	usleep(100000);
	if (stat(p.sock, &st) < 0 || st.st_ino != p.sock_st.st_ino) {
		finish_pair(&p);
		return pair_fail(&p, "the upgrade removed the socket");
	}
	spawn_vmm(&p, arg ? &v2 : &p.v);
	if (arg)
		reap(&v2, 60000);
	finish_pair(&p);
	if (!exited(&p.v, 0) || (arg && !exited(&v2, 0)) || !exited(&p.h, 0))
		return pair_fail(&p, "a VMM after the upgrade was not served");
	return PASS;
}

/*
 * A server that dies in the REMOVE window (build/window stops itself
 * there: a REMOVE read, not yet in the bitmap) is killed: the next server
 * must fail that VM closed with the reason, never serve it on without the
 * REMOVE (its pages would read as snapshot data), and, that VM its only
 * one, end at once.
 */
static int
crash_in_remove_window(const void *arg)
{
	char bin[PATH_MAX + 32];
	struct pair p = { .handler = bin, .vargs = { "--balloon", "during",
	    NULL } };
	pid_t server = 0;
	int stopped = 0;

	(void)arg;
	snprintf(bin, sizeof(bin), "%s/build/window/uffd-handler", repo_dir);
	if (access(bin, X_OK) != 0)
		return fail("no %s (./build.sh test builds it)", bin);
	if (start_both(&p) < 0) {
		finish_pair(&p);
		return pair_fail(&p, "the handler did not start");
	}
	for (int64_t end = now_ms() + 10000; now_ms() < end && !stopped;
	    usleep(2000))
		stopped = (server = server_of(p.h.pid)) > 0 &&
		    proc_state(server) == 'T';
	if (stopped)
		kill(server, SIGKILL);
	finish_pair(&p);
	if (!stopped)
		return pair_fail(&p, "the server never stopped in the window");
	if (!killed(&p.v) || !strstr(p.herr, "a REMOVE it read may be lost"))
		return pair_fail(&p, "a server died in the REMOVE window, and its "
		    "VM was not failed closed with the reason");
	return exited(&p.h, 1) && p.h.ended - p.v.ended < 2000 ? PASS :
	    pair_fail(&p, "the handler did not end within 2 s of its only VM");
}

/*
 * Upgrades one on another: each SIGUSR2 as soon as the one before has
 * executed, so the new server is often told to stop while it is still
 * starting. It must stop as any server does, at a safe point: never be
 * ended as a server breaking the protocol (killed wherever it is), and the
 * VM, faulting, writing and ballooning, sees every page right.
 */
static int
upgrade_upon_upgrade(const void *arg)
{
	char path[PATH_MAX + 32];
	struct pair p = { .handler = path, .hargs = { "--threads", "2", NULL },
	    .vargs = { "--stress", "3", "--threads", "4", NULL } };

	(void)arg;
	snprintf(path, sizeof(path), "%s/again-bin", T.dir);
	if (install_binary(T.release, path) < 0)
		return fail("cannot install %s", T.release);
	if (start_both(&p) < 0) {
		finish_pair(&p);
		return pair_fail(&p, "the handler did not start");
	}
	for (int i = 1; i <= 40; i++) {
		kill(p.h.pid, SIGUSR2);
		if (wait_count(p.h.err, "upgraded from", i, 5000) < 0)
			break;
	}
	finish_pair(&p);
	if (strstr(p.herr, "not what it may send now"))
		return pair_fail(&p, "a server told to stop while starting was "
		    "ended as one breaking the protocol");
	if (!exited(&p.v, 0) || !exited(&p.h, 0) || count_text(p.herr,
	    "upgraded from") < 10)
		return pair_fail(&p, "the VM was not served right through the "
		    "upgrades");
	return PASS;
}

/*
 * A new version that cannot read the hand-over (its format differs: a
 * build of this source with HANDOVER_FORMAT 99) goes back to the binary
 * that wrote it, which serves on; the VM never notices.
 */
static int
upgrade_unreadable_goes_back(const void *arg)
{
	char path[PATH_MAX + 32], f99[PATH_MAX], cmd[4 * PATH_MAX];
	struct pair p = { .handler = path, .vargs = { "--stress", "4", "--threads",
	    "2", NULL } };

	(void)arg;
	snprintf(path, sizeof(path), "%s/back-bin", T.dir);
	snprintf(f99, sizeof(f99), "%s/format99", T.dir);
	snprintf(cmd, sizeof(cmd), "musl-gcc -std=c11 -Os -static "
	    "-DHANDOVER_FORMAT=99 -o '%s' '%s/uffd.c' '%s/json_min.c'", f99,
	    repo_dir, repo_dir);
	if (system(cmd) != 0)
		return fail("%s failed", cmd);
	if (install_binary(T.release, path) < 0)
		return fail("cannot install %s", T.release);
	if (start_both(&p) < 0) {
		finish_pair(&p);
		return pair_fail(&p, "the handler did not start");
	}
	usleep(1000000);
	if (upgrade_to(&p, path, f99, "serves on: the upgrade did not take") < 0) {
		finish_pair(&p);
		return pair_fail(&p, "the version that could not read the hand-over "
		    "did not go back");
	}
	finish_pair(&p);
	if (!strstr(p.herr, "has format 1, this version reads 99"))
		return pair_fail(&p, "the log does not say why it went back");
	return exited(&p.v, 0) && exited(&p.h, 0) ? PASS :
	    pair_fail(&p, "the VM did not verify across the attempt");
}

/*
 * Storage that is slow or cold: a read-only FUSE mount (test/slowfs.c)
 * that delays every read and counts the bytes read through it, over a
 * copy of the 64 MiB snapshot; and the page cache dropped before a run.
 */
static struct {
	char src[160], mnt[160], snap[200];
	pid_t pid;
} SF = { .pid = -1 };

static void
slowfs_down(void)
{
	if (SF.pid <= 0)
		return;
	kill(SF.pid, SIGTERM);
	waitpid(SF.pid, NULL, 0);
	SF.pid = -1;
}

/* Mounts slowfs with delay_us; SKIP (and T.why) without FUSE here. */
static int
slowfs_up(long delay_us)
{
	char slowfs[PATH_MAX + 32], delay[32], out[200], cmd[1024], buf[512];
	char *argv[] = { slowfs, "-d", delay, SF.src, SF.mnt, NULL };

	snprintf(slowfs, sizeof(slowfs), "%s/build/test/slowfs", repo_dir);
	if (access("/dev/fuse", R_OK | W_OK) != 0 || access(slowfs, X_OK) != 0)
		return skip("no FUSE here (/dev/fuse, or build/test/slowfs: "
		    "libfuse3-dev)");
	snprintf(SF.src, sizeof(SF.src), "%s/slowsrc", T.dir);
	snprintf(SF.mnt, sizeof(SF.mnt), "%s/slowmnt", T.dir);
	snprintf(SF.snap, sizeof(SF.snap), "%s/big.mem", SF.mnt);
	snprintf(delay, sizeof(delay), "%ld", delay_us);
	snprintf(cmd, sizeof(cmd), "mkdir -p %s %s && { [ -f %s/big.mem ] || cp "
	    "--sparse=always %s %s/big.mem; }", SF.src, SF.mnt, SF.src, T.big,
	    SF.src);
	if (system(cmd) != 0)
		return fail("%s failed", cmd);
	snprintf(out, sizeof(out), "%s/slowfs.out", T.dir);
	unlink(out);
	if ((SF.pid = fork()) == 0) {
		if (freopen(out, "w", stdout) == NULL)
			_exit(126);
		execv(argv[0], argv);
		_exit(127);
	}
	for (int i = 0; i < 5000; i++, usleep(1000)) {
		read_text(out, buf, sizeof(buf));
		if (strstr(buf, "slowfs: mounted"))
			return PASS;
	}
	slowfs_down();
	return fail("slowfs did not mount: %s", buf);
}

/* Bytes read through the mount so far. */
static uint64_t
slowfs_bytes(void)
{
	char path[200], buf[256];
	const char *at;

	snprintf(path, sizeof(path), "%s/.slowfs", SF.mnt);
	read_text(path, buf, sizeof(buf));
	return (at = strstr(buf, "bytes ")) ? strtoull(at + 6, NULL, 10) : 0;
}

/* The file's pages out of the page cache: the next read goes to storage. */
static int
drop_cache(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC), rc;

	if (fd < 0)
		return -1;
	/* Dirty pages (a file the suite just wrote) are not dropped. */
	rc = fdatasync(fd) < 0 ? -1 : posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	close(fd);
	return rc == 0 ? 0 : -1;
}


/*
 * Two VMs populated (--populate all) from slow storage by four threads,
 * with fewer steps than threads: those with nothing left to claim sleep,
 * whatever the number of VMs queued, and both VMs' population ends (a
 * thread that saw one VM's last step must not sleep while the other has
 * steps). The server's CPU over the population stays a fraction of it.
 */
static int
population_two_vms_slow(const void *arg)
{
	struct pair p = { .hargs = { "--max-vms", "2", "--threads", "4",
	    "--populate", "all", NULL }, .vargs = { "--regions", "2", "--delay",
	    "4000", "--threads", "1", NULL } };
	struct proc v2;
	uint64_t c0, c1;
	int64_t t0, t1;
	int rc;

	(void)arg;
	if ((rc = slowfs_up(100000)) != PASS)
		return rc;
	p.base = SF.snap;
	p.snap = T.big;
	drop_cache(SF.snap);
	if (start_handler(&p) < 0) {
		slowfs_down();
		return FAIL;
	}
	c0 = cpu_ticks(server_of(p.h.pid));
	t0 = now_ms();
	spawn_vmm(&p, &p.v);
	p.vargs[1] = "4";
	spawn_vmm(&p, &v2);
	for (int i = 0; i < 2; i++)
		if (wait_text(p.h.err, i ? "populated" : "VMM pid", 3000) < 0)
			break;
	usleep(2000000);
	c1 = cpu_ticks(server_of(p.h.pid));
	t1 = now_ms();
	reap(&v2, 60000);
	finish_pair(&p);
	slowfs_down();
	printf("  server CPU over %" PRId64 " ms of population: %" PRIu64
	    " ticks\n", t1 - t0, c1 - c0);
	if (!exited(&p.v, 0) || !exited(&v2, 0) || !exited(&p.h, 0))
		return pair_fail(&p, "the VMs were not served");
	if (strstr(p.herr, "populated") == NULL ||
	    strstr(strstr(p.herr, "populated") + 1, "populated") == NULL)
		return pair_fail(&p, "one VM's population never ended");
	return c1 - c0 <= 30 ? PASS : pair_fail(&p, "population threads with "
	    "nothing to claim spun");
}

/* The pair run with its memory file behind slowfs (2 ms a read), its
 * pages dropped first; *read_bytes: what reached storage. */
static int
run_on_slowfs(struct pair *p, uint64_t *read_bytes)
{
	uint64_t b0;
	int rc;

	if ((rc = slowfs_up(2000)) != PASS)
		return rc;
	p->base = SF.snap;
	drop_cache(SF.snap);
	b0 = slowfs_bytes();
	run_pair(p);
	*read_bytes = slowfs_bytes() - b0;
	slowfs_down();
	return PASS;
}

/*
 * A restore from slow storage (every read delayed 2 ms): every page
 * right, and only what the VM touches read from storage: at most 1.5
 * bytes read for a byte installed on a scattered working set (the file's
 * mapping alone reads about 128 KiB around each fault). Sequential
 * access, whose read-ahead pays, is checked for its bytes only.
 */
struct slow_case {
	const char *access, *threads;
	int write;
};

static const struct slow_case sl_ws10 = { "ws10", "4", 0 },
	sl_ws10_write = { "ws10", "4", 1 }, sl_seq = { "seq", "1", 0 },
	sl_ws10_t1 = { "ws10", "1", 0 };

static int
slow_restore(const void *arg)
{
	const struct slow_case *c = arg;
	struct pair p = { .snap = T.big, .hargs = { "--threads", c->threads,
	    NULL }, .vargs = { "--regions", "32,16,16", "--access", c->access,
	    "--end-check", "touched", "--threads", "4", c->write ? "--write" :
	    NULL, NULL } };
	uint64_t read_bytes, copied;
	int rc;

	if ((rc = run_on_slowfs(&p, &read_bytes)) != PASS ||
	    (rc = verified(&p)) != PASS)
		return rc;
	copied = counter(&p, "bytes_copied");
	printf("  %s: %" PRIu64 " KiB read from storage for %" PRIu64 " KiB "
	    "installed (%.2f); %" PRIu64 " faults read their page first\n",
	    c->access, read_bytes / 1024, copied / 1024, copied ?
	    (double)read_bytes / (double)copied : 0.0, counter(&p, "fetched"));
	if (strcmp(c->access, "ws10") == 0 && read_bytes * 2 > copied * 3)
		return pair_fail(&p, "more than 1.5 bytes read for a byte installed");
	if (strcmp(c->access, "ws10") == 0 && counter(&p, "fetched") == 0)
		return pair_fail(&p, "no fault read its page in first");
	return PASS;
}

/* A working set recorded, then replayed with --populate from slow storage
 * while the VM runs from the first instant: every page right, population
 * reads exactly the pages listed. */
static int
slow_replay(const void *arg)
{
	char list[160];
	struct pair rec = { .snap = T.big, .hargs = { "--record", list, NULL },
	    .vargs = { "--regions", "32,16,16", "--access", "ws10",
	    "--end-check", "touched", NULL } };
	struct pair pop = { .snap = T.big, .hargs = { "--populate", list, NULL },
	    .vargs = { "--regions", "32,16,16", "--access", "ws10",
	    "--end-check", "touched", NULL } };
	uint64_t read_bytes, copied;
	int rc;

	(void)arg;
	snprintf(list, sizeof(list), "%s/slow-ws.txt", T.dir);
	if ((rc = restored(&rec)) != PASS ||
	    (rc = run_on_slowfs(&pop, &read_bytes)) != PASS)
		return rc;
	if (!exited(&pop.v, 0) || !exited(&pop.h, 0))
		return pair_fail(&pop, "the replay from slow storage failed");
	copied = counter(&pop, "bytes_copied");
	printf("  replay: %" PRIu64 " pages populated, %" PRIu64 " faults; %"
	    PRIu64 " KiB read for %" PRIu64 " KiB installed\n",
	    counter(&pop, "populated"), counter(&pop, "faults"), read_bytes / 1024,
	    copied / 1024);
	if (counter(&pop, "populated") == 0)
		return pair_fail(&pop, "nothing was populated");
	return read_bytes * 2 <= copied * 3 ? PASS :
	    pair_fail(&pop, "population read more than it installed, by half");
}

static int cold_dropped;

/* The memory file's pages out of the page cache, once the handler has the
 * handshake: the test VMM reads the file whole for its oracle before it,
 * and waits (--delay) after it. */
static void
drop_big(struct pair *p)
{
	cold_dropped = wait_text(p->h.err, "region(s)", 10000) == 0 &&
	    drop_cache(T.big) == 0;
}

/* A restore with the memory file's pages dropped from the page cache
 * while the VM waits to touch its first page, on the local disk: every
 * page right, scattered and in order; scattered faults read their pages
 * in first. */
static int
cold_restore(const void *arg)
{
	struct pair p = { .snap = T.big, .vargs = { "--regions", "32,16,16",
	    "--access", arg, "--threads", "4", "--delay", "500", NULL },
	    .during = drop_big };
	int rc;

	cold_dropped = 0;
	if ((rc = restored(&p)) != PASS)
		return rc;
	if (!cold_dropped)
		return fail("no handshake, or posix_fadvise(%s, DONTNEED) failed",
		    T.big);
	if (strcmp(arg, "rand") == 0 && counter(&p, "fetched") == 0)
		return pair_fail(&p, "no fault waited for a read: the file was "
		    "not cold");
	return PASS;
}

/* A copy of src at dst with a 4 KiB hole punched every 8 pages. */
static int
holed_copy(const char *src, const char *dst)
{
	char cmd[600];
	struct stat st;
	int fd, rc = 0;

	snprintf(cmd, sizeof(cmd), "cp '%s' '%s'", src, dst);
	if (system(cmd) != 0 || (fd = open(dst, O_RDWR)) < 0)
		return -1;
	if (fstat(fd, &st) < 0)
		rc = -1;
	for (off_t at = 7 * 4096; rc == 0 && at < st.st_size; at += 8 * 4096)
		rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, at, 4096);
	close(fd);
	return rc;
}

/*
 * A memory file on an overlay of tmpfs (a container's view of a snapshot
 * in /dev/shm), with holes: its pages are all in memory, and the holes
 * are in no page cache, nor does any read bring them. A sequential
 * restore, whose first windows cross holes, waits for no read.
 */
static int
fetch_overlay_tmpfs_holes(const void *arg)
{
	char lower[128], dir[200], mnt[220], file[260], cmd[2048];
	struct pair p = { .snap = file, .vargs = { "--access", "seq", "--threads",
	    "4", NULL } };
	int rc;

	(void)arg;
	snprintf(lower, sizeof(lower), "/dev/shm/uffd-test-%d", (int)getpid());
	snprintf(dir, sizeof(dir), "%s/overlay%d", T.dir, ++T.seq);
	snprintf(mnt, sizeof(mnt), "%s/m", dir);
	snprintf(file, sizeof(file), "%s/snap.mem", mnt);
	snprintf(cmd, sizeof(cmd), "mkdir -p %s %s/u %s/w %s", lower, dir, dir, mnt);
	snprintf(file, sizeof(file), "%s/snap.mem", lower);
	if (system(cmd) != 0 || holed_copy(T.snap, file) < 0) {
		snprintf(cmd, sizeof(cmd), "rm -rf %s", lower);
		(void)!system(cmd);
		return fail("a holed copy of %s in %s", T.snap, lower);
	}
	snprintf(cmd, sizeof(cmd), "mount -t overlay overlay -o lowerdir=%s,"
	    "upperdir=%s/u,workdir=%s/w %s 2>/dev/null", lower, dir, dir, mnt);
	if (system(cmd) != 0) {
		snprintf(cmd, sizeof(cmd), "rm -rf %s", lower);
		(void)!system(cmd);
		return skip("overlayfs cannot be mounted here");
	}
	snprintf(file, sizeof(file), "%s/snap.mem", mnt);
	rc = restored(&p);
	snprintf(cmd, sizeof(cmd), "umount %s; rm -rf %s", mnt, lower);
	(void)!system(cmd);
	if (rc != PASS)
		return rc;
	return counter(&p, "fetched") == 0 ? PASS : pair_fail(&p,
	    "faults waited for reads of a file that is all in memory");
}

/*
 * The directory's lock: a stopping signal ends the wait for it (no
 * "listening" line, no socket), and a lock held past 5 s is an error,
 * not a race to risk.
 */
static int
socket_dir_lock_held(const void *arg)
{
	char dir[160], sock[200], err[4096];
	char *argv[] = { (char *)T.handler, sock, T.snap, NULL };
	int sig = arg != NULL, fd;
	struct proc p;

	snprintf(dir, sizeof(dir), "%s/locked-%d", T.dir, sig);
	snprintf(sock, sizeof(sock), "%s/s.sock", dir);
	if ((mkdir(dir, 0755) < 0 && errno != EEXIST) ||
	    (fd = open(dir, O_RDONLY | O_DIRECTORY)) < 0 || flock(fd, LOCK_EX) < 0)
		return fail("locking %s: %s", dir, strerror(errno));
	spawn(&p, argv, NULL);
	if (sig) {
		usleep(300000);
		kill(p.pid, SIGTERM);
	}
	reap(&p, sig ? 1000 : 8000);
	close(fd);
	read_text(p.err, err, sizeof(err));
	if (!exited(&p, sig ? 5 : 3) || strstr(err, "listening on") ||
	    (!sig && !strstr(err, "held it for 5 s")))
		return fail("%s with the directory locked%s: \"%s\"", how(&p),
		    sig ? ", then SIGTERM" : "", err);
	return access(sock, F_OK) != 0 ? PASS : fail("%s was left behind", sock);
}

/* Handlers as uid 65534 in a directory they may write but not read: no
 * lock on it can be had, so they lock SOCKET.lock; the race over a stale
 * socket has one winner, as elsewhere. */
static int
socket_race_unreadable_dir(const void *arg)
{
	char dir[160], sock[200];
	int rc = PASS;
	pid_t hog;

	(void)arg;
	snprintf(dir, sizeof(dir), "%s/wx-only", T.dir);
	if ((mkdir(dir, 0300) < 0 && errno != EEXIST) || chown(dir, 65534, 65534) < 0 ||
	    chmod(dir, 0311) < 0)
		return fail("mkdir(%s): %s", dir, strerror(errno));
	snprintf(sock, sizeof(sock), "%s/race.sock", dir);
	hog = hog_start();
	for (int i = 0; i < 80 && rc == PASS; i++) {
		rc = handlers_at_once(sock, AS_NOBODY, 1, i);
		unlink(sock);
	}
	hog_stop(hog);
	return rc;
}

/* --record to a FIFO read 4 KiB at a time, slowly: SIGUSR1 while the
 * record is written changes nothing, and a SIGTERM after it is honoured at
 * once. */
static void
slow_reader(struct proc *r, const char *fifo)
{
	char buf[4096];
	int fd;

	r->status = -1;
	if ((r->pid = fork()) != 0)
		return;
	if ((fd = open(fifo, O_RDONLY)) < 0)
		_exit(1);
	while (read(fd, buf, sizeof(buf)) > 0)
		usleep(500000);
	_exit(0);
}

static int
record_fifo_usr1_then_term(const void *arg)
{
	char fifo[160];
	struct pair p = { .snap = T.big, .hargs = { "--record", fifo, NULL },
	    .vargs = { "--regions", "32,16,16", NULL } };
	struct proc reader;
	int64_t t0;

	(void)arg;
	snprintf(fifo, sizeof(fifo), "%s/slow-reader.fifo", T.dir);
	if (mkfifo(fifo, 0600) < 0)
		return fail("mkfifo: %s", strerror(errno));
	slow_reader(&reader, fifo);
	usleep(100000);
	if (start_both(&p) < 0)
		return pair_fail(&p, "the handler did not start");
	reap(&p.v, 60000);
	usleep(300000);
	kill(p.h.pid, SIGUSR1);
	usleep(500000);
	t0 = now_ms();
	kill(p.h.pid, SIGTERM);
	reap(&p.h, 5000);
	kill(reader.pid, SIGKILL);
	reap(&reader, 1000);
	finish_pair(&p);
	if (!exited(&p.h, 5) || p.h.ended - t0 > 1000)
		return pair_fail(&p, "SIGTERM after SIGUSR1 was not honoured at once");
	return strstr(p.herr, "pages lost") ? PASS :
	    pair_fail(&p, "the log does not say what was lost");
}

/* A --populate list that is a FIFO is refused at once (open does not
 * wait for a writer), as is one that is a directory. */
static int
populate_list_not_regular(const void *arg)
{
	char fifo[160], sock[160], err[2048];
	const char *lists[2] = { fifo, T.dir };
	struct proc p;

	(void)arg;
	snprintf(fifo, sizeof(fifo), "%s/list.fifo", T.dir);
	snprintf(sock, sizeof(sock), "%s/list-fifo.sock", T.dir);
	if (mkfifo(fifo, 0600) < 0 && errno != EEXIST)
		return fail("mkfifo: %s", strerror(errno));
	for (int i = 0; i < 2; i++) {
		run_handler((const char *[]){ "--populate", lists[i], sock, T.snap,
		    NULL }, 3000, &p, err, sizeof(err));
		if (!exited(&p, 3) || !strstr(err, "is not a regular file"))
			return fail("--populate %s: %s: %s", lists[i], how(&p), err);
	}
	return PASS;
}

/* A bounded libFuzzer run over the parser and the region checks. */
static int
fuzz_short(const void *arg)
{
	char cmd[1024], out[8192], *at;
	int rc;

	(void)arg;
	if (access(T.fuzz, X_OK) != 0)
		return skip("no fuzz target built (clang with libFuzzer missing)");
	snprintf(cmd, sizeof(cmd), "cp -r test/corpus %s/corpus && %s "
	    "-max_total_time=5 -dict=test/fuzz.dict %s/corpus > %s/fuzz.log 2>&1",
	    T.dir, T.fuzz, T.dir, T.dir);
	rc = system(cmd);
	snprintf(cmd, sizeof(cmd), "tail -n 40 %s/fuzz.log > %s/fuzz.tail", T.dir,
	    T.dir);
	if (system(cmd) != 0)
		return fail("%s failed", cmd);
	snprintf(cmd, sizeof(cmd), "%s/fuzz.tail", T.dir);
	read_text(cmd, out, sizeof(out));
	if (rc != 0)
		return fail("libFuzzer found something:\n%s", out);
	if ((at = strstr(out, "Done ")) == NULL)
		return fail("libFuzzer did not finish:\n%s", out);
	printf("  fuzz: %.*s\n", (int)strcspn(at, "\n"), at);
	return PASS;
}

/* The keeper's status; the server's threads and how many are under the
 * keeper's, the accepting and the serving filters. */
static void
read_status(struct pair *p)
{
	char path[64];

	char task[4096];
	struct dirent *e;
	DIR *d;

	snprintf(path, sizeof(path), "/proc/%d/status", (int)p->h.pid);
	read_text(path, p->status, sizeof(p->status));
	snprintf(path, sizeof(path), "/proc/%d/task", (int)server_of(p->h.pid));
	if ((d = opendir(path)) == NULL)
		return;
	while ((e = readdir(d)) != NULL) {
		char tpath[400];

		if (e->d_name[0] == '.')
			continue;
		snprintf(tpath, sizeof(tpath), "%s/%s/status", path, e->d_name);
		read_text(tpath, task, sizeof(task));
		p->tasks++;
		p->tasks_2 += strstr(task, "Seccomp_filters:\t3\n") != NULL;
	}
	closedir(d);
}

/* The keeper confines itself from the start, under one filter; its
 * server stacks the accepting one, and once the VMM's handshake is in the
 * serving-only one, on every thread; --no-seccomp turns all off. */
static int
seccomp_status(const void *arg)
{
	struct pair p = { .handler = T.release, .hargs = { arg, NULL },
	    .vargs = { "--linger", "1", NULL }, .during_ms = 400,
	    .during = read_status };
	const char *want = arg ? "Seccomp:\t0\n" : "Seccomp:\t2\n";
	int rc = restored(&p);

	if (rc != PASS)
		return rc;
	if (!strstr(p.status, want))
		return pair_fail(&p, arg ? "confined despite --no-seccomp" :
		    "not confined");
	if (!arg && !strstr(p.status, "Seccomp_filters:\t1\n"))
		return pair_fail(&p, "the keeper is not under its one filter");
	/* The server's loop and its two serving threads (the default),
	 * every one under the three filters. */
	if (!arg && (p.tasks != 3 || p.tasks_2 != 3)) {
		char what[128];

		snprintf(what, sizeof(what), "%d server threads, %d of them under "
		    "three filters; expected 3 and 3", p.tasks, p.tasks_2);
		return pair_fail(&p, what);
	}
	return PASS;
}

/*
 * Operating it: the readiness check, the self-test, the metrics.
 */

/* A fresh jail holding bin as /uffd-handler and nothing else. */
static int
make_jail(char *jail, size_t cap, const char *bin)
{
	char cmd[1024];

	snprintf(jail, cap, "%s/jail%d", T.dir, ++T.seq);
	snprintf(cmd, sizeof(cmd), "mkdir -p %s && cp %s %s/uffd-handler", jail,
	    bin, jail);
	return system(cmd) == 0 ? 0 : -1;
}

/* bin and args, in root if one is given, reaped within 60 s; what it
 * printed in out (standard output, then standard error). */
static void
run_tool(struct proc *p, const char *bin, const char *const args[],
    const char *root, char *out, size_t cap)
{
	char *argv[MAXARG];
	size_t n = 0;

	argv[n++] = (char *)bin;
	for (int i = 0; args[i]; i++)
		argv[n++] = (char *)args[i];
	argv[n] = NULL;
	spawn(p, argv, root);
	reap(p, 60000);
	read_text(p->out, out, cap);
	n = strlen(out);
	read_text(p->err, out + n, cap - n);
}

/* Every piece of text must be in out. */
static int
says(const char *out, const char *const text[])
{
	for (int i = 0; text[i]; i++)
		if (!strstr(out, text[i]))
			return fail("no \"%s\" in:\n%s", text[i], out);
	return PASS;
}

/* On this machine, as root: ready, nothing missing. */
static int
check_ready_here(const void *arg)
{
	struct proc p;
	char out[8192];

	(void)arg;
	run_tool(&p, T.release, (const char *[]){ "--check", NULL }, NULL, out,
	    sizeof(out));
	if (!exited(&p, 0) || strstr(out, "missing"))
		return fail("--check: %s:\n%s", how(&p), out);
	return says(out, (const char *[]){ "ok      kernel: Linux",
	    "ok      userfaultfd: a VMM running as uid 0", "ok      seccomp",
	    "ok      pidfd", "ok      memfd", "ready: a restore can be served",
	    NULL });
}

/*
 * A jailed VMM's uid in an empty chroot: no /proc, no /dev/userfaultfd,
 * so no userfaultfd, and the line names the sysctl and the device node.
 * With the node made in the jail (arg), the same uid is ready.
 */
static int
check_jail_uid_65534(const void *arg)
{
	char jail[160], cmd[512], out[8192];
	struct proc p;

	if (make_jail(jail, sizeof(jail), T.release) < 0)
		return fail("making the jail");
	snprintf(cmd, sizeof(cmd), "mkdir %s/dev && mknod -m 0666 "
	    "%s/dev/userfaultfd c 10 257", jail, jail);
	if (arg && system(cmd) != 0)
		return skip("cannot make /dev/userfaultfd in the jail: %s", cmd);
	run_tool(&p, "/uffd-handler", (const char *[]){ "--check", "--uid",
	    "65534", "--gid", "65534", NULL }, jail, out, sizeof(out));
	if (arg)
		return exited(&p, 0) ? says(out, (const char *[]){
		    "ok      userfaultfd: a VMM running as uid 65534", "ready",
		    NULL }) : fail("--check: %s:\n%s", how(&p), out);
	if (!exited(&p, 6))
		return fail("--check in an empty jail: %s:\n%s", how(&p), out);
	return says(out, (const char *[]){ "missing userfaultfd: Operation "
	    "not permitted; a VMM as uid 65534", "vm.unprivileged_userfaultfd "
	    "is unknown (no /proc here)", "/dev/userfaultfd does not exist here",
	    "mknod ROOT/dev/userfaultfd c 10 257", "note    hugetlb",
	    "not ready: 1 missing", NULL });
}

/* The release binary alone in an empty chroot restores through itself,
 * on 2 MiB pages too when 4 of them can be reserved. */
static int
self_test_chroot_empty(const void *arg)
{
	char jail[160], out[8192], list[512];
	int huge = huge_reserve(4) == 0;
	struct proc p;

	(void)arg;
	if (make_jail(jail, sizeof(jail), T.release) < 0)
		return fail("making the jail");
	run_tool(&p, "/uffd-handler", (const char *[]){ "--self-test", NULL }, jail,
	    out, sizeof(out));
	if (!exited(&p, 0))
		return fail("--self-test: %s:\n%s", how(&p), out);
	snprintf(list, sizeof(list), "ls -A %s | tr '\\n' ' ' > %s/list", jail,
	    T.dir);
	if (system(list) != 0)
		return fail("%s failed", list);
	snprintf(list, sizeof(list), "%s/list", T.dir);
	read_text(list, list, sizeof(list));
	if (strcmp(list, "uffd-handler ") != 0)
		return fail("the self-test left something in the jail: %s", list);
	return says(out, (const char *[]){ "ok      snapshot", "ok      "
	    "restore_4k: 2048 pages of 4 KiB right", huge ? "ok      restore_2m: "
	    "4 pages of 2048 KiB right" : "skip    restore_2m: the hugetlb pool",
	    "ok      handler", "self-test passed", NULL });
}

/* A handler that serves one wrong byte fails the self-test, which names
 * the page. */
static int
self_test_fails_broken_fault_path(const void *arg)
{
	char jail[160], out[16384], bin[PATH_MAX + 32];
	struct proc p;

	(void)arg;
	snprintf(bin, sizeof(bin), "%s/build/broken/uffd-handler", repo_dir);
	if (make_jail(jail, sizeof(jail), bin) < 0)
		return fail("no build/broken/uffd-handler (./build.sh test builds it)");
	run_tool(&p, "/uffd-handler", (const char *[]){ "--self-test", NULL }, jail,
	    out, sizeof(out));
	if (!exited(&p, 1))
		return fail("--self-test of the broken build: %s:\n%s", how(&p), out);
	return says(out, (const char *[]){ "FAIL    restore_4k: 4096-byte page "
	    "at file offset 4096: word 3 reads", "self-test FAILED", NULL });
}

/* The processes of group pgid not yet dead, up to cap; how many. */
static int
group_list(pid_t pgid, struct pinfo *v, int cap)
{
	DIR *d = opendir("/proc");
	struct dirent *e;
	int n = 0;

	while (d != NULL && n < cap && (e = readdir(d)) != NULL) {
		if (e->d_name[0] < '1' || e->d_name[0] > '9')
			continue;
		v[n] = proc_info(atoi(e->d_name));
		if (v[n].state != 0 && v[n].pgrp == pgid && v[n].state != 'Z' &&
		    v[n].state != 'X')
			n++;
	}
	if (d != NULL)
		closedir(d);
	return n;
}

/* The self-test in jail, in a process group that a holder keeps from
 * being orphaned (an orphaned group with a stopped member gets SIGHUP,
 * which the keeper takes as a stopping signal); the self-test's pid. */
static pid_t
self_test_held(const char *jail, pid_t *holder)
{
	int pfd[2];
	pid_t st = -1;

	if (pipe(pfd) < 0 || (*holder = fork()) < 0)
		return -1;
	if (*holder == 0) {
		setpgid(0, 0);
		if ((st = fork()) == 0) {
			int null = open("/dev/null", O_WRONLY);

			dup2(null, STDOUT_FILENO);
			dup2(null, STDERR_FILENO);
			if (chroot(jail) < 0 || chdir("/") < 0)
				_exit(126);
			execl("/uffd-handler", "uffd-handler", "--self-test", (char *)NULL);
			_exit(127);
		}
		(void)!write(pfd[1], &st, sizeof(st));
		for (;;)
			pause();
	}
	setpgid(*holder, *holder);
	if (read(pfd[0], &st, sizeof(st)) != (ssize_t)sizeof(st))
		st = -1;
	close(pfd[0]);
	close(pfd[1]);
	return st;
}

/* Of the group, leaving the holder out: how many live, and (with server)
 * the one that is a grandchild of the self-test: its server. */
static int
self_test_group(pid_t holder, pid_t st, pid_t *server)
{
	struct pinfo v[64];
	int n = group_list(holder, v, 64), live = 0;

	for (int i = 0; i < n; i++) {
		if (v[i].pid == holder)
			continue;
		live++;
		if (server != NULL && v[i].ppid != st && v[i].ppid != holder &&
		    v[i].ppid != 1 && v[i].pid != st)
			*server = v[i].pid;
	}
	return live;
}

/*
 * The self-test killed from outside (a CI job's timeout: SIGKILL, or with
 * arg SIGTERM) while its handler hangs (its server stopped before any VM
 * came): it ends, its keeper and VMs die with it at once, and the server,
 * continued, ends as its VMs are gone. Nothing may be left.
 */
static int
self_test_killed_leaves_nothing(const void *arg)
{
	char jail[160];
	pid_t holder, st, server = 0;
	int live = 0;

	if (make_jail(jail, sizeof(jail), T.release) < 0)
		return fail("making the jail");
	if ((st = self_test_held(jail, &holder)) < 0)
		return fail("starting the self-test: %s", strerror(errno));
	for (int64_t end = now_ms() + 5000; now_ms() < end && server == 0;)
		self_test_group(holder, st, &server);
	if (server == 0 || kill(server, SIGSTOP) < 0) {
		kill(-holder, SIGKILL);
		return fail("the self-test's server never showed");
	}
	usleep(300000);		/* its VMs come, and fault */
	kill(st, arg ? SIGTERM : SIGKILL);
	for (int64_t end = now_ms() + 2000; now_ms() < end; usleep(10000))
		if ((live = self_test_group(holder, st, NULL)) <= 1)
			break;
	kill(server, SIGCONT);
	if (live > 1) {
		kill(-holder, SIGKILL);
		return fail("%d processes of the killed self-test live on 2 s "
		    "later: its keeper and VMs did not die with it", live);
	}
	for (int64_t end = now_ms() + 5000; now_ms() < end; usleep(10000))
		if ((live = self_test_group(holder, st, NULL)) == 0)
			break;
	kill(-holder, SIGKILL);
	return live == 0 ? PASS :
	    fail("the server lives on 5 s after its keeper and VMs died");
}

/* The FROM scratch image: with /dev/userfaultfd passed in, the self-test
 * passes; without, container root lacks CAP_SYS_PTRACE, and both
 * restores are skipped by name and --check names the fix. */
static int
self_test_podman_scratch(const void *arg)
{
	static const char image[] = "localhost/uffd-handler:selftest";
	char cmd[1024], out[8192];
	int rc;

	(void)arg;
	if (access("/usr/bin/podman", X_OK) != 0 || access("/usr/bin/runc", X_OK) != 0)
		return skip("podman or runc is not installed");
	snprintf(cmd, sizeof(cmd), "podman build -q -t %s . > %s/podman.log 2>&1",
	    image, T.dir);
	if (system(cmd) != 0)
		return fail("podman build failed (%s/podman.log)", T.dir);
	for (int dev = 1; dev >= 0; dev--) {
		snprintf(cmd, sizeof(cmd), "podman run --rm --runtime runc --ulimit "
		    "nofile=1024:1024 --ulimit nproc=1024:1024 %s %s --self-test "
		    "> %s/podman.out 2>&1", dev ? "--device /dev/userfaultfd" : "",
		    image, T.dir);
		rc = system(cmd);
		snprintf(cmd, sizeof(cmd), "%s/podman.out", T.dir);
		read_text(cmd, out, sizeof(out));
		if (!WIFEXITED(rc) || WEXITSTATUS(rc) != (dev ? 0 : 6) ||
		    says(out, dev ? (const char *[]){ "ok      restore_4k",
		    "self-test passed", NULL } : (const char *[]){ "skip    "
		    "restore_4k: no userfaultfd here", "skip    restore_2m",
		    "nothing restored", NULL }) != PASS) {
			rc = fail("%s /dev/userfaultfd: status %d:\n%s", dev ? "with" :
			    "without", rc, out);
			break;
		}
		rc = PASS;
	}
	if (system("podman rmi -f localhost/uffd-handler:selftest >/dev/null 2>&1") != 0)
		fprintf(stderr, "run: podman rmi failed\n");
	return rc;
}

/* The aarch64 build under qemu-user, which has no userfaultfd: it says
 * so by name and exits 6, nothing passed off as tested. */
static int
self_test_aarch64_qemu(const void *arg)
{
	char out[8192];
	struct proc p;

	(void)arg;
	if (access("build/aarch64/uffd-handler", X_OK) != 0)
		return skip("no aarch64 cross toolchain (.ci/run installs it)");
	if (access("/usr/bin/qemu-aarch64-static", X_OK) != 0)
		return skip("qemu-user-static is not installed");
	run_tool(&p, "/usr/bin/qemu-aarch64-static", (const char *[]){
	    "build/aarch64/uffd-handler", "--self-test", NULL }, NULL, out,
	    sizeof(out));
	if (!exited(&p, 6))
		return fail("--self-test under qemu: %s:\n%s", how(&p), out);
	return says(out, (const char *[]){ "ok      snapshot", "skip    "
	    "restore_4k: no userfaultfd here", "skip    restore_2m: no "
	    "userfaultfd here", "nothing restored", NULL });
}

/* A value of the .prom text: the line "name value". */
static uint64_t
prom_value(const char *text, const char *name)
{
	char pat[160];
	const char *at;

	snprintf(pat, sizeof(pat), "\n%s ", name);
	if ((at = strstr(text, pat)) == NULL)
		return UINT64_MAX;
	return strtoull(at + strlen(pat), NULL, 10);
}

static int
promtool_ok(const char *path, char *why, size_t cap)
{
	char cmd[512];

	snprintf(cmd, sizeof(cmd), "promtool check metrics < %s > %s.promtool "
	    "2>&1", path, path);
	if (system(cmd) == 0)
		return 1;
	snprintf(cmd, sizeof(cmd), "%s.promtool", path);
	read_text(cmd, why, cap);
	return 0;
}

static const char *const counter_names[] = { "faults", "pages_copied",
	"zero_pages", "zero_data_pages", "memory_saved_bytes", "prefetched",
	"populated", "populate_skipped", "populate_absent", "remove_events",
	"pages_removed", "deferred", "bytes_copied", "already_present",
	"unregistered", "fetched", "syscalls", NULL };

/* The .prom totals are the final counters line's, bucket by bucket. */
static int
prom_matches(struct pair *p, const char *text)
{
	char name[96], why[256];
	uint64_t cum = 0, b[16];
	const char *h = strstr(p->hout, "\"service_us_log2\":[");

	for (int i = 0; counter_names[i]; i++) {
		snprintf(name, sizeof(name), "uffd_handler_%s_total", counter_names[i]);
		if (prom_value(text, name) != counter(p, counter_names[i])) {
			snprintf(why, sizeof(why), "%s is %llu, the counters line says "
			    "%llu", name, (unsigned long long)prom_value(text, name),
			    (unsigned long long)counter(p, counter_names[i]));
			return pair_fail(p, why);
		}
	}
	for (int k = 0; h && k < 16; k++)
		b[k] = strtoull(h + (k ? 0 : 19), (char **)&h, 10), h++;
	for (int k = 0; h && k < 16; k++) {
		cum += b[k];
		if (k < 15)
			snprintf(name, sizeof(name), "uffd_handler_service_seconds_bucket"
			    "{le=\"0.%06u\"}", 1u << k);
		else
			snprintf(name, sizeof(name), "uffd_handler_service_seconds_count");
		if (prom_value(text, name) != cum)
			return pair_fail(p, "a histogram bucket differs from "
			    "service_us_log2");
	}
	return h ? PASS : pair_fail(p, "no service_us_log2 in the counters line");
}

static char metrics_dir[160];

/* During the run: the file as it stands, checked, with the VM's series. */
static void
prom_midway(struct pair *p)
{
	char cmd[512];

	(void)p;
	snprintf(cmd, sizeof(cmd), "cp %s/uffd.prom %s/midway.prom", metrics_dir,
	    metrics_dir);
	if (system(cmd) != 0)
		fprintf(stderr, "run: %s failed\n", cmd);
}

/* The same, the server killed right after. */
static void
prom_midway_kill(struct pair *p)
{
	prom_midway(p);
	kill(server_of(p->h.pid), SIGKILL);
}

/* The same, then an upgrade in place to the same binary. */
static void
prom_midway_upgrade(struct pair *p)
{
	prom_midway(p);
	kill(p->h.pid, SIGUSR2);
	wait_text(p->h.err, "upgraded from", 5000);
}

/*
 * --metrics X.prom: promtool takes the file while the VM runs and at the
 * end, the VM's series carry its pid, the totals are the counters line's,
 * and only the .prom file is left. With arg "kill", the server is killed
 * midway: the figures go on, and the restart is counted. With "upgrade",
 * the release binary is upgraded in place midway: the new image takes the
 * files over and writes on.
 */
static int
metrics_prom(const void *arg)
{
	char path[200], text[65536], mid[65536], why[4096], pat[256];
	char bin[PATH_MAX + 32];
	int upgrade = arg && strcmp(arg, "upgrade") == 0;
	struct pair p = { .hargs = { "--metrics", path, "--metrics-interval", "1",
	    NULL }, .vargs = { "--stress", "3", NULL }, .during_ms = 1500,
	    .during = upgrade ? prom_midway_upgrade : arg ? prom_midway_kill :
	    prom_midway, .handler = upgrade ? bin : NULL };
	int rc;

	snprintf(bin, sizeof(bin), "%s/upgrade-metrics-bin", T.dir);
	if (upgrade && install_binary(T.release, bin) < 0)
		return fail("cannot install %s at %s", T.release, bin);
	snprintf(metrics_dir, sizeof(metrics_dir), "%s/metrics%d", T.dir, ++T.seq);
	snprintf(path, sizeof(path), "%s/uffd.prom", metrics_dir);
	if (mkdir(metrics_dir, 0755) < 0)
		return fail("mkdir(%s): %s", metrics_dir, strerror(errno));
	if ((rc = restored(&p)) != PASS)
		return rc;
	snprintf(pat, sizeof(pat), "%s/midway.prom", metrics_dir);
	read_text(pat, mid, sizeof(mid));
	if (!promtool_ok(pat, why, sizeof(why)))
		return fail("promtool on the file midway: %s\n%s", why, mid);
	snprintf(pat, sizeof(pat), "uffd_handler_vm_faults_total{vmm_pid=\"%d\"} ",
	    (int)p.v.pid);
	if (!strstr(mid, pat) || prom_value(mid, "uffd_handler_vms") != 1)
		return fail("midway, no series of VMM pid %d:\n%s", (int)p.v.pid, mid);
	read_text(path, text, sizeof(text));
	if (!promtool_ok(path, why, sizeof(why)))
		return fail("promtool on the final file: %s\n%s", why, text);
	if (prom_value(text, "uffd_handler_server_restarts_total") !=
	    (arg && !upgrade ? 1 : 0))
		return pair_fail(&p, "the server restarts are not counted right");
	if (upgrade && (!strstr(p.herr, "upgraded from") ||
	    strstr(p.herr, "handed over no metrics")))
		return pair_fail(&p, "the upgrade did not take the metrics over");
	snprintf(pat, sizeof(pat), "%s.tmp", path);
	if (access(pat, F_OK) == 0)
		return pair_fail(&p, "the .tmp file was left behind");
	return prom_matches(&p, text);
}

/* The sum of one JSON field over every line's group (the opening text of
 * the handler's group, or of a VM's: lines without it are left out). */
static uint64_t
json_sum(const char *text, const char *group, const char *key)
{
	char pat[64];
	uint64_t sum = 0;
	int vm = strcmp(group, "\"uffd_handler\":{") != 0;

	snprintf(pat, sizeof(pat), "\"%s\":", key);
	for (const char *l = text; (l = strstr(l, "{\"utc_timestamp_ms\":")); l++) {
		const char *end = strchr(l, '\n'), *g = strstr(l, group), *at;

		if (vm && (g == NULL || (end && g > end)))
			continue;	/* a line after the VM ended */
		if (g == NULL || (at = strstr(g, pat)) == NULL)
			return UINT64_MAX;
		sum += strtoull(at + strlen(pat), NULL, 10);
	}
	return sum;
}

/* --metrics FILE: JSON lines as Firecracker's, counting what was added
 * since the line before: they add up to the final counters line. */
static int
metrics_json_lines(const void *arg)
{
	char path[200], text[65536], why[256];
	struct pair p = { .hargs = { "--metrics", path, "--metrics-interval", "1",
	    NULL }, .vargs = { "--stress", "3", NULL } };
	int rc, lines = 0;

	(void)arg;
	snprintf(path, sizeof(path), "%s/metrics%d.json", T.dir, ++T.seq);
	if ((rc = restored(&p)) != PASS)
		return rc;
	read_text(path, text, sizeof(text));
	for (const char *l = text; *l; l = strchr(l, '\n') + 1, lines++)
		if (strncmp(l, "{\"utc_timestamp_ms\":", 20) != 0 || !strchr(l, '\n') ||
		    strncmp(strchr(l, '\n') - 2, "}}", 2) != 0)
			return fail("not a JSON metrics line: %s", l);
	if (lines < 3 || !strstr(text, "\"vm_"))
		return fail("%d lines, or no VM's group, in %s:\n%s", lines, path, text);
	for (int i = 0; counter_names[i]; i++)
		for (int g = 0; g < 2; g++) {
			const char *group = g ? "\"vm_" : "\"uffd_handler\":{";
			uint64_t sum = json_sum(text, group, counter_names[i]);

			if (sum == counter(&p, counter_names[i]))
				continue;
			snprintf(why, sizeof(why), "the lines' %s add up to %llu in the "
			    "%s group, the counters line says %llu", counter_names[i],
			    (unsigned long long)sum, g ? "VM's" : "handler's",
			    (unsigned long long)counter(&p, counter_names[i]));
			return pair_fail(&p, why);
		}
	return PASS;
}

static void
remove_metrics_dir(struct pair *p)
{
	char cmd[256];

	(void)p;
	snprintf(cmd, sizeof(cmd), "rm -rf %s", metrics_dir);
	if (system(cmd) != 0)
		fprintf(stderr, "run: %s failed\n", cmd);
}

/* A FIFO whose buffer is full and nobody reads: the fd kept open. */
static int
full_fifo(const char *path)
{
	char junk[4096];
	int fd;

	memset(junk, 'x', sizeof(junk));
	if (mkfifo(path, 0644) < 0 || (fd = open(path, O_RDWR | O_NONBLOCK)) < 0)
		return -1;
	while (write(fd, junk, sizeof(junk)) > 0)
		;
	return fd;
}

/* Reads what fd holds into buf (up to cap - 1) until p has exited. */
static size_t
drain_until_exit(int fd, struct proc *p, char *buf, size_t cap)
{
	size_t len = 0;
	ssize_t n;

	for (int64_t end = now_ms() + 60000; now_ms() < end; usleep(5000)) {
		while (len < cap - 1 && (n = read(fd, buf + len, cap - 1 - len)) > 0)
			len += (size_t)n;
		if (p->status != -1 || wait4(p->pid, &p->status, WNOHANG,
		    &p->ru) == p->pid)
			break;
	}
	while (len < cap - 1 && (n = read(fd, buf + len, cap - 1 - len)) > 0)
		len += (size_t)n;
	buf[len] = '\0';
	return len;
}

/*
 * JSON lines of 14 VMs (over 4 KiB each) into a FIFO with one page of
 * room: the FIFO takes part of a line, and the rest must follow before
 * any other line. Every line the reader gets is whole.
 */
static int
metrics_fifo_long_lines_whole(const void *arg)
{
	static char text[1 << 20];
	char path[200], sock[200], junk[4096], secs[] = "4";
	char *hargv[] = { (char *)T.handler, "--max-vms", "14", "--metrics", path,
		"--metrics-interval", "1", sock, T.snap, NULL };
	struct proc h, v[14];
	int fd, queued = 0, lines = 0;
	const char *l;

	(void)arg;
	snprintf(path, sizeof(path), "%s/long%d.fifo", T.dir, ++T.seq);
	snprintf(sock, sizeof(sock), "%s/long%d.sock", T.dir, T.seq);
	if ((fd = full_fifo(path)) < 0 || ioctl(fd, FIONREAD, &queued) < 0)
		return fail("a full FIFO at %s: %s", path, strerror(errno));
	spawn(&h, hargv, NULL);
	if (wait_listening(&h) < 0)
		return fail("the handler did not start");
	start_lingering(v, 14, sock, secs);
	sleep(2);
	if (read(fd, junk, sizeof(junk)) != (ssize_t)sizeof(junk))
		return fail("reading the FIFO: %s", strerror(errno));
	queued -= (int)sizeof(junk);
	sleep(2);
	drain_until_exit(fd, &h, text, sizeof(text));
	for (int i = 0; i < 14; i++)
		reap(&v[i], 60000);
	close(fd);
	for (l = text + queued; *l && strchr(l, '\n'); l = strchr(l, '\n') + 1) {
		const char *nl = strchr(l, '\n'), *next = strstr(l + 1,
		    "{\"utc_timestamp_ms\":");

		lines++;
		if (strncmp(l, "{\"utc_timestamp_ms\":", 20) != 0 ||
		    strncmp(nl - 2, "}}", 2) != 0 || (next && next < nl))
			return fail("line %d is not one whole JSON line: %.300s", lines, l);
	}
	if (lines < 2 || *l != '\0' || !exited(&h, 0))
		return fail("%d whole lines, then %zu bytes of a line; handler %s",
		    lines, strlen(l), how(&h));
	return PASS;
}

/*
 * Where metrics cannot be written (arg): a FIFO nobody reads, a full
 * filesystem, a directory removed while serving. The VM is served all
 * the same, and the failure is logged once.
 */
static int
metrics_write_fails(const void *arg)
{
	char path[200], cmd[512];
	const char *line, *more;
	struct pair p = { .hargs = { "--metrics", path, "--metrics-interval", "1",
	    NULL }, .vargs = { "--stress", "3", NULL } };
	int fd = -1, mounted = 0, rc;

	snprintf(metrics_dir, sizeof(metrics_dir), "%s/metrics%d", T.dir, ++T.seq);
	snprintf(path, sizeof(path), "%s/%s", metrics_dir, strcmp(arg, "fifo") ?
	    "uffd.prom" : "metrics.fifo");
	if (mkdir(metrics_dir, 0755) < 0)
		return fail("mkdir(%s): %s", metrics_dir, strerror(errno));
	snprintf(cmd, sizeof(cmd), "mount -t tmpfs -o size=4k tmpfs %s", metrics_dir);
	if (strcmp(arg, "full") == 0 && (mounted = system(cmd) == 0) == 0)
		return skip("cannot mount a 4 KiB tmpfs: %s", cmd);
	if (strcmp(arg, "fifo") == 0 && (fd = full_fifo(path)) < 0)
		return fail("making a full FIFO at %s: %s", path, strerror(errno));
	if (strcmp(arg, "gone") == 0) {
		p.during_ms = 1500;
		p.during = remove_metrics_dir;
	}
	rc = restored(&p);
	if (fd >= 0)
		close(fd);
	snprintf(cmd, sizeof(cmd), "umount %s", metrics_dir);
	if (mounted && system(cmd) != 0)
		fprintf(stderr, "run: %s failed\n", cmd);
	if (rc != PASS)
		return rc;
	if ((line = strstr(p.herr, "--metrics")) == NULL)
		return pair_fail(&p, "the failure to write metrics was not logged");
	more = strstr(line + 1, "--metrics");
	if (more != NULL && !strstr(more, "written again"))
		return pair_fail(&p, "the failure was logged more than once");
	return PASS;
}

/*
 * What ships.
 */

static int
chroot_empty(const void *arg)
{
	char jail[160], cmd[1024], list[256];
	struct pair p = { .handler = "/uffd-handler", .vargs = { "--threads", "2",
	    NULL } };
	FILE *f;

	(void)arg;
	p.root = jail;
	snprintf(jail, sizeof(jail), "%s/jail", T.dir);
	snprintf(cmd, sizeof(cmd), "mkdir -p %s && cp %s %s/uffd-handler && "
	    "cp %s %s/mem", jail, T.release, jail, T.snap, jail);
	if (system(cmd) != 0)
		return fail("%s failed", cmd);
	snprintf(cmd, sizeof(cmd), "ls -A %s | tr '\\n' ' '", jail);
	if ((f = popen(cmd, "r")) == NULL || fgets(list, sizeof(list), f) == NULL)
		return fail("ls %s", jail);
	pclose(f);
	if (strcmp(list, "mem uffd-handler ") != 0)
		return fail("the jail holds more than the binary and memory: %s", list);
	return restored(&p);
}

/* As a jailer runs it: uid 65534 in an empty chroot, socket for the VMM. */
static int
chroot_uid_65534(const void *arg)
{
	char jail[160], cmd[1024];
	struct pair p = { .handler = "/uffd-handler", .hargs = { "--uid", "65534",
	    "--gid", "65534", "--socket-owner", "65534:65534", "--socket-mode",
	    "0600", NULL }, .vargs = { "--uid", "65534", "--linger", "1", NULL },
	    .during_ms = 400, .during = read_status };
	int rc;

	(void)arg;
	p.root = jail;
	snprintf(jail, sizeof(jail), "%s/jail", T.dir);
	snprintf(cmd, sizeof(cmd), "rm -rf %s && mkdir -p %s && cp %s "
	    "%s/uffd-handler && cp %s %s/mem", jail, jail, T.release, jail, T.snap,
	    jail);
	if (system(cmd) != 0)
		return fail("%s failed", cmd);
	if ((rc = restored(&p)) != PASS)
		return rc;
	if (p.sock_st.st_uid != 65534 || p.sock_st.st_gid != 65534 ||
	    (p.sock_st.st_mode & 07777) != 0600)
		return pair_fail(&p, "the socket's owner or mode was not set");
	if (!strstr(p.status, "Uid:\t65534\t65534\t65534\t65534") ||
	    !strstr(p.status, "Seccomp:\t2"))
		return pair_fail(&p, "not running as 65534 under seccomp");
	return PASS;
}

static int
static_binary(const void *arg)
{
	char cmd[512], out[4096] = "";
	struct stat st;
	FILE *f;
	size_t n;

	(void)arg;
	if (stat(T.release, &st) < 0)
		return fail("stat(%s): %s", T.release, strerror(errno));
	/* 90 KiB with one thread; musl's threads add about 16, the keeper
	 * and its server about 20; --metrics adds 8, --check 4 and --self-test 4. */
	if (st.st_size >= 144 * 1024)
		return fail("%lld bytes, over 144 KiB", (long long)st.st_size);
	snprintf(cmd, sizeof(cmd), "readelf -ldW %s 2>&1", T.release);
	if ((f = popen(cmd, "r")) == NULL)
		return fail("popen(readelf)");
	n = fread(out, 1, sizeof(out) - 1, f);
	out[n] = '\0';
	if (pclose(f) != 0)
		return fail("readelf failed: %s", out);
	if (strstr(out, "INTERP") || strstr(out, "(NEEDED)"))
		return fail("dynamic: %s", out);
	if (!strstr(out, "LOAD"))
		return fail("readelf printed no program headers: %s", out);
	return PASS;
}

/*
 * The FROM scratch image under podman, serving a restore through a
 * bind-mounted socket. In its own pid namespace the VMM's pid is hidden and
 * the VM's exit is seen through SO_PEERPIDFD; with --pid=host (arg) a fatal
 * error kills the VMM.
 */
static int
podman_scratch_image(const void *arg)
{
	static const char image[] = "localhost/uffd-handler:test";
	char cmd[1024], vol[256], log[8192];
	struct pair p = { .handler = "/usr/bin/podman", .vargs = { "--threads",
	    "2", arg ? "--stray-fault" : NULL, NULL } };
	const char *h[] = { "run", "--rm", "--runtime", "runc", "--ulimit",
	    "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "-v", vol,
	    arg ? arg : image, arg ? image : NULL, NULL };
	int rc;

	if (access("/usr/bin/podman", X_OK) != 0 || access("/usr/bin/runc", X_OK) != 0)
		return skip("podman or runc is not installed");
	snprintf(cmd, sizeof(cmd), "podman build -q -t %s . > %s/podman.log 2>&1",
	    image, T.dir);
	rc = system(cmd);
	snprintf(cmd, sizeof(cmd), "%s/podman.log", T.dir);
	read_text(cmd, log, sizeof(log));
	if (rc != 0)
		return fail("podman build: %s", log);
	snprintf(vol, sizeof(vol), "%s:%s", T.dir, T.dir);
	for (int i = 0; h[i]; i++)
		p.hargs[i] = h[i];
	rc = arg ? rejected(&p, 1, "killed VMM pid") : restored(&p);
	if (system("podman rmi -f localhost/uffd-handler:test >/dev/null 2>&1") != 0)
		fprintf(stderr, "run: podman rmi failed\n");
	return rc;
}

/* The aarch64 build: a static AArch64 executable that runs (--version). */
static int
aarch64_binary(const void *arg)
{
	char cmd[512], out[4096] = "";
	FILE *f;
	size_t n;

	(void)arg;
	if (access("build/aarch64/uffd-handler", X_OK) != 0)
		return skip("no aarch64 cross toolchain (.ci/run installs it)");
	if (access("/usr/bin/qemu-aarch64-static", X_OK) != 0)
		return skip("qemu-user-static is not installed");
	snprintf(cmd, sizeof(cmd), "readelf -hlW build/aarch64/uffd-handler && "
	    "qemu-aarch64-static build/aarch64/uffd-handler --version");
	if ((f = popen(cmd, "r")) == NULL)
		return fail("popen: %s", strerror(errno));
	n = fread(out, 1, sizeof(out) - 1, f);
	out[n] = '\0';
	if (pclose(f) != 0)
		return fail("%s failed: %s", cmd, out);
	if (!strstr(out, "AArch64") || !strstr(out, "EXEC (Executable file)") ||
	    strstr(out, "INTERP") || !strstr(out, "uffd-handler "))
		return fail("not a static AArch64 executable that runs:\n%s", out);
	return PASS;
}

static int
release_restore(const void *arg)
{
	struct pair p = { .handler = T.release, .vargs = { "--balloon", "during",
	    NULL } };
	struct pair idle = { .handler = T.release, .hargs = { "--max-vms", "0",
	    "--accept-timeout", "1", NULL } };
	int rc;

	(void)arg;
	if ((rc = restored(&p)) != PASS)
		return rc;
	if (access(p.sock, F_OK) == 0)
		return pair_fail(&p, "the socket file was left behind");
	run_pair(&idle);
	if (!exited(&idle.h, 0) || access(idle.sock, F_OK) == 0)
		return pair_fail(&idle, "the socket file was left at the idle timeout");
	return PASS;
}

/*
 * The configuration matrix: every combination of page size, access order,
 * reads or writes, balloon timing, handler mode, region count and VMA
 * layout is a case of its own, named after its cell, the VMM checking
 * every page against its exact oracle (removed pages zero, writes kept,
 * the rest the snapshot). Cells run MATRIX_JOBS at a time, each in a child
 * of the runner; the hugetlb pages they need are reserved once for all.
 */

static int selected(const char *, char **, int);

static const char *const m_page[] = { "4k", "2m" };
static const char *const m_access[] = { "seq", "rand", "ws10" };
static const char *const m_op[] = { "read", "write" };
static const char *const m_balloon[] = { "none", "after", "during" };
static const char *const m_mode[] = { "default", "no_optimize",
	"populate_all", "populate_file", "max_vms_2", "threads_1",
	"threads_1_populate_all", "threads_4_populate_file", "threads_4_max_vms_2" };
static const char *const m_regions[] = { "r1", "r3" };
static const char *const m_layout[] = { "one", "split", "hotplug" };

#define DIM(a)		(sizeof(a) / sizeof((a)[0]))
#define MATRIX_CELLS	(DIM(m_page) * DIM(m_access) * DIM(m_op) * \
	DIM(m_balloon) * DIM(m_mode) * DIM(m_regions) * DIM(m_layout))
#define MATRIX_JOBS	4
#define MATRIX_HUGE	(MATRIX_JOBS * 2 * 8)	/* jobs x VMs x 16 MiB */

enum { M_NO_OPTIMIZE = 1, M_POPULATE_ALL, M_POPULATE_FILE, M_MAX_VMS_2,
	M_THREADS_1, M_THREADS_1_POPULATE_ALL, M_THREADS_4_POPULATE_FILE,
	M_THREADS_4_MAX_VMS_2 };

struct cell {
	size_t page, access, op, balloon, mode, regions, layout;
};

static struct {
	char snap[2][2][2][160];	/* [page][regions][hotplug] */
	char list[2][160];		/* --populate FILE, per page size */
	int huge_ok;
} M;

/* Cell i, in the order the dimensions are listed (layout varies fastest). */
static void
cell_of(size_t i, struct cell *c)
{
	c->layout = i % DIM(m_layout), i /= DIM(m_layout);
	c->regions = i % DIM(m_regions), i /= DIM(m_regions);
	c->mode = i % DIM(m_mode), i /= DIM(m_mode);
	c->balloon = i % DIM(m_balloon), i /= DIM(m_balloon);
	c->op = i % DIM(m_op), i /= DIM(m_op);
	c->access = i % DIM(m_access), i /= DIM(m_access);
	c->page = i;
}

static void
cell_name(size_t i, char *buf, size_t cap)
{
	struct cell c;

	cell_of(i, &c);
	snprintf(buf, cap, "%smatrix_%s_%s_%s_balloon_%s_%s_%s_%s", T.prefix,
	    m_page[c.page],
	    m_access[c.access], m_op[c.op], m_balloon[c.balloon], m_mode[c.mode],
	    m_regions[c.regions], m_layout[c.layout]);
}

static const char *
cell_regions(const struct cell *c)
{
	static const char *const r[2][2] = { { "8", "2,2,4" }, { "16", "4,4,8" } };

	return r[c->page][c->regions];
}

/* The VMM's options for a cell. */
static void
cell_vargs(const struct cell *c, const char **v)
{
	int n = 0;

	v[n++] = "--regions";
	v[n++] = cell_regions(c);
	if (c->page)
		v[n++] = "--huge";
	v[n++] = "--access";
	v[n++] = m_access[c->access];
	if (c->op)
		v[n++] = "--write";
	v[n++] = "--balloon";
	v[n++] = m_balloon[c->balloon];
	v[n++] = "--layout";
	v[n++] = m_layout[c->layout];
	v[n++] = "--slot";
	v[n++] = c->page ? "2048" : "1024";
	v[n++] = "--threads";
	v[n++] = "2";
	v[n] = NULL;
}

static void
cell_hargs(const struct cell *c, const char **h)
{
	int n = 0;

	size_t m = c->mode;

	if (m == M_NO_OPTIMIZE)
		h[n++] = "--no-optimize";
	if (m == M_THREADS_1 || m == M_THREADS_1_POPULATE_ALL) {
		h[n++] = "--threads";
		h[n++] = "1";
	}
	if (m == M_THREADS_4_POPULATE_FILE || m == M_THREADS_4_MAX_VMS_2) {
		h[n++] = "--threads";
		h[n++] = "4";
	}
	if (m == M_POPULATE_ALL || m == M_THREADS_1_POPULATE_ALL) {
		h[n++] = "--populate";
		h[n++] = "all";
	}
	if (m == M_POPULATE_FILE || m == M_THREADS_4_POPULATE_FILE) {
		h[n++] = "--populate";
		h[n++] = M.list[c->page];
	}
	if (m == M_MAX_VMS_2 || m == M_THREADS_4_MAX_VMS_2) {
		h[n++] = "--max-vms";
		h[n++] = "2";
	}
	h[n] = NULL;
}

/* Both VMMs of a --max-vms 2 cell against one handler. */
static int
cell_two_vms(struct pair *p)
{
	struct proc v2;

	if (start_two(p, &v2) < 0)
		return FAIL;
	reap(&v2, p->vmm_ms ? p->vmm_ms : 60000);
	finish_pair(p);
	if (!exited(&v2, 0)) {
		char verr[4096];

		read_text(v2.err, verr, sizeof(verr));
		return pair_fail(p, verr[0] ? verr : "the second VMM failed");
	}
	return PASS;
}

static int
matrix_cell(size_t i)
{
	struct cell c;
	struct pair p = { 0 };
	int rc = PASS;

	cell_of(i, &c);
	if (c.page && !M.huge_ok)
		return skip("cannot reserve %d hugetlb pages of 2 MiB", MATRIX_HUGE);
	p.snap = M.snap[c.page][c.regions][c.layout == 2];
	p.vmm_ms = 20000;	/* each cell takes well under a second */
	cell_vargs(&c, p.vargs);
	cell_hargs(&c, p.hargs);
	if (c.mode == M_MAX_VMS_2 || c.mode == M_THREADS_4_MAX_VMS_2)
		rc = cell_two_vms(&p);
	else
		run_pair(&p);
	if (rc != PASS)
		return rc;
	if (!exited(&p.v, 0))
		return pair_fail(&p, "the VMM did not verify every page");
	if (!exited(&p.h, 0))
		return pair_fail(&p, "the handler did not exit 0 after the VM");
	if (counter_wrapped(&p))
		return pair_fail(&p, "a counter went below zero");
	return PASS;
}

/* The snapshots (per page size, region count, hotplug holes or not) and a
 * --populate list per page size: scattered runs, in scattered order. */
static int
matrix_setup(void)
{
	char cmd[1024];
	FILE *f;

	for (int pg = 0; pg < 2; pg++) {
		uint64_t ps = pg ? PAGE_2M : 4096, n = (pg ? 16 : 8) * 1048576 / ps;

		for (int r = 0; r < 2; r++)
			for (int hp = 0; hp < 2; hp++) {
				struct cell c = { .page = (size_t)pg, .regions = (size_t)r };

				snprintf(M.snap[pg][r][hp], sizeof(M.snap[pg][r][hp]),
				    "%s/m%d%d%d.mem", T.dir, pg, r, hp);
				snprintf(cmd, sizeof(cmd), "%s mksnap %s --regions %s%s "
				    "--slot %s >/dev/null", T.vmm, M.snap[pg][r][hp],
				    cell_regions(&c), hp ? " --hotplug" : "",
				    pg ? "2048" : "1024");
				if (system(cmd) != 0)
					return -1;
			}
		snprintf(M.list[pg], sizeof(M.list[pg]), "%s/m%d.list", T.dir, pg);
		if ((f = fopen(M.list[pg], "w")) == NULL)
			return -1;
		for (uint64_t k = 0; k < n; k++) {
			uint64_t p = (k * 7 + n / 3) % n;

			if (p % 3 != 1)
				fprintf(f, "%" PRIu64 "\n", p * ps);
		}
		fclose(f);
	}
	return 0;
}

struct job {
	pid_t pid;
	size_t cell;
	int64_t t0;
};

/* A cell in a child of its own: its files numbered apart from the rest. */
static pid_t
matrix_start(size_t cell)
{
	char path[200];
	pid_t pid = fork();
	FILE *f;
	int rc;

	if (pid != 0)
		return pid;
	T.seq = (int)(1000000 + cell * 100);
	T.why[0] = '\0';
	rc = matrix_cell(cell);
	snprintf(path, sizeof(path), "%s/cell%zu.why", T.dir, cell);
	if ((f = fopen(path, "w")) == NULL || fputs(T.why, f) < 0 || fclose(f) != 0)
		_exit(FAIL);
	_exit(rc);
}

/* Waits for one cell to end and prints its line. */
static void
matrix_reap(struct job *job, size_t *running, int *counts)
{
	char name[160], path[200];
	int status, rc;
	pid_t pid = wait(&status);
	size_t j;

	for (j = 0; j < *running && job[j].pid != pid; j++)
		;
	if (j == *running)
		return;
	rc = WIFEXITED(status) && WEXITSTATUS(status) <= SKIP ?
	    WEXITSTATUS(status) : FAIL;
	cell_name(job[j].cell, name, sizeof(name));
	snprintf(path, sizeof(path), "%s/cell%zu.why", T.dir, job[j].cell);
	read_text(path, T.why, sizeof(T.why));
	counts[rc]++;
	if (rc == PASS)
		printf("PASS %s (%" PRId64 " ms)\n", name, now_ms() - job[j].t0);
	else
		printf("%s %s: %s\n", rc == FAIL ? "FAIL" : "SKIP", name,
		    T.why[0] ? T.why : "the cell's process died");
	job[j] = job[--*running];
}

/*
 * The ThreadSanitizer pass: the cases that run the test build of the
 * handler, again against the TSan build, which exits 66 at the first data
 * race, and the matrix cells that run the most threads (--threads 4) or
 * population beside faults. Not the cases of the runner's own code, the
 * unit program, or the release binary (jails, containers, valgrind), nor
 * the 15 s stress case: stress_threads_* are its threaded forms. Nor what
 * runs on one thread of the handler however it is started: setup and the
 * socket, the keeper's accepting, handshakes and silent peers, --metrics
 * (the keeper writes it), the --record FIFO; of the crash cases, those
 * with --threads 4, --max-vms 2 and population on threads run.
 */
static int
in_tsan_pass(const char *name)
{
	static const char *const not[] = { "tsan/parse_", "tsan/validate_",
		"tsan/unit_", "tsan/kernel_", "tsan/abi", "tsan/static_binary",
		"tsan/aarch64_", "tsan/podman_", "tsan/chroot_", "tsan/release_",
		"tsan/fuzz_", "tsan/no_fds_left_at_exit", "tsan/check_",
		"tsan/self_test_",
		"tsan/stress_faults_removes_oracle", "tsan/upgrade_",
		"tsan/threads_join_second_vm", "tsan/cli_", "tsan/socket_",
		"tsan/accept_timeout_", "tsan/silent_", "tsan/metrics_",
		"tsan/vmm_killed_", "tsan/record_fifo_", "tsan/sigterm_during_",
		"tsan/sigusr1_during_", "tsan/handshake_", "tsan/crash_loop_",
		"tsan/crash_oracle_threads_1", "tsan/crash_oracle_chain",
		"tsan/crash_oracle_threads_4_hugetlb",
		"tsan/crash_oracle_populate_all_hugetlb",
		"tsan/crash_in_remove_window" };

	if (T.prefix[0] == '\0')
		return 1;
	if (strncmp(name, "tsan/matrix_", 12) == 0)
		return strstr(name, "_threads_4_") || strstr(name, "_populate_all_");
	for (size_t i = 0; i < sizeof(not) / sizeof(not[0]); i++)
		if (strncmp(name, not[i], strlen(not[i])) == 0)
			return 0;
	return 1;
}

/* Runs the selected cells, MATRIX_JOBS at a time; counts[] gets results. */
static void
run_matrix(char **pats, int npats, int *counts)
{
	struct job job[MATRIX_JOBS];
	size_t next, running = 0, chosen = 0, huge = 0;
	char name[160];

	for (next = 0; next < MATRIX_CELLS; next++) {
		struct cell c;

		cell_name(next, name, sizeof(name));
		cell_of(next, &c);
		chosen += selected(name, pats, npats);
		huge += selected(name, pats, npats) && c.page;
	}
	if (chosen == 0)
		return;
	if (matrix_setup() < 0) {
		printf("FAIL matrix: making its snapshots failed\n");
		counts[FAIL]++;
		return;
	}
	M.huge_ok = huge > 0 && huge_reserve(MATRIX_HUGE) == 0;
	for (next = 0; next < MATRIX_CELLS || running > 0;) {
		if (running < MATRIX_JOBS && next < MATRIX_CELLS) {
			cell_name(next, name, sizeof(name));
			if (selected(name, pats, npats))
				job[running++] = (struct job){ matrix_start(next), next,
				    now_ms() };
			next++;
			continue;
		}
		matrix_reap(job, &running, counts);
	}
	huge_restore();
}

struct tcase {
	const char *name;
	int (*fn)(const void *);
	const void *arg;
};

static const struct tcase cases[] = {
	{ "abi_matches_kernel", abi_matches_kernel, NULL },
	{ "parse_gen1", parse_valid, &gen1 },
	{ "parse_gen2_page_size_kib", parse_valid, &gen2 },
	{ "parse_gen3_page_size_u64_max", parse_valid, &gen3 },
	{ "parse_unknown_fields_every_type", parse_valid, &unknown },
	{ "parse_in_pieces", parse_in_pieces, NULL },
	{ "parse_reject_garbage", parse_reject, &rj_garbage },
	{ "parse_reject_not_object", parse_reject, &rj_not_object },
	{ "parse_reject_negative", parse_reject, &rj_negative },
	{ "parse_reject_fraction", parse_reject, &rj_fraction },
	{ "parse_reject_exponent", parse_reject, &rj_exponent },
	{ "parse_reject_past_2_64", parse_reject, &rj_overflow },
	{ "parse_reject_leading_zero", parse_reject, &rj_leading_zero },
	{ "parse_reject_string_integer", parse_reject, &rj_string_int },
	{ "parse_reject_null_integer", parse_reject, &rj_null_int },
	{ "parse_reject_duplicate_key", parse_reject, &rj_duplicate },
	{ "parse_reject_missing_field", parse_reject, &rj_missing },
	{ "parse_reject_trailing_data", parse_reject, &rj_trailing },
	{ "parse_reject_trailing_comma", parse_reject, &rj_trailing_comma },
	{ "parse_reject_bad_escape", parse_reject, &rj_bad_escape },
	{ "parse_reject_control_char", parse_reject, &rj_control },
	{ "parse_reject_bad_literal", parse_reject, &rj_bad_literal },
	{ "parse_reject_bad_number", parse_reject, &rj_bad_number },
	{ "parse_reject_too_many", parse_reject, &rj_too_many },
	{ "parse_reject_10000_brackets", parse_reject_deep, NULL },
	{ "validate_default_page_size", validate, &va_default_page },
	{ "validate_2m_pages", validate, &va_2m },
	{ "validate_reject_no_mappings", validate, &va_no_mappings },
	{ "validate_reject_misaligned_base", validate, &va_misaligned },
	{ "validate_reject_2m_misaligned", validate, &va_2m_misaligned },
	{ "validate_reject_zero_size", validate, &va_zero_size },
	{ "validate_reject_partial_page", validate, &va_size_multiple },
	{ "validate_reject_unaligned_offset", validate, &va_offset },
	{ "validate_reject_beyond_file", validate, &va_beyond_file },
	{ "validate_reject_offset_overflow", validate, &va_offset_overflow },
	{ "validate_reject_base_overflow", validate, &va_base_overflow },
	{ "validate_reject_overlap", validate, &va_overlap },
	{ "validate_reject_page_size", validate, &va_bogus_page },
	{ "validate_reject_page_sizes_disagree", validate, &va_disagree },
	{ "kernel_copy_across_vma_is_enoent", unit, "kernel_copy_across_vma" },
	{ "kernel_copy_into_prot_none_succeeds", unit, "kernel_copy_into_prot_none" },
	{ "kernel_hugetlb_exhausted_is_eexist", unit_hugetlb,
	    "kernel_hugetlb_exhausted_is_eexist" },
	{ "unit_retried_fault_keeps_window", unit, "retried_fault_keeps_window" },
	{ "unit_new_stream_starts_clean", unit, "new_stream_starts_clean" },
	{ "unit_enoent_window_split", unit, "enoent_window_split" },
	{ "unit_enoent_page_dropped", unit, "enoent_page_dropped" },
	{ "unit_enoent_wakes_waiter", unit, "enoent_wakes_waiter" },
	{ "unit_zeros_stop_at_vma", unit, "zeros_stop_at_vma" },
	{ "unit_error_ahead_ends_window", unit, "error_ahead_ends_window" },
	{ "unit_zero_source_covers_run", unit, "zero_source_covers_run" },
	{ "unit_stale_fault_after_remove", unit, "stale_fault_after_remove" },
	{ "unit_remove_read_waits_for_installs", unit,
	    "remove_read_waits_for_installs" },
	{ "unit_reader_holds_off_installs", unit, "reader_holds_off_installs" },
	{ "cli_help_version", cli_help_version, NULL },
	{ "cli_usage_errors", cli_usage_errors, NULL },
	{ "cli_option_conflicts", cli_option_conflicts, NULL },
	{ "cli_value_missing_named", cli_value_missing_named, NULL },
	{ "cli_missing_memfile", cli_missing_memfile, NULL },
	{ "socket_not_a_socket", socket_not_a_socket, NULL },
	{ "socket_stale_replaced", socket_stale_replaced, NULL },
	{ "accept_timeout", accept_timeout, NULL },
	{ "accept_timeout_after_sigusr1", accept_timeout_signals, NULL },
	{ "accept_timeout_past_int_ms", accept_timeout_signals, "4294968" },
	{ "accept_timeout_max", accept_timeout_signals, "31536000" },
	{ "accept_timeout_many_no_vmm", accept_timeout_many, NULL },
	{ "accept_timeout_many_after_vm", accept_timeout_many, "after" },
	{ "handshake_timeout_max", handshake_timeout_max, NULL },
	{ "restore_gen1_socket_closed", restore, r_gen1 },
	{ "restore_gen2_socket_closed", restore, r_gen2 },
	{ "restore_gen3_socket_open", restore, r_gen3 },
	{ "restore_gen3_socket_closed", restore, r_gen3_closed },
	{ "restore_four_regions_8_threads", restore, r_regions },
	{ "restore_split_message_extra_fds", restore, r_split },
	{ "fault_path_runs_and_zero_pages", fault_path, NULL },
	{ "fault_path_no_optimize_one_page", fault_path, "--no-optimize" },
	{ "populate_all_detach_then_balloon", populate_detach, NULL },
	{ "populate_all_detach_under_stress", populate_detach_stress, NULL },
	{ "populate_all_with_faults_and_balloon", populate_with_faults, NULL },
	{ "populate_all_detach_split", populate_detach_layout, pd_split },
	{ "populate_all_detach_hotplug", populate_detach_layout, pd_hotplug },
	{ "populate_all_detach_split_hugetlb", populate_detach_layout, pd_split_2m },
	{ "populate_all_detach_hotplug_hugetlb", populate_detach_layout,
	    pd_hotplug_2m },
	{ "record_then_populate_file", record_then_populate, NULL },
	{ "populate_file_rejects_bad_list", populate_bad_list, NULL },
	{ "balloon_after", balloon, "after" },
	{ "balloon_during", balloon, "during" },
	{ "hugetlb_restore", hugetlb, NULL },
	{ "hugetlb_balloon_during", hugetlb, "during" },
	{ "kvm_restore", kvm, NULL },
	{ "kvm_restore_hugetlb", kvm, "--huge" },
	{ "vmm_crash_handler_exits_0", vmm_crash, NULL },
	{ "fatal_stray_fault_kills_vmm", stray_fault, NULL },
	{ "handshake_garbage_kills_vmm", bad_handshake, hs_garbage },
	{ "handshake_no_fd_kills_vmm", bad_handshake, hs_no_fd },
	{ "handshake_beyond_file_kills_vmm", bad_handshake, hs_beyond },
	{ "handshake_cut_off_times_out", bad_handshake, hs_cut },
	{ "handshake_past_2_64_kills_vmm", bad_handshake, hs_past_2_64 },
	{ "handshake_negative_kills_vmm", bad_handshake, hs_negative },
	{ "handshake_fraction_kills_vmm", bad_handshake, hs_fraction },
	{ "handshake_exponent_kills_vmm", bad_handshake, hs_exponent },
	{ "handshake_misaligned_base_kills_vmm", bad_handshake, hs_misaligned },
	{ "handshake_overlap_kills_vmm", bad_handshake, hs_overlap },
	{ "handshake_zero_size_kills_vmm", bad_handshake, hs_zero_size },
	{ "handshake_bogus_page_size_kills_vmm", bad_handshake, hs_page_size },
	{ "handshake_10000_brackets_kills_vmm", deep_brackets, NULL },
	{ "handshake_two_fds_served", restore, r_two_fds },
	{ "handshake_64_regions_padded_served", padded_64_regions, NULL },
	{ "vmm_killed_50_times", vmm_killed_50_times, NULL },
	{ "chain_restore_3_diffs", chain_restore, ch_threads },
	{ "chain_restore_hugetlb", chain_restore, ch_huge },
	{ "chain_balloon_during_writes", chain_restore, ch_balloon },
	{ "chain_balloon_during_hugetlb", chain_restore, ch_balloon_huge },
	{ "chain_cells_page_access_op_balloon", chain_cells, NULL },
	{ "chain_two_vms_one_handler", chain_two_vms, NULL },
	{ "chain_populate_all_detach", chain_populate_detach, NULL },
	{ "chain_record_then_populate", chain_record_populate, NULL },
	{ "chain_64_layers", chain_64_layers, NULL },
	{ "chain_layer_truncated_kills_vmm", chain_layer_truncated, NULL },
	{ "chain_bad_layers_exit_3", chain_bad, NULL },
	{ "chain_diff_without_holes_warned", chain_diff_without_holes, NULL },
	{ "many_vms_16_one_crashes", many_vms, NULL },
	{ "many_vms_fatal_error_kills_only_that_vm", many_vms, "--stray-fault" },
	{ "many_vms_no_fd_left_after_16", many_vms_no_fd_left, NULL },
	{ "silent_peers_during_serving", silent_peers_during_serving, NULL },
	{ "silent_peers_then_vmm", silent_peers_then_vmm, NULL },
	{ "second_instance_exits_3", second_instance, NULL },
	{ "signals_during_handshake", signals_during_handshake, NULL },
	{ "backlog_100_connects", backlog_100, NULL },
	{ "backlog_drained_at_limit", backlog_drained_at_limit, NULL },
	{ "event_cost_16_idle_vms", event_cost_16_idle, NULL },
	{ "fd_exhaustion_ulimit_24", fd_exhaustion, NULL },
	{ "silent_flood_at_fd_limit", silent_flood_at_fd_limit, NULL },
	{ "silent_peers_give_way_at_fd_limit", silent_peers_give_way, NULL },
	{ "record_fifo_no_reader_exits_3", record_fifo_no_reader, NULL },
	{ "socket_pid_named_file_kept", socket_pid_named_file_kept, NULL },
	{ "socket_handlers_race_pid_namespaces", socket_handlers_race, "pid1" },
	{ "socket_handlers_race_stale", socket_handlers_race, "stale" },
	{ "socket_handlers_race_stale_long_path", socket_handlers_race, "long" },
	{ "socket_emfile_logged", socket_emfile_logged, NULL },
	{ "socket_chown_fails_removed", socket_chown_fails_removed, NULL },
	{ "sigterm_during_setup_exits_5", signal_during_setup, "term" },
	{ "sigusr1_during_setup_goes_on", signal_during_setup, "usr1" },
	{ "vmm_dies_mid_handshake_not_rejected", vmm_dies_mid_handshake, NULL },
	{ "record_fifo_stalled_reader", record_fifo_stalled, NULL },
	{ "record_fifo_stalled_reader_sigterm", record_fifo_stalled, "sig" },
	{ "populate_threads_no_spin", populate_threads_no_spin, NULL },
	{ "populate_list_format", populate_list_format, NULL },
	{ "exit_rule_rejected_is_4", exit_rule, &rule_rejected },
	{ "exit_rule_fatal_over_rejected_is_1", exit_rule, &rule_fatal },
	{ "exit_rule_crash_and_served_is_0", exit_rule, &rule_crash },
	{ "no_fds_left_at_exit", no_fds_left, NULL },
	{ "hugetlb_pool_exhausted_kills_vmm", hugetlb_pool_exhausted, NULL },
	{ "hugetlb_readahead_enomem_not_fatal", hugetlb_readahead_enomem, NULL },
	{ "hugetlb_pool_exact_rand", hugetlb_pool_exact, "rand" },
	{ "hugetlb_pool_exact_seq", hugetlb_pool_exact, "seq" },
	{ "hugetlb_pool_exhausted_one_region_kills_vmm", hugetlb_pool_eexist, "seq" },
	{ "hugetlb_pool_exhausted_no_optimize_kills_vmm", hugetlb_pool_eexist,
	    "--no-optimize" },
	{ "stress_faults_removes_oracle", stress, NULL },
	{ "stress_hugetlb_oracle", stress, "--huge" },
	{ "stress_two_vms_one_handler", stress_two_vms, NULL },
	{ "threads_join_second_vm", threads_join_second_vm, NULL },
	{ "stress_threads_1", stress_threads, &st_one },
	{ "stress_threads_4", stress_threads, &st_four },
	{ "stress_threads_4_hugetlb", stress_threads, &st_four_huge },
	{ "stress_threads_4_populate_all", stress_threads, &st_four_pop },
	{ "stress_threads_4_populate_all_hugetlb", stress_threads, &st_four_pop_huge },
	{ "crash_oracle_threads_1", crash_oracle, &cr_t1 },
	{ "crash_oracle_threads_4", crash_oracle, &cr_t4 },
	{ "crash_oracle_threads_1_hugetlb", crash_oracle, &cr_t1_huge },
	{ "crash_oracle_threads_4_hugetlb", crash_oracle, &cr_t4_huge },
	{ "crash_oracle_chain", crash_oracle, &cr_chain },
	{ "crash_oracle_max_vms_2", crash_oracle, &cr_two },
	{ "crash_oracle_populate_all", crash_oracle, &cr_pop },
	{ "crash_oracle_populate_all_hugetlb", crash_oracle, &cr_pop_huge },
	{ "crash_during_handshake", crash_during_handshake, NULL },
	{ "crash_loop_fails_closed", crash_loop_fails_closed, NULL },
	{ "upgrade_oracle_threads_4", upgrade_oracle, &cr_t4 },
	{ "upgrade_oracle_threads_1_hugetlb", upgrade_oracle, &cr_t1_huge },
	{ "upgrade_oracle_chain", upgrade_oracle, &cr_chain },
	{ "upgrade_oracle_max_vms_2", upgrade_oracle, &cr_two },
	{ "upgrade_oracle_populate_all", upgrade_oracle, &cr_pop },
	{ "upgrade_before_first_vm_keeps_listening", upgrade_keeps_listening,
	    NULL },
	{ "upgrade_between_vms_keeps_listening", upgrade_keeps_listening, "2" },
	{ "upgrade_upon_upgrade", upgrade_upon_upgrade, NULL },
	{ "crash_in_remove_window", crash_in_remove_window, NULL },
	{ "upgrade_refused_binaries", upgrade_refused, NULL },
	{ "upgrade_unreadable_goes_back", upgrade_unreadable_goes_back, NULL },
	{ "population_two_vms_slow", population_two_vms_slow, NULL },
	{ "socket_dir_lock_sigterm", socket_dir_lock_held, "term" },
	{ "socket_dir_lock_held_5_s", socket_dir_lock_held, NULL },
	{ "socket_handlers_race_unreadable_dir", socket_race_unreadable_dir, NULL },
	{ "record_fifo_usr1_then_term", record_fifo_usr1_then_term, NULL },
	{ "populate_list_not_regular", populate_list_not_regular, NULL },
	{ "slow_restore_ws10", slow_restore, &sl_ws10 },
	{ "slow_restore_ws10_writes", slow_restore, &sl_ws10_write },
	{ "slow_restore_ws10_threads_1", slow_restore, &sl_ws10_t1 },
	{ "slow_restore_seq", slow_restore, &sl_seq },
	{ "slow_replay_working_set", slow_replay, NULL },
	{ "cold_restore_rand", cold_restore, "rand" },
	{ "cold_restore_seq", cold_restore, "seq" },
	{ "fetch_overlay_tmpfs_holes", fetch_overlay_tmpfs_holes, NULL },
	{ "fuzz_handshake_short", fuzz_short, NULL },
	{ "sigterm_kills_vmm", sigterm, &sig_term },
	{ "sighup_kills_vmm", sigterm, &sig_hup },
	{ "sigquit_kills_vmm", sigterm, &sig_quit },
	{ "sigusr1_prints_counters", sigusr1_counters, NULL },
	{ "memfile_truncated_kills_vmm", memfile_truncated, NULL },
	{ "memfile_truncated_two_vms_two_sigbus", memfile_truncated_two_vms, NULL },
	{ "seccomp_confined_while_serving", seccomp_status, NULL },
	{ "seccomp_off_with_flag", seccomp_status, "--no-seccomp" },
	{ "chroot_empty", chroot_empty, NULL },
	{ "chroot_uid_65534", chroot_uid_65534, NULL },
	{ "static_binary", static_binary, NULL },
	{ "aarch64_static_binary", aarch64_binary, NULL },
	{ "podman_scratch_image_restore", podman_scratch_image, NULL },
	{ "podman_pid_host_kills_vmm", podman_scratch_image, "--pid=host" },
	{ "release_restore_balloon_socket_removed", release_restore, NULL },
	{ "check_ready_here", check_ready_here, NULL },
	{ "check_jail_uid_65534_names_missing", check_jail_uid_65534, NULL },
	{ "check_jail_dev_userfaultfd_ready", check_jail_uid_65534, "dev" },
	{ "self_test_chroot_empty", self_test_chroot_empty, NULL },
	{ "self_test_killed_leaves_nothing", self_test_killed_leaves_nothing,
	    NULL },
	{ "self_test_sigterm_leaves_nothing", self_test_killed_leaves_nothing,
	    "term" },
	{ "self_test_fails_broken_fault_path", self_test_fails_broken_fault_path,
	    NULL },
	{ "self_test_podman_scratch", self_test_podman_scratch, NULL },
	{ "self_test_aarch64_qemu", self_test_aarch64_qemu, NULL },
	{ "metrics_prom_promtool_matches_counters", metrics_prom, NULL },
	{ "metrics_prom_survive_server_kill", metrics_prom, "kill" },
	{ "upgrade_keeps_metrics", metrics_prom, "upgrade" },
	{ "metrics_json_lines_add_up", metrics_json_lines, NULL },
	{ "metrics_fifo_long_lines_whole", metrics_fifo_long_lines_whole, NULL },
	{ "metrics_fifo_no_reader_logged_once", metrics_write_fails, "fifo" },
	{ "metrics_full_disk_logged_once", metrics_write_fails, "full" },
	{ "metrics_dir_removed_logged_once", metrics_write_fails, "gone" },
};

/* The programs by absolute path: cases chdir and chroot. */
static int
absolute(const char **path, int slot)
{
	static char buf[6][4096];

	if (realpath(*path, buf[slot]) == NULL)
		return -1;
	*path = buf[slot];
	return 0;
}

static int
selected(const char *name, char **pats, int npats)
{
	if (!in_tsan_pass(name))
		return 0;
	if (npats == 0)
		return 1;
	for (int i = 0; i < npats; i++)
		if (fnmatch(pats[i], name, 0) == 0 || strstr(name, pats[i]))
			return 1;
	return 0;
}

static int
setup(void)
{
	char cmd[512];

	snprintf(T.dir, sizeof(T.dir), "/tmp/uffd-test.XXXXXX");
	/* Traversable, for the cases that run the VMM as another uid. */
	if (mkdtemp(T.dir) == NULL || chmod(T.dir, 0755) < 0)
		return -1;
	snprintf(T.snap, sizeof(T.snap), "%s/snap.mem", T.dir);
	snprintf(T.big, sizeof(T.big), "%s/big.mem", T.dir);
	snprintf(T.r64, sizeof(T.r64), "%s/r64.mem", T.dir);
	snprintf(cmd, sizeof(cmd), "%s mksnap %s >/dev/null && %s mksnap %s "
	    "--regions 32,16,16 >/dev/null && %s mksnap %s --regions 64x1 "
	    ">/dev/null", T.vmm, T.snap, T.vmm, T.big, T.vmm, T.r64);
	return system(cmd) == 0 ? 0 : -1;
}

static void
rmdir_all(const char *dir)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "run: could not remove %s\n", dir);
}

static void
run_cases(char **pats, int npats, int *counts)
{
	char name[200];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int64_t t0 = now_ms();
		int rc;

		snprintf(name, sizeof(name), "%s%s", T.prefix, cases[i].name);
		if (!selected(name, pats, npats))
			continue;
		T.why[0] = '\0';
		rc = cases[i].fn(cases[i].arg);
		huge_restore();
		counts[rc]++;
		if (rc == PASS)
			printf("PASS %s (%" PRId64 " ms)\n", name, now_ms() - t0);
		else
			printf("%s %s: %s\n", rc == FAIL ? "FAIL" : "SKIP", name, T.why);
	}
}

/* Everything selected again, as "tsan/NAME", against the TSan build. */
static void
run_tsan(char **pats, int npats, int *counts)
{
	const char *handler = T.handler;

	if (access(T.tsan, X_OK) != 0) {
		printf("SKIP tsan: %s is not built (./build.sh test builds it)\n",
		    T.tsan);
		counts[SKIP]++;
		return;
	}
	/* A directory of its own: cases name their files after themselves. */
	if (counts[FAIL] == 0)
		rmdir_all(T.dir);
	if (setup() < 0) {
		printf("FAIL tsan: making its snapshots failed\n");
		counts[FAIL]++;
		return;
	}
	setenv("TSAN_OPTIONS", "halt_on_error=1 exitcode=66", 1);
	T.handler = T.tsan;
	T.prefix = "tsan/";
	run_cases(pats, npats, counts);
	run_matrix(pats, npats, counts);
	T.prefix = "";
	T.handler = handler;
}

int
main(int argc, char **argv)
{
	int c, list = 0, counts[3] = { 0 };

	T.handler = "build/san/uffd-handler";
	T.release = "build/uffd-handler";
	T.vmm = "build/test/vmm";
	T.unit = "build/test/unit";
	T.tsan = "build/tsan/uffd-handler";
	T.fuzz = "build/fuzz/handshake";
	absolute(&T.fuzz, 3);
	absolute(&T.tsan, 5);
	while ((c = getopt(argc, argv, "lH:R:V:")) != -1) {
		switch (c) {
		case 'l': list = 1; break;
		case 'H': T.handler = optarg; break;
		case 'R': T.release = optarg; break;
		case 'V': T.vmm = optarg; break;
		default:
			fprintf(stderr, "usage: run [-l] [-H handler] [-R release] "
			    "[-V vmm] [pattern...]\n");
			return 2;
		}
	}
	for (size_t i = 0; list && i < sizeof(cases) / sizeof(cases[0]); i++)
		printf("%s\n", cases[i].name);
	for (size_t i = 0; list && i < MATRIX_CELLS; i++) {
		char name[160];

		cell_name(i, name, sizeof(name));
		printf("%s\n", name);
	}
	if (list)
		return 0;
	if (absolute(&T.handler, 0) < 0 || absolute(&T.release, 1) < 0 ||
	    absolute(&T.vmm, 2) < 0 || absolute(&T.unit, 4) < 0 || setup() < 0) {
		fprintf(stderr, "run: build the handler and test/vmm first, and "
		    "check /tmp\n");
		return 2;
	}
	if (getcwd(repo_dir, sizeof(repo_dir)) == NULL)
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	run_cases(argv + optind, argc - optind, counts);
	run_matrix(argv + optind, argc - optind, counts);
	run_tsan(argv + optind, argc - optind, counts);
	if (counts[FAIL] == 0)
		rmdir_all(T.dir);
	printf("%d passed, %d failed, %d skipped\n", counts[PASS], counts[FAIL],
	    counts[SKIP]);
	return counts[FAIL] ? 1 : 0;
}
