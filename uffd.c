/*
 * uffd-handler - serves a Firecracker microVM's guest memory from a snapshot
 * memory file through userfaultfd.
 *
 * The protocol. The handler listens on a Unix stream socket. Firecracker,
 * restoring with the Uffd memory backend, maps guest memory anonymously,
 * creates a userfaultfd (non-blocking, REMOVE events on, kernel-mode faults
 * included), registers every region for missing-page faults, connects once
 * and sends one message: a JSON array describing the regions and, as
 * SCM_RIGHTS, the uffd. The regions' bytes lie back to back in the memory
 * file. Versions up to 1.11 then close the socket while the VM runs on, so
 * EOF says nothing; the VMM's exit is watched through a pidfd, from the
 * socket's SO_PEERPIDFD, or opened from its SO_PEERCRED pid.
 *
 * The loop. The server's one epoll set is over its socket with the keeper
 * (which hands it each connection the keeper accepts) and, for each
 * connection, its socket during the handshake, then the peer's pidfd (and
 * its uffd, with --threads 1). Handshakes are read as they arrive, so
 * a peer that sends nothing holds up no other VM; each VM is a session of
 * its own (--max-vms serves many from one process). When a uffd is
 * readable, every queued event is read until none is left: REMOVE events
 * (the balloon, or free page reporting, discarding guest pages) are
 * applied at once to a per-region bitmap, faults are queued. Only then are
 * faults served, so a fault that was queued before a REMOVE it causally
 * followed still sees the pages as removed. Removed pages are served as
 * zeros, others with UFFDIO_COPY from the memory file, mapped read-only. While any REMOVE
 * is unread, the kernel answers every copy with EAGAIN: the fault stays
 * queued and the uffd is read again.
 *
 * The fast path. Faults that follow each other through memory are served in
 * runs that double up to 2 MiB; random faults get their page alone. Pages
 * that are all zero in the snapshot map the shared zero page. --populate
 * installs pages the VM has not asked for yet (between rounds of the loop,
 * or on threads of its own), and --detach lets the VM go once every page
 * is in. A random fault whose page is not in the page cache has its pages
 * read in with POSIX_FADV_WILLNEED and stays queued while others are
 * served, so slow storage has as many reads in flight as faults wait.
 *
 * Threads. With --threads N, N threads serve faults and, with --populate,
 * N more populate. Without it a VM alone is served by the loop, as with
 * --threads 1, and 2 threads serve once a second VM comes: a hand-off
 * costs a wake-up a fault, which pays only when VMs compete for the loop.
 * A ready uffd goes to one serving thread (EPOLLONESHOT), which reads its
 * events into a lane of its own and serves the faults it read; it gives
 * the uffd back when its turn ends, or at once if it read a burst. The
 * loop keeps accepting, handshakes, pidfds, signals and endings. The
 * hazard is a REMOVE: its madvise caller resumes as soon as read() hands
 * the event out, so a copy another thread decided on before the bitmap
 * said "removed", or one still inside the kernel, could land after the
 * madvise has zapped the page: snapshot bytes in a page the guest gave
 * back. So each session has a lock that every install holds shared, from
 * deciding what its pages hold to the end of its UFFDIO calls, and that
 * reading the uffd holds exclusive until every REMOVE read is in the
 * bitmap. A waiting reader holds off new installs, so it waits only for
 * those under way, one window (up to 2 MiB, or four hugetlb pages) or
 * population step (2 MiB) each. And a fault read before a REMOVE of its
 * page but served after it is only woken: its vCPU may have gone on
 * already (another thread installed the page), and zeros would refill a
 * page given back. --threads 1 is the loop alone, reading and serving in
 * turn.
 *
 * Two processes. The process that is started is the keeper: it sets up,
 * then holds what must outlive a crash (the listening socket, and for each
 * connection its socket, the VMM's pidfd, the uffd, and a memfd of the
 * session's state) and does nothing else: it reads no VMM's bytes and
 * touches no guest memory. The work is done by its child, the server. A
 * server that dies is replaced by one that adopts every session from its
 * state and wakes every range (a fault the dead one read is delivered
 * once, and lost); the one thing a server's death can lose is a REMOVE it
 * read and had not recorded, and that session alone is then failed
 * closed. SIGUSR2 replaces the keeper's own image by the binary at its
 * path, keeping its pid and every descriptor.
 *
 * Failing closed. Firecracker keeps its own copy of the uffd, so a handler
 * that stops serving freezes the guest forever, silently. A peer that has
 * sent a byte is a VMM that registered its memory: every fatal error after
 * that is logged and answered with SIGKILL to that VMM (other signals may
 * not interrupt a vCPU stuck in a fault). A peer that sent nothing is only
 * closed: it registered nothing with anyone.
 *
 * Contents, in the order data flows through them:
 *
 *   1. Options                 the command line, the log, time
 *   2. The memory source       MEMFILE and its DIFFs, a layer map, SIGBUS
 *   3. A session and its lanes what outlives a server, and what not
 *   4. The UFFDIO helpers      one per ioctl: done, retry, gone, absent
 *   5. The fault path          windows, runs, kinds of page, ENOENT halving
 *   6. Events                  draining the uffd, REMOVEs into the bitmap
 *   7. Population              --populate, --detach, --record, a round
 *   8. The handshake           reading by peeking, checking, the state
 *   9. The session             its life, its killing, its counters line
 *  10. The keeper              setup, seccomp, slots, servers, upgrades
 *  11. Metrics                 --metrics: Prometheus text or JSON lines
 *  12. The keeper's protocol   one message, what each side asks, answers
 *  13. The server loop         handshakes, threads, endings, adoption
 *  14. The readiness check     --check: what this host lacks, and the fix
 *  15. The self-test           --self-test: a restore through itself
 *  16. Main
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <grp.h>

#include "uffd.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open		434
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ	22
#endif
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD		77
#endif
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB		(21 << 26)
#endif
#ifndef SECCOMP_FILTER_FLAG_TSYNC
#define SECCOMP_FILTER_FLAG_TSYNC	1
#endif
#ifndef SYS_epoll_pwait2
#define SYS_epoll_pwait2	441
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal	424
#endif

#define VERSION		"0.2.0"
#ifndef BUILD_ID
#define BUILD_ID	"unknown"		/* build.sh gives the commit */
#endif
#define VERSION_LINE	VERSION " (" BUILD_ID ")"

enum exit_code {
	EXIT_VM_GONE = 0,	/* the VMM exited, or its address space is gone */
	EXIT_FATAL = 1,		/* fatal error while serving; VMM killed */
	EXIT_USAGE = 2,		/* bad command line */
	EXIT_SETUP = 3,		/* memory file, socket, or no VMM connected in time */
	EXIT_HANDSHAKE = 4,	/* handshake rejected; VMM killed */
	EXIT_SIGNAL = 5,	/* SIGTERM, SIGINT, SIGHUP, SIGQUIT; VMMs killed */
	EXIT_NOT_READY = 6,	/* --check, --self-test: this host cannot serve */
};

enum { LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG };
static const char *const level_names[] = { "error", "warn", "info", "debug" };

/* ------------------------------------------------------------------------
 * 1. Options
 *
 * The command line, parsed once into opt, the only global besides the
 * SIGBUS guard's jump buffers; the log; time. Numbers are parsed by one
 * helper that takes digits only (no sign, no blanks, no base prefix).
 * ------------------------------------------------------------------------ */

#define MAX_MAPPINGS	1024
#define MAX_THREADS	64
#define DEFAULT_THREADS	2
#define THREAD_STACK	(256 * 1024)
#define DEFER_US	50		/* a thread's wait on a deferred fault */
#define HANDSHAKE_MAX	(256 * 1024)
#define FAULT_QUEUE	1024
#define EVENT_BATCH	64
#define MAX_FDS		8

static struct {
	const char *socket_path;
	char *const *layers;		/* MEMFILE, then each DIFF */
	int nlayers;
	int log_level;
	int accept_timeout;		/* seconds; 0 waits forever */
	int handshake_timeout;		/* seconds */
	int seccomp;
	int optimize;			/* runs, zero pages; off: one page a fault */
	int populate_all;		/* --populate all */
	long max_vms;			/* --max-vms; 0: no limit */
	int threads;			/* --threads: serving threads */
	int threads_given;		/* on the command line: see serving_alone */
	const char *populate_path;	/* --populate FILE */
	const char *record_path;	/* --record FILE */
	int detach;			/* --detach once everything is in */
	long uid, gid;			/* to drop to after binding; -1: keep */
	long sock_uid, sock_gid;	/* socket owner; -1: keep */
	long sock_mode;			/* -1: as created */
	int check, self_test;		/* --check, --self-test */
	const char *metrics_path;	/* --metrics PATH */
	int metrics_interval;		/* seconds */
} opt = { .log_level = LOG_INFO, .handshake_timeout = 5, .seccomp = 1,
	.optimize = 1, .max_vms = 1, .threads = DEFAULT_THREADS,
	.uid = -1, .gid = -1, .sock_uid = -1, .sock_gid = -1, .sock_mode = -1,
	.metrics_interval = 10 };

enum { OPT_ACCEPT = 256, OPT_HANDSHAKE, OPT_OWNER, OPT_MODE, OPT_UID, OPT_GID,
	OPT_NO_SECCOMP, OPT_NO_OPTIMIZE, OPT_POPULATE, OPT_DETACH, OPT_RECORD,
	OPT_MAX_VMS, OPT_THREADS, OPT_CHECK, OPT_SELF_TEST, OPT_METRICS,
	OPT_METRICS_INTERVAL };

static void
usage(FILE *f)
{
	fprintf(f,
"Usage: uffd-handler [OPTIONS] SOCKET MEMFILE [DIFF...]\n"
"       uffd-handler --check [--uid UID --gid GID] | --self-test\n"
"Serve a Firecracker microVM's memory from snapshot file MEMFILE through the\n"
"userfaultfd Firecracker sends on Unix socket SOCKET (mem_backend Uffd).\n"
"Each DIFF, oldest first, is a diff snapshot's memory file laid over it.\n"
"\n"
"  -l, --log-level LEVEL        error, warn, info (default) or debug\n"
"      --accept-timeout SEC     exit once no VMM has been connected for SEC\n"
"                               seconds, 3 if none came (default 0: never)\n"
"      --handshake-timeout SEC  close a peer that sent nothing, or reject a\n"
"                               VMM whose handshake is incomplete, SEC\n"
"                               seconds after it connected (default 5);\n"
"                               timeouts go up to 31536000 (a year)\n"
"      --socket-owner UID:GID   chown SOCKET (for a jailed VMM)\n"
"      --socket-mode MODE       chmod SOCKET, octal (e.g. 0600)\n"
"      --uid UID, --gid GID     drop to these ids once SOCKET is bound\n"
"      --no-seccomp             do not confine the handler with seccomp\n"
"      --no-optimize            one page per fault: no runs, no zero pages\n"
"      --populate all           install every page after the handshake,\n"
"                               faults first\n"
"      --populate FILE          install the pages FILE lists first (as\n"
"                               --record wrote it), faults first\n"
"      --record FILE            write the pages the VM needed, in order, to\n"
"                               FILE when it exits\n"
"      --max-vms N              listen until N VMMs have come, serve them\n"
"                               all at once, exit when all are gone (0: no\n"
"                               limit; default 1)\n"
"      --detach                 with --populate all: once every page is in,\n"
"                               unregister and exit 0; the VM runs on alone\n"
"      --threads N              serve faults from N threads, and --populate\n"
"                               from N more (default 2; 1: one thread does\n"
"                               all)\n"
"      --metrics PATH           write the counters to PATH: Prometheus text\n"
"                               (.prom) or JSON lines, every SEC seconds\n"
"      --metrics-interval SEC   (default 10)\n"
"      --check                  can this host serve? (--uid: the VMM's)\n"
"      --self-test              restore a snapshot through this binary\n"
"  -h, --help                   print this help and exit\n"
"  -V, --version                print the version and exit\n"
"\n"
"SIGUSR1 prints the counters at any time (with exit_code -1).\n"
"Exit codes: 0 every VM went away; 1 fatal error while serving (VMM killed);\n"
"2 usage error; 3 setup error (memory file, socket, no VMM in time);\n"
"4 handshake rejected (VMM killed); 5 SIGTERM, SIGINT, SIGHUP or SIGQUIT\n"
"(every VMM killed). With several VMs: the gravest of 5, 1, 4, 0.\n"
"--check: 0 ready, 6 not. --self-test: 0 passed, 1 failed, 3 could not\n"
"start, 6 no userfaultfd here.\n"
"On exit one JSON line of counters is written to standard output.\n");
}

/*
 * A number in base 10 or 8 of at most max: digits only (no sign, blank or
 * prefix, which strtoul would take), *end set to where they stopped, or,
 * without end, nothing after them. 0, or -1.
 */
static int
parse_number(const char *s, unsigned base, uint64_t max, const char **end,
    uint64_t *out)
{
	const char *p = s;
	uint64_t v = 0;

	for (; *p >= '0' && *p < (char)('0' + base); p++) {
		if (v > (max - (uint64_t)(*p - '0')) / base)
			return -1;
		v = v * base + (uint64_t)(*p - '0');
	}
	if (p == s || (end == NULL && *p != '\0'))
		return -1;
	if (end != NULL)
		*end = p;
	*out = v;
	return 0;
}

static int
parse_threads(const char *arg)
{
	uint64_t v;

	if (parse_number(arg, 10, MAX_THREADS, NULL, &v) < 0 || v < 1) {
		fprintf(stderr, "uffd-handler: --threads: '%s' is not a number from "
		    "1 to %d\n", arg, MAX_THREADS);
		return -1;
	}
	opt.threads = (int)v;
	opt.threads_given = 1;
	return 0;
}

static int
parse_seconds(const char *arg, const char *name, int *out)
{
	uint64_t v;

	if (parse_number(arg, 10, 86400 * 365, NULL, &v) < 0) {
		fprintf(stderr, "uffd-handler: %s: '%s' is not a number of "
		    "seconds\n", name, arg);
		return -1;
	}
	*out = (int)v;
	return 0;
}

/* Seconds, at least one. */
static int
parse_period(const char *arg, const char *name, int *out)
{
	if (parse_seconds(arg, name, out) < 0)
		return -1;
	if (*out > 0)
		return 0;
	fprintf(stderr, "uffd-handler: %s must be at least 1 second\n", name);
	return -1;
}

/* A numeric id: a jail has no /etc/passwd to look names up in. */
static int
parse_id(const char *arg, const char *name, long *out, char stop)
{
	const char *end;
	uint64_t v;

	if (parse_number(arg, 10, 0xfffffffeu, &end, &v) < 0 || *end != stop) {
		fprintf(stderr, "uffd-handler: %s: '%s' is not a numeric id\n", name, arg);
		return -1;
	}
	*out = (long)v;
	return 0;
}

static int
parse_owner(const char *arg)
{
	const char *colon = strchr(arg, ':');

	if (colon == NULL) {
		fprintf(stderr, "uffd-handler: --socket-owner: '%s' is not UID:GID\n",
		    arg);
		return -1;
	}
	if (parse_id(arg, "--socket-owner", &opt.sock_uid, ':') < 0 ||
	    parse_id(colon + 1, "--socket-owner", &opt.sock_gid, '\0') < 0)
		return -1;
	return 0;
}

static int
parse_mode(const char *arg)
{
	uint64_t v;

	if (parse_number(arg, 8, 07777, NULL, &v) < 0) {
		fprintf(stderr, "uffd-handler: --socket-mode: '%s' is not an octal "
		    "mode\n", arg);
		return -1;
	}
	opt.sock_mode = (long)v;
	return 0;
}

static int
parse_level(const char *arg)
{
	for (int i = 0; i < 4; i++)
		if (strcmp(arg, level_names[i]) == 0)
			return opt.log_level = i, 0;
	fprintf(stderr, "uffd-handler: --log-level: '%s' is not one of error, "
	    "warn, info, debug\n", arg);
	return -1;
}

static int
set_flag(int c, char *arg)
{
	switch (c) {
	case OPT_NO_SECCOMP:
		opt.seccomp = 0;
		return 0;
	case OPT_NO_OPTIMIZE:
		opt.optimize = 0;
		return 0;
	case OPT_POPULATE:
		if (opt.populate_all || opt.populate_path != NULL) {
			fprintf(stderr, "uffd-handler: --populate given twice: it "
			    "takes either all or one FILE\n");
			return -1;
		}
		if (strcmp(arg, "all") == 0)
			opt.populate_all = 1;
		else
			opt.populate_path = arg;
		return 0;
	case OPT_RECORD:
		opt.record_path = arg;
		return 0;
	case OPT_DETACH:
		opt.detach = 1;
		return 0;
	case OPT_CHECK:
		opt.check = 1;
		return 0;
	case OPT_SELF_TEST:
		opt.self_test = 1;
		return 0;
	case OPT_METRICS:
		opt.metrics_path = arg;
		return 0;
	default:
		return -1;
	}
}

static const struct option longopts[] = {
	{ "log-level", required_argument, NULL, 'l' },
	{ "accept-timeout", required_argument, NULL, OPT_ACCEPT },
	{ "handshake-timeout", required_argument, NULL, OPT_HANDSHAKE },
	{ "socket-owner", required_argument, NULL, OPT_OWNER },
	{ "socket-mode", required_argument, NULL, OPT_MODE },
	{ "uid", required_argument, NULL, OPT_UID },
	{ "gid", required_argument, NULL, OPT_GID },
	{ "no-seccomp", no_argument, NULL, OPT_NO_SECCOMP },
	{ "no-optimize", no_argument, NULL, OPT_NO_OPTIMIZE },
	{ "populate", required_argument, NULL, OPT_POPULATE },
	{ "detach", no_argument, NULL, OPT_DETACH },
	{ "record", required_argument, NULL, OPT_RECORD },
	{ "max-vms", required_argument, NULL, OPT_MAX_VMS },
	{ "threads", required_argument, NULL, OPT_THREADS },
	{ "check", no_argument, NULL, OPT_CHECK },
	{ "self-test", no_argument, NULL, OPT_SELF_TEST },
	{ "metrics", required_argument, NULL, OPT_METRICS },
	{ "metrics-interval", required_argument, NULL, OPT_METRICS_INTERVAL },
	{ "help", no_argument, NULL, 'h' },
	{ "version", no_argument, NULL, 'V' },
	{ NULL, 0, NULL, 0 },
};

/* The option getopt stopped at, by its value: the argument vector may
 * have nothing left to show (a value missing at the end). */
static const char *
option_name(const char *as_given, int val, char *buf, size_t cap)
{
	if (as_given != NULL && as_given[0] == '-')
		return as_given;
	snprintf(buf, cap, "-%c", val > 0 && val < 128 ? val : '?');
	for (size_t i = 0; val >= 128 && longopts[i].name != NULL; i++)
		if (longopts[i].val == val)
			snprintf(buf, cap, "--%s", longopts[i].name);
	return buf;
}

/* One option; returns 0 to go on, 1 to exit successfully, -1 on error. */
static int
set_option(int c, char *arg, const char *as_given)
{
	char name[32];

	if (arg != NULL && arg[0] == '\0') {
		fprintf(stderr, "uffd-handler: %s needs a value (it is empty)\n",
		    option_name(as_given, c, name, sizeof(name)));
		return -1;
	}
	switch (c) {
	case 'l':
		return parse_level(arg);
	case OPT_ACCEPT:
		return parse_seconds(arg, "--accept-timeout", &opt.accept_timeout);
	case OPT_HANDSHAKE:
		return parse_period(arg, "--handshake-timeout", &opt.handshake_timeout);
	case OPT_OWNER:
		return parse_owner(arg);
	case OPT_MODE:
		return parse_mode(arg);
	case OPT_UID:
		return parse_id(arg, "--uid", &opt.uid, '\0');
	case OPT_GID:
		return parse_id(arg, "--gid", &opt.gid, '\0');
	case OPT_MAX_VMS:
		return parse_id(arg, "--max-vms", &opt.max_vms, '\0');
	case OPT_THREADS:
		return parse_threads(arg);
	case OPT_METRICS_INTERVAL:
		return parse_period(arg, "--metrics-interval", &opt.metrics_interval);
	case 'h':
		usage(stdout);
		return 1;
	case 'V':
		printf("uffd-handler %s\n", VERSION_LINE);
		return 1;
	case ':':
		fprintf(stderr, "uffd-handler: %s needs a value (try --help)\n",
		    option_name(as_given, optopt, name, sizeof(name)));
		return -1;
	case '?':
		fprintf(stderr, "uffd-handler: unknown option %s (try --help)\n",
		    option_name(as_given, optopt, name, sizeof(name)));
		return -1;
	default:
		return set_flag(c, arg);
	}
}

/* Returns 0 to run, 1 to exit successfully (help, version), -1 on error. */
static int
parse_options(int argc, char **argv)
{
	const char *serving = NULL;	/* the first option only serving reads */
	char name[32];
	int c, rc = 0, tool_only = 0;

	opterr = 0;
	while (rc == 0 && (c = getopt_long(argc, argv, ":l:hV", longopts, NULL)) != -1) {
		rc = set_option(c, optarg, argv[optind - 1]);
		if (c != OPT_CHECK && c != OPT_SELF_TEST && c != OPT_NO_SECCOMP &&
		    c != OPT_UID && c != OPT_GID && serving == NULL) {
			/* As typed: before its value if that came apart. */
			snprintf(name, sizeof(name), "%s", optind >= 2 && optarg ==
			    argv[optind - 1] ? argv[optind - 2] : argv[optind - 1]);
			name[strcspn(name, "=")] = '\0';
			serving = name;
		}
		tool_only += c == OPT_UID || c == OPT_GID;
	}
	if (rc != 0)
		return rc;
	if (opt.detach && !opt.populate_all) {
		fprintf(stderr, "uffd-handler: --detach needs --populate all\n");
		return -1;
	}
	/* A populated restore faults only what population has not reached:
	 * recording it would write a list that lacks the working set. */
	if (opt.record_path != NULL && (opt.populate_all || opt.populate_path)) {
		fprintf(stderr, "uffd-handler: --record needs a restore without "
		    "--populate: with it only the faults would be recorded\n");
		return -1;
	}
	if (opt.record_path != NULL && opt.max_vms != 1) {
		fprintf(stderr, "uffd-handler: --record records one VM: it needs "
		    "--max-vms 1\n");
		return -1;
	}
	if (opt.check + opt.self_test > 0) {
		if (serving != NULL || (opt.self_test && tool_only)) {
			fprintf(stderr, "uffd-handler: %s means nothing to %s, which "
			    "takes %s\n", serving ? serving : "--uid or --gid",
			    opt.check ? "--check" : "--self-test", opt.check ?
			    "--uid, --gid and --no-seccomp" : "--no-seccomp alone");
			return -1;
		}
		if (opt.check + opt.self_test == 1 && argc == optind)
			return 0;
		fprintf(stderr, "uffd-handler: --check and --self-test take no "
		    "SOCKET or MEMFILE, and not each other\n");
		return -1;
	}
	if (argc - optind < 2) {
		fprintf(stderr, "uffd-handler: expected SOCKET, MEMFILE and any "
		    "DIFFs (try --help)\n");
		return -1;
	}
	for (int i = optind; i < argc; i++)
		if (argv[i][0] == '\0') {
			fprintf(stderr, "uffd-handler: operand %d is empty: SOCKET, "
			    "MEMFILE and DIFFs are paths\n", i - optind + 1);
			return -1;
		}
	opt.socket_path = argv[optind];
	opt.layers = argv + optind + 1;
	opt.nlayers = argc - optind - 1;
	return 0;
}

static void __attribute__((format(printf, 2, 3)))
logmsg(int level, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	int n;

	if (level > opt.log_level)
		return;
	n = snprintf(line, sizeof(line), "uffd-handler: %s: ", level_names[level]);
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	n = (int)strlen(line);
	line[n++] = '\n';
	(void)!write(STDERR_FILENO, line, (size_t)n);
}

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000 + (uint64_t)ts.tv_nsec;
}

static int64_t
now_ms(void)
{
	return (int64_t)(now_ns() / 1000000);
}

/* poll's timeout until deadline (ms; INT64_MAX: none), which may lie past
 * what an int holds: timeouts go up to a year. */
static int
ms_until(int64_t deadline)
{
	int64_t left = deadline - now_ms();

	if (deadline == INT64_MAX)
		return -1;
	return left <= 0 ? 0 : left > INT_MAX ? INT_MAX : (int)left;
}

static void
closefd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* path's directory ("." for none) into dir, its last part into name. */
static void
split_path(const char *path, char *dir, size_t dcap, char *name, size_t ncap)
{
	const char *slash = strrchr(path, '/');

	if (slash == NULL)
		snprintf(dir, dcap, ".");
	else
		snprintf(dir, dcap, "%.*s", slash == path ? 1 : (int)(slash - path),
		    path);
	if (name != NULL)
		snprintf(name, ncap, "%s", slash ? slash + 1 : path);
}

/*
 * Room for element n of an array of *cap elements of size bytes, doubled
 * (from first) when full: the array, moved or not, or NULL without memory
 * (the old one still there).
 */
static void *
grow_array(void *a, size_t *cap, size_t n, size_t size, size_t first)
{
	size_t c = *cap ? 2 * *cap : first;
	void *b;

	if (n < *cap)
		return a;
	if (c > SIZE_MAX / size || (b = realloc(a, c * size)) == NULL)
		return NULL;
	*cap = c;
	return b;
}

/*
 * A signal that came during setup, before the loop reads the signalfd: a
 * stopping signal ends the start (-ECANCELED: exit 5); SIGUSR1 has no VM
 * to report on yet.
 */
static int
setup_interrupted(int sigfd)
{
	struct signalfd_siginfo si;

	while (read(sigfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		if (si.ssi_signo == SIGUSR1 || si.ssi_signo == SIGUSR2 ||
		    si.ssi_signo == SIGCHLD)
			continue;
		logmsg(LOG_WARN, "received %s during setup", strsignal((int)si.ssi_signo));
		return -ECANCELED;
	}
	return 0;
}

/* ------------------------------------------------------------------------
 * 2. The memory source
 *
 * MEMFILE and any DIFFs laid over it, mapped read-only once and shared by
 * every session; which layer holds each 4 KiB block; reading them in user
 * space under a SIGBUS guard, since a file truncated under the handler
 * faults there.
 * ------------------------------------------------------------------------ */

/*
 * The memory file, or a chain of them. MEMFILE is a full snapshot's memory;
 * each DIFF after it (Firecracker's Diff snapshot type) is a sparse file of
 * the same size holding only the pages dirtied since the snapshot before.
 * Every 4 KiB block comes from the newest layer that holds data there, a
 * block that is a hole in every layer reads as zero: what snapshot-editor's
 * rebase would write, served without writing it. Which layer holds which
 * block is found once, before any VMM connects, with SEEK_DATA/SEEK_HOLE
 * (the blocks the rebase tool copies), and kept a byte a block, 256 KiB a
 * GiB of guest; the fault path reads that map, never the filesystem. The
 * layers are mapped read-only once and shared by every session.
 */
#define MAX_LAYERS	255		/* a layer number a block, in a byte */

struct layer {
	const char *path;
	int fd;
	const char *mem;
	dev_t dev;
	ino_t ino;
	int in_memory;			/* tmpfs, a memfd: see memory_fs */
};

struct chain {
	struct layer layer[MAX_LAYERS];
	int n;
	uint64_t size;			/* of every layer */
	uint8_t *map;			/* a block's newest layer + 1; 0: hole */
};

/* The bytes at file offset off, and how many of *len (whole blocks) lie
 * in the same layer: the first block's, or holes in every layer, which
 * read as zero from any. */
static const char *
layer_src(const struct chain *c, uint64_t off, uint64_t *len)
{
	uint64_t b = off / PAGE_4K, end = b + *len / PAGE_4K, i;
	uint8_t l = 0;

	if (c->n == 1)
		return c->layer[0].mem + off;
	for (i = b; i < end; i++) {
		if (c->map[i] == 0 || c->map[i] == l)
			continue;
		if (l != 0)
			break;
		l = c->map[i];
	}
	*len = (i - b) * PAGE_4K;
	return c->layer[l ? l - 1 : 0].mem + off;
}

static const char *
layer_path(const struct chain *c, uint64_t off)
{
	uint8_t l = off / PAGE_4K < c->size / PAGE_4K ? c->map[off / PAGE_4K] : 0;

	return c->layer[l ? l - 1 : 0].path;
}

/* Marks the blocks layer i holds data in; the number of its extents. */
static long
map_layer(struct chain *c, int i)
{
	const struct layer *y = &c->layer[i];
	off_t end = (off_t)c->size, at = 0, hole;
	long extents = 0;

	while (at < end && (at = lseek(y->fd, at, SEEK_DATA)) >= 0 && at < end) {
		if ((hole = lseek(y->fd, at, SEEK_HOLE)) < 0)
			return -errno;
		for (uint64_t b = (uint64_t)at / PAGE_4K;
		    b < ((uint64_t)hole + PAGE_4K - 1) / PAGE_4K; b++)
			c->map[b] = (uint8_t)(i + 1);
		extents++;
		at = hole;
	}
	if (at < 0 && errno != ENXIO)
		return -errno;
	return extents;
}

static int
chain_map(struct chain *c, int sigfd)
{
	uint64_t t0 = now_ns();
	long extents;
	int rc;

	if ((c->map = calloc(c->size / PAGE_4K + 1, 1)) == NULL) {
		logmsg(LOG_ERROR, "allocating the layer map: %s", strerror(ENOMEM));
		return -ENOMEM;
	}
	for (int i = 0; i < c->n; i++) {
		if ((rc = setup_interrupted(sigfd)) < 0)
			return rc;
		if ((extents = map_layer(c, i)) < 0) {
			logmsg(LOG_ERROR, "lseek(%s, SEEK_DATA): %s", c->layer[i].path,
			    strerror((int)-extents));
			return (int)extents;
		}
		/* One extent over the whole file: no hole at all. */
		if (i > 0 && extents == 1 && lseek(c->layer[i].fd, 0, SEEK_HOLE) ==
		    (off_t)c->size)
			logmsg(LOG_WARN, "diff %s has no holes: every page of it "
			    "overrides the layers before, zeros included (copied "
			    "without keeping holes?)", c->layer[i].path);
	}
	if (c->n > 1)
		logmsg(LOG_INFO, "%d layers of %llu bytes mapped in %llu us (%llu KiB "
		    "of map)", c->n, (unsigned long long)c->size,
		    (unsigned long long)((now_ns() - t0) / 1000),
		    (unsigned long long)(c->size / PAGE_4K / 1024));
	return 0;
}

/*
 * A file on tmpfs (a memfd too), ramfs or hugetlbfs is memory: a page of
 * it not in the page cache is a hole or in swap, and POSIX_FADV_WILLNEED
 * reads nothing there, so the fault path never waits for it (see fetch).
 */
#define TMPFS_MAGIC	0x01021994
#define RAMFS_MAGIC	0x858458f6
#define HUGETLBFS_MAGIC	0x958458f6

static int
memory_fs(int fd)
{
	struct statfs fs;

	return fstatfs(fd, &fs) == 0 && (fs.f_type == TMPFS_MAGIC ||
	    fs.f_type == RAMFS_MAGIC || fs.f_type == HUGETLBFS_MAGIC);
}

/* Layer i of the chain, from its open descriptor fd: checked, mapped. */
static int
layer_take(struct chain *c, int i, const char *path, int fd)
{
	struct layer *y = &c->layer[i];
	struct stat st;
	void *m;

	y->path = path;
	if ((y->fd = fd) < 0 || fstat(y->fd, &st) < 0) {
		logmsg(LOG_ERROR, "open(%s): %s", path, strerror(errno));
		return -errno;
	}
	if (!S_ISREG(st.st_mode)) {
		logmsg(LOG_ERROR, "%s is not a regular file", path);
		return -EINVAL;
	}
	y->dev = st.st_dev;
	y->ino = st.st_ino;
	y->in_memory = memory_fs(y->fd);
	for (int j = 0; j < i; j++)
		if (c->layer[j].dev == y->dev && c->layer[j].ino == y->ino) {
			logmsg(LOG_ERROR, "%s and %s are the same file: a chain "
			    "names each layer once", c->layer[j].path, path);
			return -EINVAL;
		}
	if (i == 0)
		c->size = (uint64_t)st.st_size;
	if ((uint64_t)st.st_size != c->size) {
		logmsg(LOG_ERROR, "diff %s has %llu bytes, the base %s %llu: the "
		    "layers of a chain are the same size", path,
		    (unsigned long long)st.st_size, c->layer[0].path,
		    (unsigned long long)c->size);
		return -EINVAL;
	}
	if (c->size == 0)
		return 0;
	m = mmap(NULL, c->size, PROT_READ, MAP_SHARED, y->fd, 0);
	if (m == MAP_FAILED) {
		logmsg(LOG_ERROR, "mmap(%s, %llu bytes): %s", path,
		    (unsigned long long)c->size, strerror(errno));
		return -errno;
	}
	y->mem = m;
	return 0;
}

static int
layer_open(struct chain *c, int i, const char *path)
{
	/* Non-blocking: a FIFO would hold up the start in open(). */
	return layer_take(c, i, path, open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK));
}

/* MEMFILE and the DIFFs, oldest first; 0 or a negative errno, logged. */
static int
chain_open(struct chain *c, char *const *paths, int n, int sigfd)
{
	int rc;

	if (n > MAX_LAYERS) {
		logmsg(LOG_ERROR, "%d layers: a chain has at most %d (MEMFILE and "
		    "%d diffs)", n, MAX_LAYERS, MAX_LAYERS - 1);
		return -E2BIG;
	}
	for (c->n = 0; c->n < n; c->n++)
		if ((rc = setup_interrupted(sigfd)) < 0 ||
		    (rc = layer_open(c, c->n, paths[c->n])) < 0) {
			c->n += rc != -ECANCELED;
			return rc;
		}
	return chain_map(c, sigfd);
}

/* The chain from descriptors the image before this one opened (an
 * upgrade): checked and mapped the same way, the map made again. */
static int
chain_take(struct chain *c, char *const *paths, const int *fds, int n,
    int sigfd)
{
	int rc;

	for (c->n = 0; c->n < n; c->n++)
		if ((rc = layer_take(c, c->n, paths[c->n], fds[c->n])) < 0) {
			c->n++;
			return rc;
		}
	return chain_map(c, sigfd);
}

/* Safe to call twice. */
static void
chain_close(struct chain *c)
{
	for (int i = 0; i < c->n; i++) {
		closefd(&c->layer[i].fd);
		if (c->layer[i].mem != NULL)
			munmap((void *)c->layer[i].mem, c->size);
		c->layer[i].mem = NULL;
	}
	free(c->map);
	c->map = NULL;
	c->n = 0;
}

/*
 * Reading the mapped file in user space (to find all-zero pages) faults
 * with SIGBUS if the file was truncated; the kernel's own copies get EFAULT
 * instead. The guard turns the signal into an error. The jump buffer is
 * global because a signal handler can reach nothing else, and the
 * thread's own: SIGBUS goes to the thread that read.
 */
static _Thread_local sigjmp_buf bus_jmp;
static _Thread_local volatile sig_atomic_t bus_armed;

static void
on_sigbus(int sig)
{
	if (bus_armed)
		siglongjmp(bus_jmp, 1);
	signal(sig, SIG_DFL);
	raise(sig);
}

static int
is_zero(const char *p, size_t len)
{
	const uint64_t *w = (const uint64_t *)(const void *)p;

	for (size_t i = 0; i < len / 8; i++)
		if (w[i] != 0)
			return 0;
	return 1;
}

/* ------------------------------------------------------------------------
 * 3. A session and its lanes
 *
 * What serving one VM is made of. A session is one VMM: what must outlive
 * a server (its descriptors, regions, bitmaps and counters) and what need
 * not (its lanes, locks, streams and the handshake's buffer). A lane is one
 * thread's part in serving it.
 * ------------------------------------------------------------------------ */

/* A sequential fault stream: the page it should fault next, its window. */
struct stream {
	uint64_t next;
	uint64_t window;
	uint64_t used;
};

/*
 * A queued fault: its address and flags, when its event was read, and its
 * stream and window once chosen. A fault deferred by EAGAIN keeps them, so
 * its retries neither grow a window nor take over another stream.
 */
struct fault {
	uint64_t addr;
	uint64_t flags;
	uint64_t read_ns;
	uint64_t removes;		/* the session's, when it was read */
	struct stream *stream;
	uint64_t window;
	int fetching;			/* its page is being read in: see fetch */
};

#define STREAMS		8
#define MAX_RUN_4K	512		/* 2 MiB ahead at most */
#define MAX_RUN_2M	4
#define ZERO_SRC	(MAX_RUN_2M * PAGE_2M)	/* covers the longest run */
#define POPULATE_STEP	(2ull << 20)	/* a population step: see count_steps */
#define MAX_LANES	(2 * MAX_THREADS)

struct counters {
	uint64_t faults, pages_copied, zero_pages, remove_events, pages_removed;
	uint64_t deferred, bytes_copied, already_present, unregistered;
	uint64_t zero_data_pages, prefetched, syscalls, populated, zero_mapped;
	uint64_t populate_skipped;	/* removed or holes: read zero anyway */
	uint64_t populate_absent;	/* ENOENT on the page alone */
	uint64_t fetched;		/* faults whose page was read in first */
	uint64_t service_us_log2[16];	/* event read to page in, by 2^k us */
	uint64_t room[7];		/* for counters to come, same layout */
};

/*
 * A range a lane is installing, from before its UFFDIO calls until its
 * pages are marked present (and, for a fault, recorded): what a server
 * that died there may have installed without saying so.
 */
struct install_mark {
	uint64_t dst, len;
	uint64_t fault;			/* 1: a fault's window, 0: population */
};

/* A region as the handshake gave it, and where its bitmaps lie in the
 * state: byte offsets from the start of struct vm_state. */
struct region_state {
	uint64_t base, size, offset, page_size;
	uint64_t removed, present, recorded;	/* 0: none */
};

/*
 * What a session's correctness depends on, kept in a memfd (mapped
 * MAP_SHARED) so that it outlives the process that serves it: the
 * regions and the bitmaps of the pages the guest removed and the pages
 * installed, population's progress, the --record list, the counters, and
 * the REMOVE window (reading is odd from the read() of the uffd until the
 * REMOVEs it returned are in the bitmap: a server that dies there lost
 * what only it knew). The layout is versioned: a reader that finds
 * another layout does not guess.
 */
#define STATE_MAGIC	0x55464653u	/* "UFFS" */
#define STATE_LAYOUT	2

struct vm_state {
	uint32_t magic, layout;
	uint64_t bytes;			/* of the memfd */
	int32_t pid;			/* the VMM's, at the handshake */
	uint32_t nregions;
	uint64_t reading;		/* the REMOVE window, see above */
	uint64_t removes;		/* REMOVE events applied */
	uint32_t detaching;		/* --detach began unregistering */
	uint32_t pop_failed;		/* population stopped on an error */
	uint64_t pop_start;		/* CLOCK_MONOTONIC ns */
	uint64_t steps;			/* population steps in all */
	uint64_t steps_done;		/* offset of the bitmap of steps finished */
	uint64_t norder;		/* --record: pages listed so far */
	uint64_t order;			/* offset of their file offsets; 0: none */
	struct counters n;		/* updated atomically: see count */
	struct install_mark marks[MAX_LANES];
	struct region_state regions[];
};

/*
 * A session's durable part: the descriptors the keeper holds a copy of
 * (its connection, the uffd, the VMM's pidfd, the state's memfd) and the
 * state itself.
 */
struct vm {
	int conn, uffd, pidfd, statefd;
	pid_t pid;
	struct vm_state *st;		/* NULL until the handshake is taken */
};

/* A region with its bitmaps resolved: removed and present lie in the
 * state, zero and hole are this process's (they can be found again). */
struct region {
	uint64_t base, size, offset, page_size;
	uint64_t *removed;		/* a bit per page the guest discarded */
	uint64_t *present;		/* a bit per page installed, until removed */
	uint64_t *recorded;		/* --record: a bit per page listed */
	uint64_t *zero;			/* a bit per page known all zero in the file */
	uint64_t *hole;			/* a bit per page wholly in a sparse hole */
};

/*
 * A connection's life: nothing received yet, then a VMM whose message is
 * still arriving, then served; a VMM that hung up mid-message is given a
 * moment to be seen dead before it is killed.
 */
enum conn_state { S_HELLO, S_HANDSHAKE, S_SERVING, S_CLOSING, S_ENDED };

/* What an epoll event points at: a session's fd, by W_*, or the server's. */
enum { W_CONN, W_UFFD, W_PIDFD, W_LISTEN, W_SIGNAL, W_NOTE, W_CTL };

struct watch {
	struct session *s;
	int what;
};

/* A session: its durable part, and what a server can build again. */
struct session {
	struct vm vm;
	int slot;			/* the keeper's, for this connection */
	uint32_t gen;			/* and its generation */
	int vmm;			/* it sent a byte */
	struct counters *n;		/* &vm.st->n, or pre */
	struct counters pre;		/* before the state, and after it */
	struct region *regions;
	size_t nregions;
	const struct chain *chain;	/* the memory, the server's */
	enum conn_state state;
	int64_t deadline;		/* ms: of the handshake, or of closing */
	size_t got;			/* handshake bytes received */
	int fresh;			/* accepted this round, not read yet */
	int ctrunc;			/* the kernel dropped fds sent with it */
	uint32_t ev[3];			/* epoll events this round, by W_* */
	struct watch w[3];
	const char *zeros;		/* ZERO_SRC bytes of zeros to copy from */
	struct uffd_mapping *mappings;
	struct lane *lanes;		/* one a serving thread, then population's */
	int nlanes;
	struct stream streams[STREAMS];
	uint64_t stream_clock;
	int populating;			/* not finished (atomic) */
	uint64_t step_next;		/* population's next step to claim (atomic) */
	uint64_t steps_left;		/* not finished yet (atomic) */
	uint64_t *steps_done;		/* in the state */
	uint64_t *order;		/* in the state */
	const uint64_t *pop_list;	/* --populate FILE */
	size_t pop_n;
	int record_fd;			/* --record FILE */
	pthread_mutex_t turn;		/* a reader waiting holds off installs */
	pthread_rwlock_t rw;		/* shared: installing; exclusive: reading */
	pthread_mutex_t mu;		/* the streams, the record */
	int users;			/* threads inside (atomic) */
	int open;			/* threads may enter (atomic) */
	int outcome;			/* a thread's ending: 1 gone, < 0 fatal */
	int logged;			/* LOGGED_*: said once, whichever thread */
	int ending;			/* session_end is under way */
	int threaded;			/* its uffd is in the threads' set */
	int to_threads;			/* to go there once the loop may let go */
	int wepfd;			/* that set, to arm it again in */
	char handshake[HANDSHAKE_MAX];
};

/*
 * A thread's part in serving one VM: the faults it read and has not served
 * yet, what it is reading, its 2 MiB buffer, its last failure. With
 * --threads 1 a session has one lane and the loop is its only thread.
 */
struct lane {
	struct session *s;
	int id;				/* its index: its mark in the state */
	struct fault *faults;		/* read, not served yet */
	size_t nfaults, faults_cap;
	uint64_t reading;		/* file offset last read in user space */
	int writing;			/* and whether it is a write */
	uint64_t suspect_dst;		/* see pool_exhausted */
	int64_t suspect_ms;
	struct {			/* the last UFFDIO call that failed */
		const char *op;
		uint64_t dst, len;
	} failed;
	char *bounce;			/* a 2 MiB page of several layers */
	int populates;			/* --populate runs in this lane */
	int dontwake;			/* its copies wake nobody: see lanes_open */
	uint64_t step, step_at;		/* its population step, and how far */
	int finished;			/* it finished the last step */
	int held;			/* installing: rw held shared */
	int armed;			/* this turn gave the uffd back: see rearm */
	struct uffd_msg msgs[EVENT_BATCH];
};

/* What a session's threads may each run into, logged by the first. */
enum { LOGGED_SHRANK = 1, LOGGED_FATAL = 2, LOGGED_GONE = 4, LOGGED_POP = 8 };

static int
first_time(struct session *s, int what)
{
	return !(__atomic_fetch_or(&s->logged, what, __ATOMIC_SEQ_CST) & what);
}

/* Counters are added to from every serving thread, and read while they
 * are (SIGUSR1, the population's log lines). */
static void
count(uint64_t *c, uint64_t v)
{
	__atomic_fetch_add(c, v, __ATOMIC_RELAXED);
}

static uint64_t
counted(const uint64_t *c)
{
	return __atomic_load_n(c, __ATOMIC_RELAXED);
}

/*
 * The removed pages' lock (see "Threads" at the top): installs hold rw
 * shared, reading the uffd holds it exclusive. A reader waits in turn,
 * which new installs pass through, so a stream of installs cannot starve
 * it (musl's rwlock prefers readers).
 */
static void
install_lock(struct lane *l)
{
	pthread_mutex_lock(&l->s->turn);
	pthread_rwlock_rdlock(&l->s->rw);
	pthread_mutex_unlock(&l->s->turn);
	l->held = 1;
}

static void
install_unlock(struct lane *l)
{
	l->held = 0;
	pthread_rwlock_unlock(&l->s->rw);
}

static void
reader_lock(struct session *s)
{
	pthread_mutex_lock(&s->turn);
	pthread_rwlock_wrlock(&s->rw);
	pthread_mutex_unlock(&s->turn);
}

static void
reader_unlock(struct session *s)
{
	pthread_rwlock_unlock(&s->rw);
}

/* ------------------------------------------------------------------------
 * 4. The UFFDIO helpers
 *
 * Each reads the kernel's result field, advances over
 * partial progress, and maps the errno to done / retry / gone / absent;
 * anything else is returned as a negative errno. They log nothing: whether
 * a failure is fatal depends on whose page it was (see serve_fault), and
 * the failed call is kept in s->failed for that one place to report.
 * ------------------------------------------------------------------------ */

/*
 * Results of the UFFDIO helpers; errors are negative errnos. IO_DONE also
 * when the kernel stopped at a page already present (fewer bytes done).
 */
enum { IO_DONE, IO_RETRY, IO_GONE, IO_ABSENT, IO_WAIT };

static int
uffdio_failed(struct lane *l, const char *op, uint64_t dst, uint64_t len,
    int err)
{
	l->failed.op = op;
	l->failed.dst = dst;
	l->failed.len = len;
	return -err;
}

static void
log_failure(struct lane *l, int level, int rc)
{
	logmsg(level, "%s(dst=0x%llx, len=%llu): %s%s", l->failed.op,
	    (unsigned long long)l->failed.dst, (unsigned long long)l->failed.len,
	    strerror(-rc), rc == -ENOMEM && l->failed.len >= PAGE_2M ?
	    " (hugetlb pool exhausted? see /proc/sys/vm/nr_hugepages)" : "");
}

static int
uffdio_wake(struct lane *l, uint64_t start, uint64_t len)
{
	struct session *s = l->s;
	struct uffdio_range r = { start, len };

	count(&s->n->syscalls, 1);
	if (ioctl(s->vm.uffd, (int)UFFDIO_WAKE, &r) == 0)
		return IO_DONE;
	if (errno == ESRCH)
		return IO_GONE;
	if (errno == ENOENT)
		return IO_DONE;
	return uffdio_failed(l, "UFFDIO_WAKE", start, len, errno);
}

/* ENOENT: nothing of the range is registered any more. */
static int
uffdio_unregister(struct lane *l, uint64_t start, uint64_t len)
{
	struct session *s = l->s;
	struct uffdio_range r = { start, len };

	count(&s->n->syscalls, 1);
	if (ioctl(s->vm.uffd, (int)UFFDIO_UNREGISTER, &r) == 0 || errno == ENOENT)
		return IO_DONE;
	if (errno == ESRCH)
		return IO_GONE;
	return uffdio_failed(l, "UFFDIO_UNREGISTER", start, len, errno);
}

/*
 * ENOENT: the range is not inside one registered VMA. It copies nothing,
 * also when the range merely crosses from one VMA into the next (a region
 * cut by mprotect or madvise, as memory hotplug does), so the caller
 * decides what it means (see install_split).
 */
static int
uffdio_result(struct lane *l, int err, uint64_t dst, uint64_t len,
    const char *what)
{
	struct session *s = l->s;

	switch (err) {
	case EEXIST:
		/* Already present: wake in case a waiter raced the copy. */
		count(&s->n->already_present, 1);
		return uffdio_wake(l, dst, len);
	case EAGAIN:
		return IO_RETRY;
	case ENOENT:
		return IO_ABSENT;
	case ESRCH:
		return IO_GONE;
	default:
		return uffdio_failed(l, what, dst, len, err);
	}
}

#ifdef BREAK_SERVED_BYTE
/*
 * A build for the suite alone (build/broken): the byte at this offset of
 * the memory file is served flipped, so the self-test can be seen to fail
 * against a handler that installs a wrong page.
 */
static const char *
break_byte(struct lane *l, const char *src, uint64_t len)
{
	static char buf[ZERO_SRC] __attribute__((aligned(4096)));
	const char *at = l->s->chain->layer[0].mem + BREAK_SERVED_BYTE;

	if (at < src || at >= src + len || len > sizeof(buf))
		return src;
	memcpy(buf, src, len);
	buf[at - src] ^= 0x5a;
	return buf;
}
#endif

/* *done accumulates the bytes installed, also when the result is retry. */
static int
uffdio_copy(struct lane *l, uint64_t dst, const char *src, uint64_t len,
    uint64_t *done)
{
	struct session *s = l->s;
	struct uffdio_copy c;

#ifdef BREAK_SERVED_BYTE
	src = break_byte(l, src, len);
#endif
	for (;;) {
		c = (struct uffdio_copy){ .dst = dst, .src = (uintptr_t)src, .len = len,
		    .mode = l->dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0 };
		count(&s->n->syscalls, 1);
		if (ioctl(s->vm.uffd, (int)UFFDIO_COPY, &c) == 0) {
			*done += len;
			return IO_DONE;
		}
		if (c.copy <= 0)
			return uffdio_result(l, errno, dst, len, "UFFDIO_COPY");
		*done += (uint64_t)c.copy;
		dst += (uint64_t)c.copy;
		src += c.copy;
		len -= (uint64_t)c.copy;
	}
}

static int
uffdio_zeropage(struct lane *l, uint64_t dst, uint64_t len, uint64_t *done)
{
	struct session *s = l->s;
	struct uffdio_zeropage z;

	for (;;) {
		z = (struct uffdio_zeropage){ .range = { dst, len } };
		count(&s->n->syscalls, 1);
		if (ioctl(s->vm.uffd, (int)UFFDIO_ZEROPAGE, &z) == 0) {
			*done += len;
			return IO_DONE;
		}
		if (z.zeropage <= 0)
			return uffdio_result(l, errno, dst, len, "UFFDIO_ZEROPAGE");
		*done += (uint64_t)z.zeropage;
		dst += (uint64_t)z.zeropage;
		len -= (uint64_t)z.zeropage;
	}
}

/* ------------------------------------------------------------------------
 * 5. The fault path
 *
 * A fault's page is found in its region, its window chosen by the stream it
 * follows, and the window installed as runs of one kind (data, zeros the
 * snapshot holds, zeros the guest asked for), one ioctl each, halved where
 * a run crosses a VMA. Only the faulting page's own failure is fatal.
 * ------------------------------------------------------------------------ */

static struct region *
find_region(struct session *s, uint64_t addr)
{
	size_t lo = 0, hi = s->nregions;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		struct region *r = &s->regions[mid];

		if (addr < r->base)
			hi = mid;
		else if (addr - r->base >= r->size)
			lo = mid + 1;
		else
			return r;
	}
	return NULL;
}

/* Atomic: serving threads set bits of the same word at once. */
static int
bit_test(const uint64_t *map, uint64_t i)
{
	return (__atomic_load_n(&map[i / 64], __ATOMIC_RELAXED) >> (i % 64)) & 1;
}

static void
bit_set(uint64_t *map, uint64_t i)
{
	__atomic_fetch_or(&map[i / 64], (uint64_t)1 << (i % 64), __ATOMIC_RELAXED);
}

static void
bit_clear(uint64_t *map, uint64_t i)
{
	__atomic_fetch_and(&map[i / 64], ~((uint64_t)1 << (i % 64)),
	    __ATOMIC_RELAXED);
}

/* Explains an EFAULT from a copy: the usual cause is a truncated file. */
static void
check_memfile(struct lane *l)
{
	struct session *s = l->s;
	const struct chain *c = s->chain;
	struct stat st;

	if (!first_time(s, LOGGED_SHRANK))
		return;
	for (int i = 0; i < c->n; i++)
		if (fstat(c->layer[i].fd, &st) == 0 && S_ISREG(st.st_mode) &&
		    (uint64_t)st.st_size < c->size)
			logmsg(LOG_ERROR, "memory file %s shrank from %llu to %llu "
			    "bytes while serving", c->layer[i].path,
			    (unsigned long long)c->size, (unsigned long long)st.st_size);
}

enum { KIND_DATA, KIND_ZERO, KIND_REMOVED, KIND_SKIP };

/*
 * What page idx must hold: zeros because the guest removed it, zeros
 * because the snapshot page is all zero (a hole, or zero bytes), or data.
 * Hugetlb has no zero page: a 2 MiB page is zero only when it lies wholly
 * in a hole, and is never scanned.
 * A write fault gets a copy whatever the page holds, so its window is not
 * scanned: a zero page copied from the file costs what one copied from
 * zeros does, and scanning would cut the window into short runs (on the
 * benchmark's snapshot, 180 ioctls per 2 MiB instead of one).
 */
static int
page_kind(struct lane *l, struct region *r, uint64_t idx)
{
	struct session *s = l->s;
	uint64_t one = PAGE_4K;

	if (bit_test(r->removed, idx))
		return KIND_REMOVED;
	if (!opt.optimize)
		return KIND_DATA;
	if (bit_test(r->hole, idx) || bit_test(r->zero, idx))
		return KIND_ZERO;
	if (r->page_size != PAGE_4K || l->writing)
		return KIND_DATA;
	l->reading = r->offset + idx * PAGE_4K;
	if (!is_zero(layer_src(s->chain, l->reading, &one), PAGE_4K))
		return KIND_DATA;
	bit_set(r->zero, idx);
	return KIND_ZERO;
}

/*
 * Whether a run of this kind may start ahead of the faulting page. Not a
 * removed page: the guest gave it back, and a copy would take memory (and,
 * behind an unplugged hotplug slot's PROT_NONE, show later). Not zeros
 * that would be copied rather than mapped (hugetlb, or a write window):
 * memory spent on pages that read as zero anyway, and unplugged hotplug
 * slots are holes. The faulting page's own run is another matter: a
 * stream that faults inside a hole goes on through it (see serve_window).
 */
static int
may_prefetch(struct lane *l, const struct region *r, int kind)
{
	return kind == KIND_DATA ||
	    (kind == KIND_ZERO && r->page_size == PAGE_4K && !l->writing);
}

/*
 * Sequential detection. A fault at the page a stream expects next doubles
 * that stream's window; any other fault starts a clean stream of one page
 * in place of the least recently used, so random access never installs
 * pages the guest did not ask for. Chosen once per fault, under mu: the
 * streams are the session's, whichever thread serves the fault.
 */
static void
choose_window(struct session *s, struct region *r, uint64_t page,
    struct fault *f)
{
	uint64_t max = (r->page_size == PAGE_4K ? MAX_RUN_4K : MAX_RUN_2M);
	uint64_t left = (r->base + r->size - page) / r->page_size;
	struct stream *st = &s->streams[0];

	if (!opt.optimize) {
		f->stream = st;
		f->window = 1;
		return;
	}
	pthread_mutex_lock(&s->mu);
	for (size_t i = 0; i < STREAMS; i++)
		if (s->streams[i].next == page) {
			st = &s->streams[i];
			st->window = st->window * 2 > max ? max : st->window * 2;
			goto found;
		}
	for (size_t i = 1; i < STREAMS; i++)
		if (s->streams[i].used < st->used)
			st = &s->streams[i];
	*st = (struct stream){ .next = UINT64_MAX, .window = 1 };
found:
	st->used = ++s->stream_clock;
	f->stream = st;
	f->window = st->window < left ? st->window : left;
	pthread_mutex_unlock(&s->mu);
}

/* --record: each page installed for a fault, once, in order. The entry
 * is written before the count that makes it part of the list, and the
 * bits are found again from the list (see state_attach). */
static void
record_pages(struct session *s, struct region *r, uint64_t idx, uint64_t n)
{
	struct vm_state *st = s->vm.st;

	if (s->order == NULL)
		return;
	pthread_mutex_lock(&s->mu);
	for (uint64_t i = idx; i < idx + n; i++)
		if (!bit_test(r->recorded, i)) {
			s->order[st->norder] = r->offset + i * r->page_size;
			__atomic_store_n(&st->norder, st->norder + 1, __ATOMIC_RELEASE);
			bit_set(r->recorded, i);
		}
	pthread_mutex_unlock(&s->mu);
}

/*
 * A hugetlb copy that finds the pool exhausted answers EEXIST, not ENOMEM,
 * and installs nothing (measured on Linux 6.18: kernel_hugetlb_exhausted_
 * is_eexist). Taken for "already present", the faulting vCPU would be
 * woken to fault again, forever. Only this handler installs pages in a
 * registered range, so EEXIST on a page it never installed (or whose
 * install a REMOVE undid) is the pool: ENOMEM. Not at once: a REMOVE's
 * madvise caller zaps its pages only after it has resumed, so for a moment
 * a removed page is still there. The same page still refused after
 * SUSPECT_MS is the pool; before, the copy is retried.
 */
#define SUSPECT_MS	20

static int
pool_exhausted(struct lane *l, struct region *r, uint64_t idx)
{
	struct session *s = l->s;
	uint64_t dst = r->base + idx * r->page_size;

	count(&s->n->already_present, (uint64_t)-1);		/* uffdio_result counted it */
	if (l->suspect_dst != dst) {
		l->suspect_dst = dst;
		l->suspect_ms = now_ms();
	}
	if (now_ms() - l->suspect_ms < SUSPECT_MS)
		return IO_RETRY;
	return uffdio_failed(l, "UFFDIO_COPY", dst, r->page_size, ENOMEM);
}

/* Maps the source of len bytes at file offset off, layer by layer. */
static void
map_source(struct lane *l, uint64_t off, uint64_t len)
{
	struct session *s = l->s;

	for (uint64_t at = 0, seg; at < len; at += seg) {
		const char *src;

		seg = len - at;
		src = layer_src(s->chain, off + at, &seg);
		count(&s->n->syscalls, 1);
		madvise((void *)src, seg, MADV_POPULATE_READ);
	}
}

/*
 * A 2 MiB page whose 4 KiB blocks come from several layers of a chain
 * (dirty tracking is 4 KiB even on hugetlb), put together in the bounce
 * buffer; NULL when that cannot be had.
 */
static const char *
assemble(struct lane *l, uint64_t off)
{
	struct session *s = l->s;
	void *b;

	if (l->bounce == NULL) {
		b = mmap(NULL, PAGE_2M, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (b == MAP_FAILED)
			return NULL;
		l->bounce = b;
	}
	for (uint64_t at = 0; at < PAGE_2M; at += PAGE_4K) {
		uint8_t n = s->chain->map[(off + at) / PAGE_4K];

		l->reading = off + at;
		if (n == 0)
			memset(l->bounce + at, 0, PAGE_4K);
		else
			memcpy(l->bounce + at, s->chain->layer[n - 1].mem + off + at,
			    PAGE_4K);
	}
	return l->bounce;
}

/*
 * Copies len bytes of data pages at page index idx, one UFFDIO_COPY per
 * stretch of one layer. A hugetlb copy whose source is not mapped here
 * goes through a second, temporary 2 MiB page: with the pool sized to the
 * guest, its last page would fail with ENOMEM. So the source is mapped
 * first (the zero source is, from the start).
 */
static int
copy_data(struct lane *l, struct region *r, uint64_t idx, uint64_t len,
    uint64_t *done)
{
	struct session *s = l->s;
	uint64_t dst = r->base + idx * r->page_size, off = r->offset + idx * r->page_size;
	uint64_t seg, d;
	const char *src;
	int rc = IO_DONE;

	for (*done = 0; *done < len && rc == IO_DONE; *done += d) {
		seg = len - *done;
		src = layer_src(s->chain, off + *done, &seg);
		seg -= seg % r->page_size;
		if (seg == 0 && (src = assemble(l, off + *done)) == NULL)
			return uffdio_failed(l, "mmap(bounce)", dst + *done, PAGE_2M,
			    ENOMEM);
		seg = seg ? seg : r->page_size;
		if (r->page_size != PAGE_4K && src != l->bounce) {
			count(&s->n->syscalls, 1);
			madvise((void *)src, seg, MADV_POPULATE_READ);
		}
		d = 0;
		rc = uffdio_copy(l, dst + *done, src, seg, &d);
		if (d < seg) {
			*done += d;
			break;
		}
	}
	return rc;
}

/* Installs n pages of one kind at page index idx; *got counts pages done. */
static int
install_run(struct lane *l, struct region *r, uint64_t idx, uint64_t n,
    int kind, uint64_t *got)
{
	struct session *s = l->s;
	uint64_t dst = r->base + idx * r->page_size, len = n * r->page_size;
	uint64_t done = 0;
	int rc;

	/* A write to the shared zero page would fault again to copy it: for a
	 * write fault, zeros are copied in instead. */
	int mapped = kind != KIND_DATA && r->page_size == PAGE_4K && !l->writing;

	if (kind != KIND_DATA && !mapped && len > ZERO_SRC)
		len = ZERO_SRC;		/* the run is cut to the zero source */
	if (kind == KIND_DATA)
		rc = copy_data(l, r, idx, len, &done);
	else if (mapped)
		rc = uffdio_zeropage(l, dst, len, &done);
	else
		rc = uffdio_copy(l, dst, s->zeros, len, &done);
	*got = done / r->page_size;
	for (uint64_t i = idx; i < idx + *got; i++)
		bit_set(r->present, i);
	if (l->suspect_dst - dst < done)
		l->suspect_dst = 0;	/* in after all: a new refusal starts over */
	if (rc == IO_DONE && done < len && r->page_size != PAGE_4K &&
	    !bit_test(r->present, idx + *got))
		rc = pool_exhausted(l, r, idx + *got);
	if (kind == KIND_DATA) {
		count(&s->n->pages_copied, *got);
		count(&s->n->bytes_copied, done);
	} else {
		count(kind == KIND_ZERO ? &s->n->zero_data_pages : &s->n->zero_pages, *got);
		count(&s->n->zero_mapped, mapped && kind == KIND_ZERO ? *got : 0);
	}
	if (rc == -EFAULT)
		check_memfile(l);
	return rc;
}

/*
 * install_run, halving the run on ENOENT: a run that crosses a VMA
 * boundary fails whole with ENOENT and copies nothing, so halving finds
 * the part that fits and the rest goes on from there. Only ENOENT on a
 * single page says that page is not registered (IO_ABSENT). *got < n
 * otherwise means a page already present, or an error, stopped the run.
 */
static int
install_split(struct lane *l, struct region *r, uint64_t idx, uint64_t n,
    int kind, uint64_t *got)
{
	uint64_t part = n, g;
	int rc, split = 0;

	*got = 0;
	for (;;) {
		rc = install_run(l, r, idx + *got, part, kind, &g);
		*got += g;
		split |= rc == IO_ABSENT;
		/* Copied zeros go ahead only as far as the faulting page's
		 * own VMA: the next may be an unplugged slot's PROT_NONE. */
		if (*got == n || !(rc == IO_ABSENT ? part > 1 :
		    rc == IO_DONE && g == part) || (split && *got > 0 &&
		    !may_prefetch(l, r, kind)))
			return rc;
		/* A VMA can change between two calls: never reach past n. */
		part = rc == IO_ABSENT ? part / 2 : n;
		part = part < n - *got ? part : n - *got;
	}
}

/*
 * The faulting page's run first, then the rest of the window as runs of
 * one kind, one ioctl each, as far as may_prefetch allows. The faulting
 * page's run covers the pages of its kind after it, unless they are
 * removed pages: only the faulting page itself is served as removed. So a
 * stream that writes through a hole copies zeros ahead, while one that
 * reaches a hole (an unplugged slot) from data stops there. The fault is
 * served once its page is in; the pages ahead are a bet, and anything that
 * stops one (a page already present or refused, an error) ends the window
 * only.
 */
static int
install_window(struct lane *l, struct region *r, uint64_t idx, uint64_t n,
    uint64_t *done)
{
	uint64_t at = 0, len, got;
	int kind, next = KIND_DATA, rc;

	/* UFFDIO_COPY from a source page not yet mapped in this process falls
	 * back to faulting it in page by page: 9 us per page against 1.1 us
	 * once one MADV_POPULATE_READ (Linux 5.14) has mapped the whole run
	 * (2 MiB copies, 1 GiB). On reads, whose zero pages split the window
	 * into short runs anyway, it measured slower. */
	if (n > 1 && l->writing && r->page_size == PAGE_4K)
		map_source(l, r->offset + idx * r->page_size, n * r->page_size);
	kind = page_kind(l, r, idx);
	for (;;) {
		for (len = 1; at + len < n && kind != KIND_REMOVED; len++)
			if ((next = page_kind(l, r, idx + at + len)) != kind)
				break;
		rc = install_split(l, r, idx + at, len, kind, &got);
		if (at == 0 && got == 0)
			return rc;
		*done = at += got;
		if (rc != IO_DONE || got < len) {
			if (rc < 0)
				log_failure(l, LOG_DEBUG, rc);
			break;
		}
		if (at == n)
			break;
		/* The run ended at a change of kind, or after the faulting
		 * page when the guest removed it. */
		kind = kind == KIND_REMOVED ? page_kind(l, r, idx + at) : next;
		if (!may_prefetch(l, r, kind))
			break;
	}
	return IO_DONE;
}

/*
 * The range a lane is about to install, in the state, until its pages are
 * marked present and recorded (see struct install_mark); len 0 clears it.
 */
static void
mark_install(struct lane *l, uint64_t dst, uint64_t len, int fault)
{
	struct install_mark *m = &l->s->vm.st->marks[l->id];

	__atomic_store_n(&m->len, 0, __ATOMIC_RELEASE);
	if (len == 0)
		return;
	m->dst = dst;
	m->fault = (uint64_t)fault;
	__atomic_store_n(&m->len, len, __ATOMIC_RELEASE);
}

/* A fault's window, and what it leaves for the stream and the record. */
static int
serve_window(struct lane *l, struct region *r, uint64_t idx, uint64_t n,
    struct stream *st)
{
	struct session *s = l->s;
	uint64_t at = 0;
	int rc;

	mark_install(l, r->base + idx * r->page_size, n * r->page_size, 1);
	if ((rc = install_window(l, r, idx, n, &at)) == IO_DONE) {
		/* at is 0 when the faulting page was in already (EEXIST). */
		count(&s->n->prefetched, at > 0 ? at - 1 : 0);
		pthread_mutex_lock(&s->mu);
		st->next = r->base + (idx + at) * r->page_size;
		pthread_mutex_unlock(&s->mu);
		record_pages(s, r, idx, at);
	}
	mark_install(l, 0, 0, 0);
	return rc;
}

/*
 * Storage. A copy from a page of the memory file that is not in the page
 * cache waits for storage with its lane (a millisecond and more on network
 * storage, or through FUSE), and every fault queued behind it waits too;
 * and the fault on the mapping reads some 128 KiB around the page, of
 * which a random fault needs 4. So a fault whose window is short (a lone
 * page, or two random faults that happened to look like the start of a
 * stream: one such window read through the mapping took 8 MiB from a local
 * disk) and not all in the page cache has exactly its window read in
 * (POSIX_FADV_WILLNEED starts the read and returns), waits in its lane
 * while the lane serves the faults it has and reads more, and is served
 * once the pages are in: as many reads are in flight as faults wait, from
 * any number of threads. A window of FETCH_WINDOW pages or more is a
 * sequential stream, whose read-ahead pays: it reads through the mapping.
 * A fault that has waited FETCH_NS is served through the mapping all the
 * same, which waits for the read under way: pages read in and evicted
 * again under memory pressure never hold a vCPU for longer.
 */
#define FETCH_WINDOW	16
#define FETCH_NS	(20 * 1000000ull)

/* Calls fn on each stretch of one layer of the len bytes at file offset
 * off, from the layer map: the blocks in holes of every layer are left
 * out (they read as zero and need no storage; on tmpfs, or an overlay of
 * it, they are never in the page cache, and no read brings them in).
 * Stops at fn's first non-zero result. */
static int
each_source(const struct chain *c, uint64_t off, uint64_t len,
    int (*fn)(const struct chain *, int, const char *, uint64_t, uint64_t))
{
	uint64_t end = (off + len) / PAGE_4K, j;
	int rc = 0;

	for (uint64_t i = off / PAGE_4K; rc == 0 && i < end; i = j) {
		uint8_t y = c->map[i];

		for (j = i + 1; j < end && c->map[j] == y; j++)
			continue;
		if (y != 0)
			rc = fn(c, y - 1, c->layer[y - 1].mem + i * PAGE_4K,
			    i * PAGE_4K, (j - i) * PAGE_4K);
	}
	return rc;
}

/* 1 when a page of the stretch is not in the page cache. */
static int
absent(const struct chain *c, int y, const char *src, uint64_t off,
    uint64_t len)
{
	unsigned char vec[MAX_RUN_4K];

	(void)off;
	if (c->layer[y].in_memory)
		return 0;
	for (uint64_t at = 0; at < len; at += sizeof(vec) * PAGE_4K) {
		uint64_t n = (len - at) / PAGE_4K < sizeof(vec) ?
		    (len - at) / PAGE_4K : sizeof(vec);

		if (mincore((void *)(uintptr_t)(src + at), n * PAGE_4K, vec) < 0)
			return 0;	/* cannot tell: read it the old way */
		for (uint64_t i = 0; i < n; i++)
			if (!(vec[i] & 1))
				return 1;
	}
	return 0;
}

static int
read_ahead(const struct chain *c, int y, const char *src, uint64_t off,
    uint64_t len)
{
	(void)src;
	posix_fadvise(c->layer[y].fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
	return 0;
}

/*
 * IO_DONE when fault f can be served without waiting for storage, IO_WAIT
 * while its window is being read in (the read started the first time).
 */
static int
fetch(struct lane *l, struct region *r, uint64_t idx, struct fault *f)
{
	struct session *s = l->s;
	uint64_t off = r->offset + idx * r->page_size;
	uint64_t len = f->window * r->page_size;

	if (f->window >= FETCH_WINDOW || !opt.optimize ||
	    bit_test(r->removed, idx) || bit_test(r->hole, idx) ||
	    bit_test(r->zero, idx) ||
	    (f->fetching && now_ns() - f->read_ns > FETCH_NS))
		return IO_DONE;
	count(&s->n->syscalls, 1);
	if (!each_source(s->chain, off, len, absent))
		return IO_DONE;
	if (!f->fetching) {
		f->fetching = 1;
		count(&s->n->fetched, 1);
		count(&s->n->syscalls, 1);
		each_source(s->chain, off, len, read_ahead);
	}
	return IO_WAIT;
}

/*
 * One fault. Whatever fails on the faulting page itself is the caller's
 * to treat as fatal, except ENOENT on the page alone: its range is no
 * longer registered (the VMM unregistered or unmapped it), so nobody waits
 * for it here and the fault is dropped. IO_WAIT while its page is read in.
 */
static int
serve_fault(struct lane *l, struct fault *f)
{
	struct session *s = l->s;
	struct region *r = find_region(s, f->addr);
	uint64_t page;
	int rc;

	if (r == NULL) {
		logmsg(LOG_ERROR, "fault at 0x%llx lies outside every mapping "
		    "of the handshake", (unsigned long long)f->addr);
		return -EFAULT;
	}
	page = f->addr & ~(r->page_size - 1);
	/* Removed since the fault was read: another install of the page may
	 * have let its vCPU go before the REMOVE (a second vCPU's copy, or one
	 * already present), and zeros now would fill a page the guest gave
	 * back. A wake is enough: a vCPU still waiting faults again, and that
	 * fault, read after the REMOVE, is served as removed. */
	if (f->removes != s->vm.st->removes &&
	    bit_test(r->removed, (page - r->base) / r->page_size))
		return uffdio_wake(l, page, r->page_size);
	if (f->stream == NULL)
		choose_window(s, r, page, f);
	if (fetch(l, r, (page - r->base) / r->page_size, f) == IO_WAIT)
		return IO_WAIT;
	l->writing = (f->flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
	rc = serve_window(l, r, (page - r->base) / r->page_size, f->window,
	    f->stream);
	if (rc == IO_ABSENT) {
		/* Unregistering wakes the range's waiters; munmap does not,
		 * and a vCPU would wait forever: woken, it faults again and
		 * meets what the VMM made of the range. */
		count(&s->n->unregistered, 1);
		return uffdio_wake(l, page, r->page_size);
	}
	if (rc < 0)
		if (first_time(s, LOGGED_FATAL))
			log_failure(l, LOG_ERROR, rc);
	return rc;
}

static void
record_service(struct session *s, uint64_t read_ns)
{
	uint64_t us = (now_ns() - read_ns) / 1000;
	int k = 0;

	while (us > 0 && k < 15) {
		us >>= 1;
		k++;
	}
	count(&s->n->service_us_log2[k], 1);
}

/*
 * Serves queued faults in order. A fault whose page is being read in
 * stays queued and the next is served; on retry the rest stay queued:
 * while a REMOVE is pending every copy would fail the same way. IO_DONE
 * also when faults wait for storage (they are still queued).
 */
static int
serve_pending(struct lane *l)
{
	struct session *s = l->s;
	size_t i, kept = 0;
	int rc = IO_DONE;

	for (i = 0; i < l->nfaults; i++) {
		install_lock(l);
		rc = serve_fault(l, &l->faults[i]);
		install_unlock(l);
		if (rc == IO_WAIT) {
			l->faults[kept++] = l->faults[i];
			rc = IO_DONE;
			continue;
		}
		if (rc != IO_DONE)
			break;
		record_service(s, l->faults[i].read_ns);
	}
	if (rc != IO_RETRY) {
		l->nfaults = kept;
		return rc < 0 || rc == IO_GONE ? rc : IO_DONE;
	}
	count(&s->n->deferred, l->nfaults - i);
	memmove(l->faults + kept, l->faults + i, (l->nfaults - i) * sizeof(*l->faults));
	l->nfaults = kept + l->nfaults - i;
	return rc;
}

/* ------------------------------------------------------------------------
 * 6. Events
 *
 * Reading the uffd until it is empty: REMOVE events go into the bitmap at
 * once, under the lock every install holds shared, and faults into the
 * lane's queue; only then are faults served.
 * ------------------------------------------------------------------------ */

/* Marks the pages wholly inside [start, end) removed in every region. */
static void
apply_remove(struct session *s, uint64_t start, uint64_t end)
{
	count(&s->n->remove_events, 1);
	s->vm.st->removes++;
	for (size_t i = 0; i < s->nregions; i++) {
		struct region *r = &s->regions[i];
		uint64_t lo = start > r->base ? start : r->base;
		uint64_t hi = end < r->base + r->size ? end : r->base + r->size;
		uint64_t first, last;

		if (lo >= hi)
			continue;
		first = (lo - r->base + r->page_size - 1) / r->page_size;
		last = (hi - r->base) / r->page_size;
		for (uint64_t p = first; p < last; p++) {
			bit_set(r->removed, p);
			bit_clear(r->present, p);
		}
		if (last > first)
			count(&s->n->pages_removed, last - first);
	}
}

/*
 * The queue holds at most one fault per thread waiting on the VMM's side,
 * so it grows only past FAULT_QUEUE concurrent faults. Reading must never
 * stop for want of room: an unread REMOVE fails every copy with EAGAIN.
 */
static int
queue_fault(struct lane *l, const struct uffd_msg *m, uint64_t now)
{
	struct fault *f = grow_array(l->faults, &l->faults_cap, l->nfaults,
	    sizeof(*f), FAULT_QUEUE);

	if (f == NULL) {
		logmsg(LOG_ERROR, "growing the fault queue past %zu: %s",
		    l->faults_cap, strerror(ENOMEM));
		return -ENOMEM;
	}
	l->faults = f;
	l->faults[l->nfaults++] = (struct fault){ .addr = m->arg.pagefault.address,
	    .flags = m->arg.pagefault.flags, .read_ns = now,
	    .removes = l->s->vm.st->removes };
	return 0;
}

static int
handle_event(struct lane *l, const struct uffd_msg *m, uint64_t now)
{
	struct session *s = l->s;

	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT:
		count(&s->n->faults, 1);
		return queue_fault(l, m, now);
	case UFFD_EVENT_REMOVE:
		apply_remove(s, m->arg.remove.start, m->arg.remove.end);
		return 0;
	default:
		logmsg(LOG_ERROR, "unexpected uffd event 0x%x (the VMM enabled "
		    "features this handler does not serve)", m->event);
		return -EPROTO;
	}
}

/*
 * Reads the uffd until it is empty: EAGAIN, or a read shorter than asked,
 * which says the same without one more syscall.
 */
#ifdef STOP_IN_REMOVE_WINDOW
/*
 * A build for the suite alone (build/window): the server stops itself
 * (every thread) right after a read() that returned a REMOVE, before the
 * bitmap has it, so the suite can kill it there: the one moment a
 * server's death loses what only it knew.
 */
static void
stop_if_removes(const struct uffd_msg *m, ssize_t n)
{
	for (ssize_t i = 0; i < n; i++)
		if (m[i].event == UFFD_EVENT_REMOVE) {
			kill(getpid(), SIGSTOP);
			return;
		}
}
#endif

static int
drain_uffd(struct lane *l)
{
	struct session *s = l->s;

	for (;;) {
		ssize_t n = read(s->vm.uffd, l->msgs, sizeof(l->msgs));
		uint64_t now = now_ns();
		int rc;

		count(&s->n->syscalls, 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return 0;
		if (n < 0) {
			logmsg(LOG_ERROR, "read(uffd): %s", strerror(errno));
			return -errno;
		}
		if (n == 0 || n % (ssize_t)sizeof(struct uffd_msg) != 0) {
			logmsg(LOG_ERROR, "read(uffd) returned %zd bytes, not whole "
			    "messages", n);
			return -EPROTO;
		}
#ifdef STOP_IN_REMOVE_WINDOW
		stop_if_removes(l->msgs, n / (ssize_t)sizeof(struct uffd_msg));
#endif
		for (ssize_t i = 0; i < n / (ssize_t)sizeof(struct uffd_msg); i++)
			if ((rc = handle_event(l, &l->msgs[i], now)) < 0)
				return rc;
		if ((size_t)n < sizeof(l->msgs))
			return 0;
	}
}

/*
 * A uffd's readiness goes to one serving thread at a time (EPOLLONESHOT),
 * which arms it again when its turn ends. So a fault, and the faults a
 * vCPU takes again while its window goes in, do not wake every thread,
 * only to wait for the lock: that cost sequential reads 10% on two CPUs,
 * and random faults from two vCPUs were served faster too (11 against
 * 13-17 us a page). A thread that read more than one fault at once gives
 * the uffd back at once: faults come in a burst, and other threads serve
 * the next ones beside it.
 */
static void
rearm(struct lane *l)
{
	struct session *s = l->s;
	struct epoll_event e = { .events = EPOLLIN | EPOLLONESHOT, .data.ptr = s };

	if (!s->threaded || l->armed)
		return;
	l->armed = 1;
	epoll_ctl(s->wepfd, EPOLL_CTL_MOD, s->vm.uffd, &e);
}

/* Exclusive: a REMOVE read here lets its madvise go on, so it must be in
 * the bitmap before any other install starts (see "Threads"). */
static int
read_events(struct lane *l)
{
	int rc;

	size_t before = l->nfaults;

	reader_lock(l->s);
	/* The REMOVE window: odd from the first read() until what it read
	 * is in the bitmap. A server that dies in it leaves it odd, and the
	 * next fails that session closed (adopt_held). */
	__atomic_add_fetch(&l->s->vm.st->reading, 1, __ATOMIC_SEQ_CST);
	rc = drain_uffd(l);
	__atomic_add_fetch(&l->s->vm.st->reading, 1, __ATOMIC_SEQ_CST);
	reader_unlock(l->s);
	if (l->nfaults - before > 1)
		rearm(l);
	return rc;
}

/* ------------------------------------------------------------------------
 * 7. Population
 *
 * --populate all and --populate FILE install pages nobody asked for yet,
 * in 2 MiB steps that threads claim, faults first; --detach lets the VM go
 * once every page is in; --record writes the pages a VM needed. A round of
 * a session is its events, its faults, then a step of population.
 * ------------------------------------------------------------------------ */

/*
 * One line of a --populate list, len bytes with its newline: a
 * page-aligned decimal file offset, digits only (no sign: strtoull would
 * take "-4096" for 2^64-4096), ended by LF or CRLF. 1 for an offset, 0 for
 * a blank line, -1 for anything else: a NUL, or no newline at all (a list
 * cut short, whose last number may be a prefix of the one meant).
 */
static int
list_entry(const char *line, size_t len, uint64_t *off)
{
	const char *end;

	if (len == 0 || line[len - 1] != '\n' || memchr(line, '\0', len) != NULL)
		return -1;
	if (strcmp(line, "\n") == 0 || strcmp(line, "\r\n") == 0)
		return 0;
	if (parse_number(line, 10, UINT64_MAX, &end, off) < 0 || *off % PAGE_4K ||
	    (strcmp(end, "\n") != 0 && strcmp(end, "\r\n") != 0))
		return -1;
	return 1;
}

/* Each entry of the list into list[*n]; -EINVAL for a bad line. */
static int
read_list(FILE *f, const char *path, uint64_t **list, size_t *n)
{
	size_t cap = 0, line = 0, bufcap = 0;
	uint64_t off, *grown;
	char *buf = NULL;
	ssize_t len;
	int rc = 0;

	while (rc == 0 && (len = getline(&buf, &bufcap, f)) >= 0) {
		line++;
		if ((rc = list_entry(buf, (size_t)len, &off)) < 0) {
			logmsg(LOG_ERROR, "%s:%zu: not a page-aligned file offset "
			    "(decimal digits and a newline only)", path, line);
			rc = -EINVAL;
		} else if (rc > 0 && (grown = grow_array(*list, &cap, *n,
		    sizeof(off), 4096)) == NULL) {
			rc = -ENOMEM;
		} else if (rc > 0) {
			*list = grown;
			(*list)[(*n)++] = off;
		}
		rc = rc > 0 ? 0 : rc;
	}
	free(buf);
	if (rc == 0 && ferror(f)) {
		logmsg(LOG_ERROR, "reading %s: %s", path, strerror(errno));
		rc = -EIO;
	}
	return rc;
}

/* Reads a --populate list, one entry a line (see list_entry). */
static int
load_list(const char *path, uint64_t **list, size_t *n)
{
	/* Non-blocking: a FIFO would hold up the start in open(). */
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK), rc;
	struct stat st;
	FILE *f;

	if (fd < 0 || fstat(fd, &st) < 0 || (f = fdopen(fd, "r")) == NULL) {
		logmsg(LOG_ERROR, "open(%s): %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -errno;
	}
	if (!S_ISREG(st.st_mode)) {
		logmsg(LOG_ERROR, "--populate %s is not a regular file", path);
		fclose(f);
		return -EINVAL;
	}
	*n = 0;
	rc = read_list(f, path, list, n);
	fclose(f);
	return rc;
}

static struct region *
region_at_offset(struct session *s, uint64_t off)
{
	for (size_t i = 0; i < s->nregions; i++)
		if (off >= s->regions[i].offset &&
		    off - s->regions[i].offset < s->regions[i].size)
			return &s->regions[i];
	return NULL;
}

/*
 * What population does with page idx. A page the guest removed is left
 * out: it gave it back. So, with --populate all, is a page wholly in a
 * hole of MEMFILE: it reads as zero without being installed (also after
 * --detach: the kernel fills an unregistered anonymous page with zeros),
 * and an unplugged hotplug slot is such a hole, which population would
 * otherwise fill with page tables or 2 MiB pages the guest may never plug.
 * A --populate list names pages the guest did touch: holes there are
 * installed as zeros.
 */
static int
populate_kind(struct lane *l, struct region *r, uint64_t idx)
{
	struct session *s = l->s;

	if (bit_test(r->removed, idx))
		return KIND_SKIP;
	if (s->pop_list == NULL && bit_test(r->hole, idx))
		return KIND_SKIP;
	return page_kind(l, r, idx);
}

/*
 * Installs len pages of one kind for --populate. *advance says how far to
 * move on: a page already present stops a run and is stepped over, and so
 * is a page that is not registered (ENOENT on the page alone).
 */
static int
populate_run(struct lane *l, struct region *r, uint64_t idx, uint64_t len,
    int kind, uint64_t *advance)
{
	struct session *s = l->s;
	uint64_t got;
	int rc;

	*advance = len;
	if (kind == KIND_SKIP) {
		count(&s->n->populate_skipped, len);
		return IO_DONE;
	}
	mark_install(l, r->base + idx * r->page_size, len * r->page_size, 0);
	rc = install_split(l, r, idx, len, kind, &got);
	mark_install(l, 0, 0, 0);
	count(&s->n->populated, got);
	switch (rc) {
	case IO_DONE:
		*advance = got < len ? got + 1 : len;
		return IO_DONE;
	case IO_ABSENT:
		count(&s->n->populate_absent, 1);
		*advance = got + 1;
		return IO_DONE;
	default:
		*advance = got;
		return rc;
	}
}

/*
 * Population goes in steps of POPULATE_STEP bytes: of the guest's regions
 * in order with --populate all, of the list's pages with --populate FILE.
 * A lane claims the next step and takes it to its end; with several
 * population threads each claims its own, so they never overlap.
 */
static uint64_t
pages_per_step(const struct vm_state *st)
{
	uint64_t ps = st->regions[0].page_size;

	return POPULATE_STEP > ps ? POPULATE_STEP / ps : 1;
}

static uint64_t
count_steps(const struct vm_state *st, const struct session *s)
{
	uint64_t total = 0, per = pages_per_step(st);

	if (s->pop_list != NULL)
		return (s->pop_n + per - 1) / per;
	for (size_t i = 0; i < st->nregions; i++)
		total += st->regions[i].size;
	return (total + POPULATE_STEP - 1) / POPULATE_STEP;
}

/* The claimed step of the --populate list; adjacent entries make one run. */
static int
populate_list_step(struct lane *l)
{
	struct session *s = l->s;
	uint64_t per = pages_per_step(s->vm.st), end = (l->step + 1) * per;
	int rc = IO_DONE;

	end = end < s->pop_n ? end : s->pop_n;
	while (rc == IO_DONE && l->step_at < end) {
		uint64_t off = s->pop_list[l->step_at], idx, len = 1, npages;
		struct region *r = region_at_offset(s, off);
		int kind;

		if (r == NULL || (off - r->offset) % r->page_size) {
			l->step_at++;
			continue;
		}
		idx = (off - r->offset) / r->page_size;
		npages = r->size / r->page_size;
		kind = populate_kind(l, r, idx);
		while (l->step_at + len < end && idx + len < npages &&
		    s->pop_list[l->step_at + len] == off + len * r->page_size &&
		    populate_kind(l, r, idx + len) == kind)
			len++;
		rc = populate_run(l, r, idx, len, kind, &len);
		l->step_at += len;
	}
	return rc;
}

/* The claimed step of --populate all: POPULATE_STEP bytes of the regions
 * laid end to end, so a step may end one region and begin the next. */
static int
populate_step(struct lane *l)
{
	struct session *s = l->s;
	uint64_t end = (l->step + 1) * POPULATE_STEP, start = 0;
	int rc = IO_DONE;

	for (size_t i = 0; rc == IO_DONE && i < s->nregions; i++) {
		struct region *r = &s->regions[i];
		uint64_t ps = r->page_size, stop = end - start < r->size ?
		    (end - start) / ps : r->size / ps, idx, len;
		int kind;

		while (rc == IO_DONE && l->step_at >= start &&
		    l->step_at < start + r->size && l->step_at < end) {
			idx = (l->step_at - start) / ps;
			kind = populate_kind(l, r, idx);
			for (len = 1; idx + len < stop &&
			    populate_kind(l, r, idx + len) == kind; len++)
				;
			rc = populate_run(l, r, idx, len, kind, &len);
			l->step_at += len * ps;
		}
		start += r->size;
	}
	return rc;
}

/*
 * Population reads what it installs through the mapping, one page fault
 * at a time, each waiting for storage. So the reads of the steps ahead are
 * started as steps are claimed (see fetch): exactly the pages listed, or
 * the regions' bytes, with as many in flight as the storage takes.
 */
#define FETCH_AHEAD	8		/* steps whose reads are under way */

static void
fetch_list_step(struct session *s, uint64_t k)
{
	uint64_t per = pages_per_step(s->vm.st), end = (k + 1) * per, i, n;

	end = end < s->pop_n ? end : s->pop_n;
	for (i = k * per; i < end; i += n) {
		for (n = 1; i + n < end &&
		    s->pop_list[i + n] == s->pop_list[i] + n * PAGE_4K; n++)
			;
		if (s->pop_list[i] + n * PAGE_4K <= s->chain->size)
			each_source(s->chain, s->pop_list[i], n * PAGE_4K, read_ahead);
	}
}

static void
fetch_all_step(struct session *s, uint64_t k)
{
	uint64_t lo = k * POPULATE_STEP, hi = lo + POPULATE_STEP, start = 0;

	for (size_t i = 0; i < s->nregions; start += s->regions[i++].size) {
		const struct region *r = &s->regions[i];
		uint64_t a = lo > start ? lo : start;
		uint64_t b = hi < start + r->size ? hi : start + r->size;

		if (a < b)
			each_source(s->chain, r->offset + a - start, b - a, read_ahead);
	}
}

static void
fetch_step(struct session *s, uint64_t k)
{
	if (k >= s->vm.st->steps || bit_test(s->steps_done, k))
		return;
	count(&s->n->syscalls, 1);
	if (s->pop_list != NULL)
		fetch_list_step(s, k);
	else
		fetch_all_step(s, k);
}

/* A step to take: the one this lane left unfinished (EAGAIN), or the
 * next unclaimed. 0 when none is left. */
static int
claim_step(struct lane *l)
{
	struct session *s = l->s;

	if (l->step != UINT64_MAX)
		return 1;
	/* Steps a server before this one finished are in the bitmap. */
	do
		l->step = __atomic_fetch_add(&s->step_next, 1, __ATOMIC_SEQ_CST);
	while (l->step < s->vm.st->steps && bit_test(s->steps_done, l->step));
	if (l->step >= s->vm.st->steps) {
		l->step = UINT64_MAX;
		return 0;
	}
	l->step_at = s->pop_list ? l->step * pages_per_step(s->vm.st) :
	    l->step * POPULATE_STEP;
	fetch_step(s, l->step + FETCH_AHEAD);
	return 1;
}

static int
population_on(const struct session *s)
{
	return __atomic_load_n(&s->populating, __ATOMIC_SEQ_CST);
}

/*
 * One population step when no fault waits; clears populating when done.
 * A failure there is a page nobody asked for yet: population stops, the
 * VM is served on demand, and --detach no longer lets it go.
 */
static int
populate(struct lane *l)
{
	struct session *s = l->s;
	int rc;

	if (!l->populates || !population_on(s) || l->nfaults > 0 || !claim_step(l))
		return 0;
	l->writing = 0;
	/* Held from the pages' kinds to their copies (see "Threads"). */
	install_lock(l);
	rc = s->pop_list ? populate_list_step(l) : populate_step(l);
	install_unlock(l);
	if (rc < 0) {
		if (!__atomic_load_n(&s->outcome, __ATOMIC_SEQ_CST) &&
		    first_time(s, LOGGED_POP)) {
			log_failure(l, LOG_WARN, rc);
			logmsg(LOG_WARN, "population stopped after %llu pages; "
			    "faults are still served%s",
			    (unsigned long long)counted(&s->n->populated), opt.detach ?
			    ", and the handler stays (--detach)" : "");
		}
		__atomic_store_n(&s->vm.st->pop_failed, 1, __ATOMIC_SEQ_CST);
		__atomic_store_n(&s->populating, 0, __ATOMIC_SEQ_CST);
		return 0;
	}
	if (rc != IO_DONE)
		return rc == IO_GONE ? rc : 0;	/* retry: the step stays ours */
	bit_set(s->steps_done, l->step);
	l->step = UINT64_MAX;
	if (__atomic_sub_fetch(&s->steps_left, 1, __ATOMIC_SEQ_CST) > 0)
		return 0;
	l->finished = 1;
	__atomic_store_n(&s->populating, 0, __ATOMIC_SEQ_CST);
	logmsg(LOG_INFO, "populated %llu pages in %llu ms",
	    (unsigned long long)counted(&s->n->populated),
	    (unsigned long long)((now_ns() - s->vm.st->pop_start) / 1000000));
	return 0;
}

/*
 * --detach: with every page in that population does not leave out, the
 * regions are unregistered and the VM runs on without a handler. The pages
 * left out, and any it removes later, read as zero, which is what the
 * kernel gives an unregistered anonymous page. A REMOVE already queued
 * must still be read, or its madvise caller would wait forever.
 */
static int
detach(struct lane *l)
{
	struct session *s = l->s;
	int rc;

	/* From here a server that dies has it to finish (see adopt). */
	__atomic_store_n(&s->vm.st->detaching, 1, __ATOMIC_SEQ_CST);
	for (size_t i = 0; i < s->nregions; i++) {
		rc = uffdio_unregister(l, s->regions[i].base, s->regions[i].size);
		if (rc == IO_GONE)
			return 0;
		if (rc < 0) {
			log_failure(l, LOG_ERROR, rc);
			return rc;
		}
	}
	/* UNREGISTER wakes a range's waiters before it clears the VMA, and a
	 * fault taken under the per-VMA lock can queue in between: it would
	 * sleep forever. Once the VMAs are cleared no fault queues any more,
	 * so one wake now reaches every one that did. */
	for (size_t i = 0; i < s->nregions; i++)
		if ((rc = uffdio_wake(l, s->regions[i].base, s->regions[i].size)) < 0)
			log_failure(l, LOG_WARN, rc);
	while (read(s->vm.uffd, l->msgs, sizeof(l->msgs)) > 0)
		;
	logmsg(LOG_INFO, "every page with data is present (%llu removed or "
	    "in holes read as zero, %llu not registered): unregistered, the "
	    "VM runs on without a handler",
	    (unsigned long long)counted(&s->n->populate_skipped),
	    (unsigned long long)counted(&s->n->populate_absent));
	return 0;
}

/*
 * Queued faults, then a population step: the only work that reads the
 * mapped file in user space, so one SIGBUS guard covers it. Returns
 * IO_GONE, a negative errno, or 0.
 */
static int __attribute__((noinline))
guarded_install(struct lane *l)
{
	struct session *s = l->s;
	sigset_t bus;
	int rc;

	if (sigsetjmp(bus_jmp, 0)) {
		/* The signal handler ran with SIGBUS blocked, and a jump that
		 * saved no mask (one saved each round would cost a syscall)
		 * leaves it blocked: the next SIGBUS, from any session, would
		 * kill the process. */
		sigemptyset(&bus);
		sigaddset(&bus, SIGBUS);
		sigprocmask(SIG_UNBLOCK, &bus, NULL);
		bus_armed = 0;
		if (l->held)
			install_unlock(l);
		check_memfile(l);
		if (first_time(s, LOGGED_FATAL))
			logmsg(LOG_ERROR, "reading %s at offset %llu: SIGBUS",
			    layer_path(s->chain, l->reading),
			    (unsigned long long)l->reading);
		return -ENXIO;
	}
	bus_armed = 1;
	if ((rc = serve_pending(l)) >= 0 && rc != IO_GONE)
		rc = populate(l);
	bus_armed = 0;
	return rc;
}

/* Population as the state has it: from the start, or from where a
 * server before this one left it. */
static void
population_begin(struct session *s)
{
	uint64_t left = s->vm.st->steps;

	for (uint64_t i = 0; i < s->vm.st->steps; i++)
		left -= bit_test(s->steps_done, i);
	s->steps_left = left;
	s->populating = left > 0 && !s->vm.st->pop_failed;
	for (uint64_t k = 0; s->populating && k < FETCH_AHEAD; k++)
		fetch_step(s, k);
}

/*
 * One round for a serving session: 1 when the VM went away (or was let go
 * with --detach), 0 to go on, a negative errno on a fatal error. The uffd
 * is read only when epoll said it is readable; deferred faults and
 * population go on without it. The caller counts the wait, if it waited.
 */
static int
serve_round(struct lane *l, uint32_t uffd_events)
{
	struct session *s = l->s;
	int rc = 0;

	if (uffd_events & EPOLLERR) {
		logmsg(LOG_ERROR, "epoll(uffd): error condition 0x%x", uffd_events);
		return -EIO;
	}
	if (uffd_events)
		rc = read_events(l);
	if (rc < 0 || (rc = guarded_install(l)) < 0)
		return rc;
	if (rc == IO_GONE) {
		if (first_time(s, LOGGED_GONE))
			logmsg(LOG_INFO, "VMM pid %d: its address space is gone "
			    "(ESRCH)", (int)s->vm.pid);
		return 1;
	}
	if (opt.detach && l->finished && l->nfaults == 0 &&
	    !__atomic_load_n(&s->vm.st->pop_failed, __ATOMIC_SEQ_CST)) {
		reader_lock(s);
		rc = detach(l);
		reader_unlock(s);
		return rc < 0 ? rc : 1;
	}
	return 0;
}

/*
 * --record FILE: the file offsets of the pages installed for faults, in the
 * order the VM first needed them, written when the session ends, one
 * decimal offset a line. --populate FILE installs such a list first.
 *
 * The file may be a FIFO, whose reader may stall. Writes never block: the
 * fd is non-blocking, and between writes the wait is for the FIFO or the
 * keeper, at most RECORD_STALL_MS without progress. The keeper's word to
 * stop or a stalled reader ends the record, and the log says how much was
 * lost.
 */
#define RECORD_STALL_MS	1000

/*
 * What the server's loop would do with the keeper's messages, done while
 * the record waits for its reader: 1 once told to stop, -1 once the keeper
 * is gone, 0 else.
 */
struct heard {
	int ctl;
	int (*take)(void *);
	void *arg;
};

/* 0 once len bytes are out, or a negative errno: -ECANCELED when told to
 * stop, -ETIMEDOUT for a reader that took nothing for RECORD_STALL_MS. */
static int
record_out(int fd, const struct heard *h, const char *buf, size_t len)
{
	struct pollfd p[2] = { { fd, POLLOUT, 0 }, { h->ctl, POLLIN, 0 } };
	ssize_t n;
	int said;

	while (len > 0) {
		if ((n = write(fd, buf, len)) > 0) {
			buf += n;
			len -= (size_t)n;
			continue;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			return -errno;
		if (poll(p, 2, RECORD_STALL_MS) == 0)
			return -ETIMEDOUT;
		if (p[1].revents && (said = h->take(h->arg)) > 0)
			return -ECANCELED;
		if (p[1].revents && said < 0)
			p[1].fd = -1;
	}
	return 0;
}

static void
write_record(struct session *s, const struct heard *h)
{
	char buf[65536];
	size_t n = 0, i, done = 0;
	int rc = 0;

	if (s->record_fd < 0)
		return;
	for (i = 0; i <= s->vm.st->norder && rc == 0; i++) {
		if (i == s->vm.st->norder || n > sizeof(buf) - 32) {
			rc = record_out(s->record_fd, h, buf, n);
			done = rc == 0 ? i : done;
			n = 0;
		}
		if (i < s->vm.st->norder)
			n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%llu\n",
			    (unsigned long long)s->order[i]);
	}
	if (rc == 0)
		logmsg(LOG_INFO, "recorded %zu pages in %s", s->vm.st->norder, opt.record_path);
	else
		logmsg(LOG_ERROR, "writing %s: %s; at least %zu of %zu pages lost",
		    opt.record_path, rc == -ETIMEDOUT ? "its reader took nothing "
		    "for 1 s" : rc == -ECANCELED ? "told to stop" : strerror(-rc),
		    s->vm.st->norder - done, s->vm.st->norder);
}

/* ------------------------------------------------------------------------
 * 8. The handshake
 *
 * The handshake, read as it arrives: a connection in its handshake is a
 * state of the one loop, never a wait that holds up other VMs. A peer
 * becomes a VMM with its first byte.
 * ------------------------------------------------------------------------ */

static void
take_fds(struct session *s, struct msghdr *mh)
{
	for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
		size_t nfd;
		int fd;

		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < nfd; i++) {
			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (s->vm.uffd < 0) {
				s->vm.uffd = fd;
				continue;
			}
			logmsg(LOG_WARN, "closing extra fd received with the handshake");
			close(fd);
		}
	}
	/* Set when more fds came than the buffer holds, and when the kernel
	 * had no descriptor free to install one in (EMFILE). */
	if (mh->msg_flags & MSG_CTRUNC) {
		s->ctrunc = 1;
		logmsg(LOG_WARN, "fds sent with the handshake were dropped by the "
		    "kernel: more than %d, or no descriptor free", MAX_FDS);
	}
}

/*
 * One recvmsg, peeking: the message stays on the socket, which the keeper
 * holds, until it is taken (consume_handshake), so a server that dies
 * reading it leaves it whole for the next. SO_PEEK_OFF moves each peek on;
 * the uffd comes with the first. The bytes received, 0 at EOF, or a
 * negative errno (-EAGAIN when nothing more has arrived).
 */
static ssize_t
recv_chunk(struct session *s, char *buf, size_t cap)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * MAX_FDS)];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = { buf, cap };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
	    .msg_control = ctl.b, .msg_controllen = sizeof(ctl.b) };
	ssize_t n;

	do
		n = recvmsg(s->vm.conn, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT |
		    MSG_PEEK);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	take_fds(s, &mh);
	return n;
}

static void
log_parse_error(const char *buf, size_t len, const struct json_error *je)
{
	char near[24];
	size_t from = je->offset > 8 ? je->offset - 8 : 0, i;

	for (i = 0; i + 1 < sizeof(near) && from + i < len; i++)
		near[i] = buf[from + i] >= 0x20 && buf[from + i] < 0x7f ?
		    buf[from + i] : '.';
	near[i] = '\0';
	logmsg(LOG_ERROR, "handshake rejected: %s at byte %zu (near \"%s\")",
	    je->reason, je->offset, near);
}

/*
 * Reads what the peer has sent so far. Returns the number of mappings once
 * the message is complete, JSON_PARTIAL while more is to come, -ENOTCONN
 * when the peer hung up (or failed) having sent nothing, and any other
 * negative errno on a rejected handshake, logged.
 */
static int
recv_handshake(struct session *s)
{
	struct json_error je;
	ssize_t got;
	int n;

	for (;;) {
		if (s->got == sizeof(s->handshake)) {
			logmsg(LOG_ERROR, "handshake rejected: longer than %zu bytes",
			    sizeof(s->handshake));
			return -EMSGSIZE;
		}
		got = recv_chunk(s, s->handshake + s->got,
		    sizeof(s->handshake) - s->got);
		if (got == -EAGAIN)
			return JSON_PARTIAL;
		if (got <= 0 && s->got == 0)
			return -ENOTCONN;
		/* A hang-up is logged by handshake_failed, which first gives
		 * the VMM's pidfd the moment to show it died. */
		if (got == 0)
			return -ECONNRESET;
		if (got < 0) {
			logmsg(LOG_ERROR, "recvmsg(handshake): %s", strerror((int)-got));
			return (int)got;
		}
		s->got += (size_t)got;
		n = json_parse_mappings(s->handshake, s->got, s->mappings,
		    MAX_MAPPINGS, &je);
		if (n >= 0)
			return n;
		if (n != JSON_PARTIAL) {
			log_parse_error(s->handshake, s->got, &je);
			return -EINVAL;
		}
	}
}

/* Firecracker's uffd answers a zero-length wake with EINVAL; others ENOTTY. */
static int
check_uffd(struct session *s)
{
	struct uffdio_range r = { 0, 0 };
	int fl;

	if (s->vm.uffd < 0 && s->ctrunc) {
		logmsg(LOG_ERROR, "the uffd sent with the handshake could not be "
		    "received: out of file descriptors (EMFILE); raise the limit "
		    "(ulimit -n)");
		return -EMFILE;
	}
	if (s->vm.uffd < 0) {
		logmsg(LOG_ERROR, "handshake rejected: no file descriptor came with "
		    "the message (expected the uffd as SCM_RIGHTS)");
		return -EBADF;
	}
	if (ioctl(s->vm.uffd, (int)UFFDIO_WAKE, &r) == 0 || errno != EINVAL) {
		logmsg(LOG_ERROR, "handshake rejected: the fd received is not a "
		    "userfaultfd");
		return -ENOTTY;
	}
	/* Draining until EAGAIN needs a non-blocking uffd. */
	fl = fcntl(s->vm.uffd, F_GETFL);
	if (fl >= 0 && !(fl & O_NONBLOCK))
		fcntl(s->vm.uffd, F_SETFL, fl | O_NONBLOCK);
	return 0;
}

/* Sparse holes (unplugged memory, blocks no layer of a chain holds) read
 * as zero: the pages wholly in one are served as zeros without reading the
 * file, and population leaves them out. */
static void
mark_holes(struct session *s, struct region *r)
{
	const uint8_t *map = s->chain->map + r->offset / PAGE_4K;
	uint64_t per = r->page_size / PAGE_4K;

	for (uint64_t p = 0; p < r->size / r->page_size; p++) {
		uint64_t b = 0;

		while (b < per && map[p * per + b] == 0)
			b++;
		if (b == per)
			bit_set(r->hole, p);
	}
}

/* Bytes of a bitmap of n bits, in whole 64-byte lines. */
static uint64_t
bitmap_bytes(uint64_t n)
{
	return (n + 511) / 512 * 64;
}

/* The state's layout for these regions: offsets of every bitmap, of the
 * steps finished and of the record; its size. */
static uint64_t
state_layout(struct vm_state *st, const struct session *s)
{
	uint64_t at = sizeof(*st) + st->nregions * sizeof(st->regions[0]), pages = 0;

	at = (at + 63) / 64 * 64;
	for (uint32_t i = 0; i < st->nregions; i++) {
		struct region_state *r = &st->regions[i];
		uint64_t bits = bitmap_bytes(r->size / r->page_size);

		r->removed = at;
		r->present = at + bits;
		at += 2 * bits;
		if (s->record_fd >= 0) {
			r->recorded = at;
			at += bits;
		}
		pages += r->size / r->page_size;
	}
	st->steps_done = at;
	at += bitmap_bytes(st->steps);
	if (s->record_fd >= 0) {
		st->order = at;
		at += pages * sizeof(uint64_t);
	}
	return at;
}

static uint64_t *
state_at(const struct vm_state *st, uint64_t off)
{
	return off ? (uint64_t *)(void *)((char *)st + off) : NULL;
}

static int
cmp_region(const void *a, const void *b)
{
	const struct region_state *x = a, *y = b;

	return x->base < y->base ? -1 : x->base > y->base;
}

/*
 * The session's regions, resolved against its state, which may be new or
 * a server's before this one: the record's bits are found again from its
 * list, and what a lane was installing when that server died is taken as
 * present (and, for a fault, recorded).
 */
static int
state_attach(struct session *s)
{
	struct vm_state *st = s->vm.st;

	s->n = &st->n;
	s->nregions = st->nregions;
	if ((s->regions = calloc(st->nregions, sizeof(*s->regions))) == NULL)
		return -ENOMEM;
	for (size_t i = 0; i < s->nregions; i++) {
		struct region *r = &s->regions[i];
		const struct region_state *rs = &st->regions[i];
		uint64_t words = (rs->size / rs->page_size + 63) / 64;

		*r = (struct region){ rs->base, rs->size, rs->offset, rs->page_size,
		    state_at(st, rs->removed), state_at(st, rs->present),
		    state_at(st, rs->recorded), calloc(words, 8), calloc(words, 8) };
		if (r->zero == NULL || r->hole == NULL)
			return -ENOMEM;
		mark_holes(s, r);
	}
	s->steps_done = state_at(st, st->steps_done);
	s->order = state_at(st, st->order);
	for (uint64_t i = 0; s->order != NULL && i < st->norder; i++) {
		struct region *r = region_at_offset(s, s->order[i]);

		if (r != NULL)
			bit_set(r->recorded, (s->order[i] - r->offset) / r->page_size);
	}
	return 0;
}

/*
 * A new state for the n mappings of the handshake: in a memfd, mapped
 * shared, sized for these regions; the regions sorted by address.
 */
static int
state_create(struct session *s, size_t n)
{
	struct vm_state head = { .nregions = (uint32_t)n };
	struct vm_state *st;
	uint64_t bytes;
	int fd;

	/* The layout needs the regions: a first pass on a copy of the
	 * header and no region offsets sizes it. */
	if ((st = calloc(1, sizeof(*st) + n * sizeof(st->regions[0]))) == NULL)
		return -ENOMEM;
	*st = head;
	for (size_t i = 0; i < n; i++)
		st->regions[i] = (struct region_state){ s->mappings[i].base,
		    s->mappings[i].size, s->mappings[i].offset,
		    s->mappings[i].page_size, 0, 0, 0 };
	qsort(st->regions, n, sizeof(st->regions[0]), cmp_region);
	st->steps = opt.populate_all || s->pop_list ? count_steps(st, s) : 0;
	bytes = state_layout(st, s);
	if ((fd = memfd_create("uffd-handler-vm", MFD_CLOEXEC)) < 0 ||
	    ftruncate(fd, (off_t)bytes) < 0) {
		free(st);
		if (fd >= 0)
			close(fd);
		return -errno;
	}
	s->vm.st = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (s->vm.st == MAP_FAILED) {
		s->vm.st = NULL;
		free(st);
		close(fd);
		return -errno;
	}
	memcpy(s->vm.st, st, sizeof(*st) + n * sizeof(st->regions[0]));
	free(st);
	s->vm.statefd = fd;
	s->vm.st->magic = STATE_MAGIC;
	s->vm.st->layout = STATE_LAYOUT;
	s->vm.st->bytes = bytes;
	s->vm.st->pid = s->vm.pid;
	s->vm.st->pop_start = now_ns();
	return state_attach(s);
}

/* A state as a server left it, mapped and checked: its layout, and every
 * offset inside it. -EPROTO for a state this version cannot read. */
static int
state_map(int fd, struct vm_state **out)
{
	struct vm_state *st;
	struct stat sb;
	uint64_t bytes, head;
	int ok;

	if (fstat(fd, &sb) < 0)
		return -errno;
	bytes = (uint64_t)sb.st_size;
	if (bytes < sizeof(*st))
		return -EPROTO;
	st = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (st == MAP_FAILED)
		return -errno;
	head = sizeof(*st) + (uint64_t)st->nregions * sizeof(st->regions[0]);
	ok = st->magic == STATE_MAGIC && st->layout == STATE_LAYOUT &&
	    st->bytes == bytes && st->nregions > 0 && st->nregions <= MAX_MAPPINGS &&
	    head <= bytes && st->steps_done + bitmap_bytes(st->steps) <= bytes;
	for (uint32_t i = 0; ok && i < st->nregions; i++) {
		const struct region_state *r = &st->regions[i];
		uint64_t bits = r->page_size ? bitmap_bytes(r->size / r->page_size) : 0;

		ok = (r->page_size == PAGE_4K || r->page_size == PAGE_2M) &&
		    r->removed >= head && r->removed + bits <= bytes &&
		    r->present >= head && r->present + bits <= bytes &&
		    (r->recorded == 0 || r->recorded + bits <= bytes);
	}
	if (!ok) {
		munmap(st, bytes);
		return -EPROTO;
	}
	*out = st;
	return 0;
}

/* The handshake off the socket, once it is taken (see take_handshake):
 * it was read by peeking, and the fds that come with it again are closed. */
static void
consume_handshake(struct session *s)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * MAX_FDS)];
		struct cmsghdr align;
	} ctl;
	char buf[4096];
	struct iovec iov = { buf, sizeof(buf) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	int fd;

	do {
		mh.msg_control = ctl.b;
		mh.msg_controllen = sizeof(ctl.b);
		if (recvmsg(s->vm.conn, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC) <= 0)
			break;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
			for (size_t i = 0; c->cmsg_type == SCM_RIGHTS &&
			    i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
				memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
				close(fd);
			}
	} while (1);
}

/* Zeros to copy from: never written, so it costs no memory; mapped (to
 * the shared zero page) for the reason install_run gives. */
static int
zeros_map(struct session *s)
{
	void *z = mmap(NULL, ZERO_SRC, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (z == MAP_FAILED)
		return -errno;
	madvise(z, ZERO_SRC, MADV_POPULATE_READ);
	s->zeros = z;
	return 0;
}

static int
setup_regions(struct session *s, size_t n)
{
	int rc;

	if ((rc = state_create(s, n)) < 0)
		return rc;
	return zeros_map(s);
}

/* The complete message of n mappings, checked and taken; 0 or a negative
 * errno, logged. */
static int
accept_handshake(struct session *s, int n)
{
	const struct chain *c = s->chain;
	char why[256];
	int rc;

	if ((rc = check_uffd(s)) < 0)
		return rc;
	if (mappings_validate(s->mappings, (size_t)n, c->size,
	    (uint64_t)sysconf(_SC_PAGESIZE), why, sizeof(why)) < 0) {
		logmsg(LOG_ERROR, "handshake rejected: %s (memory file %s has %llu "
		    "bytes)", why, c->layer[0].path, (unsigned long long)c->size);
		return -EINVAL;
	}
	if ((rc = setup_regions(s, (size_t)n)) < 0) {
		logmsg(LOG_ERROR, "allocating %d regions: %s", n, strerror(-rc));
		return rc;
	}
	logmsg(LOG_INFO, "VMM pid %d: %d region(s), %llu bytes of %s%s",
	    (int)s->vm.pid, n, (unsigned long long)c->size, c->layer[0].path,
	    c->n > 1 ? " and its diffs" : "");
	return 0;
}

/* ------------------------------------------------------------------------
 * 9. The session
 *
 * One connection and everything it owns, from accepting it to its one
 * teardown (safe to call twice); killing its VMM when serving cannot go on;
 * its counters line.
 * ------------------------------------------------------------------------ */

/* The session takes ownership of conn; the chain stays the caller's. NULL
 * when out of memory. */
static struct session *
session_new(int conn, const struct chain *chain)
{
	struct session *s = calloc(1, sizeof(*s));

	if (s == NULL)
		return NULL;
	s->vm = (struct vm){ .conn = conn, .uffd = -1, .pidfd = -1, .statefd = -1 };
	s->slot = -1;
	s->n = &s->pre;
	s->chain = chain;
	s->record_fd = -1;
	s->mappings = calloc(MAX_MAPPINGS, sizeof(*s->mappings));
	pthread_mutex_init(&s->turn, NULL);
	pthread_rwlock_init(&s->rw, NULL);
	pthread_mutex_init(&s->mu, NULL);
	for (int i = 0; i < 3; i++)
		s->w[i] = (struct watch){ s, i };
	return s;
}

/* A lane for each serving thread, then one for each population thread;
 * with --threads 1, the loop's one. */
static int
lanes_open(struct session *s)
{
	int n = opt.threads > 1 ? 2 * opt.threads : 1;

	if ((s->lanes = calloc((size_t)n, sizeof(*s->lanes))) == NULL)
		return -ENOMEM;
	s->nlanes = n;
	for (int i = 0; i < n; i++) {
		struct lane *l = &s->lanes[i];

		l->s = s;
		l->id = i;
		l->populates = n == 1 || i >= opt.threads;
		l->step = UINT64_MAX;
		/* A population thread's copy need not wake anyone: a vCPU
		 * that waits on its page has a fault queued, and a serving
		 * thread answers every fault it reads with a wake (its own
		 * copy's, EEXIST's, or a plain one). Waking costs a lock on
		 * the uffd's wait queues for every copy: the replay of a
		 * working set measured 180 ms with it, 100 ms without. */
		l->dontwake = n > 1 && l->populates;
		if (n > 1 && l->populates)
			continue;	/* it reads no faults */
		l->faults_cap = FAULT_QUEUE;
		if ((l->faults = calloc(FAULT_QUEUE, sizeof(*l->faults))) == NULL)
			return -ENOMEM;
	}
	return 0;
}

static int
out_of_fds(int err)
{
	return err == EMFILE || err == ENFILE;
}

/*
 * The peer's pid and pidfd: SO_PEERPIDFD (Linux 6.5) works even when the
 * peer's pid is invisible here, as from a container in its own pid
 * namespace, where SO_PEERCRED reports pid 0; pidfd_open(SO_PEERCRED's
 * pid) before that. -EMFILE or -ENFILE when no descriptor is free for it;
 * a pidfd of -1 when none can be had otherwise.
 */
static int
peer_of(int conn, pid_t *pid, int *pidfd)
{
	struct ucred cr = { 0, 0, 0 };
	socklen_t l = sizeof(cr);

	*pid = getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cr, &l) == 0 ? cr.pid : 0;
	l = sizeof(*pidfd);
	if (getsockopt(conn, SOL_SOCKET, SO_PEERPIDFD, pidfd, &l) == 0 && *pidfd >= 0)
		return 0;
	*pidfd = -1;
	if (out_of_fds(errno))
		return -errno;
	if (*pid > 0 && (*pidfd = (int)syscall(SYS_pidfd_open, *pid, 0)) < 0 &&
	    out_of_fds(errno))
		return -errno;
	return 0;
}

/*
 * SIGKILL through the pidfd, which cannot hit a recycled pid; by pid when
 * that fails (ENOSYS before Linux 5.1 or under emulators, EINVAL across pid
 * namespaces) and the pid is a real one: a frozen guest is the worse risk.
 */
static void
kill_peer(int pidfd, pid_t pid)
{
	int rc = -1;

	if (pidfd < 0 && pid <= 0) {
		logmsg(LOG_ERROR, "cannot kill the VMM: its pid is not known here; "
		    "its guest may stay frozen");
		return;
	}
	if (pidfd >= 0)
		rc = (int)syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
	if (rc < 0 && (pidfd < 0 || errno != ESRCH) && pid > 0)
		rc = kill(pid, SIGKILL);
	if (rc < 0 && errno != ESRCH)
		logmsg(LOG_ERROR, "kill(VMM pid %d, SIGKILL): %s; its guest may stay "
		    "frozen", (int)pid, strerror(errno));
	else
		logmsg(LOG_ERROR, "killed VMM pid %d so its guest does not freeze",
		    (int)pid);
}

/* Whether the VMM has exited, without waiting. */
static int
vmm_gone(struct session *s)
{
	struct pollfd p = { s->vm.pidfd, POLLIN, 0 };

	if (s->vm.pidfd >= 0)
		return poll(&p, 1, 0) == 1;
	return s->vm.pid > 0 && kill(s->vm.pid, 0) < 0 && errno == ESRCH;
}

/* Frees what the session owns; safe to call twice. */
static void
session_teardown(struct session *s)
{
	closefd(&s->vm.conn);
	closefd(&s->vm.uffd);
	closefd(&s->vm.pidfd);
	closefd(&s->vm.statefd);
	for (int i = 0; i < s->nlanes; i++) {
		if (s->lanes[i].bounce != NULL)
			munmap(s->lanes[i].bounce, PAGE_2M);
		free(s->lanes[i].faults);
	}
	if (s->zeros != NULL)
		munmap((void *)s->zeros, ZERO_SRC);
	for (size_t i = 0; i < s->nregions; i++) {
		free(s->regions[i].zero);
		free(s->regions[i].hole);
	}
	if (s->vm.st != NULL) {
		s->pre = *s->n;		/* the counters line comes after */
		munmap(s->vm.st, s->vm.st->bytes);
	}
	free(s->regions);
	free(s->mappings);
	free(s->lanes);
	s->n = &s->pre;
	s->vm.st = NULL;
	s->zeros = NULL;
	s->regions = NULL;
	s->mappings = NULL;
	s->lanes = NULL;
	s->order = NULL;
	s->steps_done = NULL;
	s->nregions = 0;
	s->nlanes = 0;
}

static void
session_destroy(struct session *s)
{
	session_teardown(s);
	pthread_mutex_destroy(&s->turn);
	pthread_rwlock_destroy(&s->rw);
	pthread_mutex_destroy(&s->mu);
	free(s);
}

/* The counters as they stand, while threads may be adding to them. */
static const struct counters *
counters_read(const struct counters *live, struct counters *c)
{
	for (size_t i = 0; i < sizeof(*c) / sizeof(uint64_t); i++)
		((uint64_t *)c)[i] = counted((const uint64_t *)live + i);
	return c;
}

/* The counters by name, as the counters line and the metrics give them;
 * the histogram follows. */
#define NFIELDS		17

static const char *const field_names[NFIELDS] = {
	"faults", "pages_copied", "zero_pages", "zero_data_pages",
	"memory_saved_bytes", "prefetched", "populated", "populate_skipped",
	"populate_absent", "remove_events", "pages_removed", "deferred",
	"bytes_copied", "already_present", "unregistered", "fetched",
	"syscalls",
};

static void
counter_fields(const struct counters *c, uint64_t v[NFIELDS])
{
	const uint64_t f[NFIELDS] = { c->faults, c->pages_copied, c->zero_pages,
		c->zero_data_pages, c->zero_mapped * PAGE_4K, c->prefetched,
		c->populated, c->populate_skipped, c->populate_absent,
		c->remove_events, c->pages_removed, c->deferred, c->bytes_copied,
		c->already_present, c->unregistered, c->fetched, c->syscalls };

	memcpy(v, f, sizeof(f));
}

/* The counters as JSON members at buf, ",name":value each, then the
 * histogram; the bytes written. */
static int
counters_json(char *buf, size_t cap, const struct counters *c)
{
	uint64_t v[NFIELDS];
	int n = 0;

	counter_fields(c, v);
	for (size_t i = 0; i < NFIELDS; i++)
		n += snprintf(buf + n, cap - (size_t)n, ",\"%s\":%llu", field_names[i],
		    (unsigned long long)v[i]);
	n += snprintf(buf + n, cap - (size_t)n, ",\"service_us_log2\":[");
	for (int i = 0; i < 16; i++)
		n += snprintf(buf + n, cap - (size_t)n, "%s%llu", i ? "," : "",
		    (unsigned long long)c->service_us_log2[i]);
	return n + snprintf(buf + n, cap - (size_t)n, "]");
}

/* One JSON line of a VM's counters, on standard output. */
static void
print_counters_of(pid_t pid, const struct counters *live, int code)
{
	struct counters now;
	char line[2048];
	int n = snprintf(line, sizeof(line), "{\"exit_code\":%d,\"vmm_pid\":%d",
	    code, (int)pid);

	n += counters_json(line + n, sizeof(line) - (size_t)n,
	    counters_read(live, &now));
	snprintf(line + n, sizeof(line) - (size_t)n, "}\n");
	fputs(line, stdout);
	fflush(stdout);
}

static void
print_counters(const struct session *s, int code)
{
	print_counters_of(s->vm.pid, s->n, code);
}

/* ------------------------------------------------------------------------
 * 10. The keeper
 *
 * The process that is started is the keeper. It sets up (the inputs, the
 * socket, the signals, its own seccomp filter) and then holds what must
 * outlive a crash: the listening socket, and for every connection its
 * socket, the VMM's pidfd and, once the handshake is taken, the uffd and
 * the memfd of the session's state. It does nothing else: it reads no
 * VMM's bytes and touches no guest memory. All the work is done by its
 * child, the server, forked from it with every descriptor it holds. When
 * the server dies, for any reason, the keeper starts another, which adopts
 * every session from the state and wakes every registered range (a fault
 * the dead server read is never delivered again). A server that dies
 * CRASH_LIMIT times in CRASH_WINDOW_MS is not started again: every VMM is
 * killed, since a VM frozen for good is worse than one killed.
 * ------------------------------------------------------------------------ */

enum ctl_type {
	/* keeper to server */
	K_CONN = 1,	/* slot, pid: a connection accepted (fds: conn, pidfd) */
	K_DROP,		/* slot: closed by the keeper, for room (it sent nothing) */
	K_HELD,		/* slot: its uffd and state are held (see S_HOLD) */
	K_UNHELD,	/* slot: they could not be (no descriptor): refuse it */
	K_UNLISTENED,	/* the socket is closed: no K_CONN comes after it */
	K_STOP,		/* arg: stop, with this exit code (or EXIT_HANDOVER) */
	K_USR1,		/* print every served VM's counters */
	/* server to keeper */
	S_READY,	/* every slot adopted, serving */
	S_VMM,		/* slot: it sent its first byte, a VMM */
	S_HOLD,		/* slot: hold its uffd and state (fds: uffd, statefd) */
	S_CLOSE,	/* slot, arg: its session ended, with this exit code */
	S_UNLISTEN,	/* take no more connections */
	S_DONE,		/* arg: the exit code this server leaves with */
	CTL_TYPES
};

/* A slot number is used again once freed: its generation tells a late
 * message about the old connection from one about the new. */
struct ctl {
	uint32_t type;
	uint32_t slot, gen;
	int32_t arg;
	int32_t pid;
};

#define CTL_FDS		2

/* What the keeper opens before any VMM connects; sessions borrow it. */
struct inputs {
	struct chain chain;
	int record_fd;
	uint64_t *list;			/* --populate FILE */
	size_t nlist;
};

/* A connection, as the keeper holds it for the server. */
enum slot_state { SLOT_FREE, SLOT_CONN, SLOT_HELD };

struct slot {
	struct vm vm;			/* conn, pidfd; uffd and statefd once held */
	enum slot_state state;
	uint32_t gen;			/* bumped each time it is taken */
	int answer;			/* K_HELD or K_UNHELD owed; 0: none */
	int vmm;			/* it sent a byte (S_VMM) */
	int sent;			/* the current server has it */
	int64_t since;			/* ms: accepted */
	struct counters reported;	/* as the last JSON metrics line had them */
};

/* The listening socket. */
struct listener {
	int lfd;
	struct stat sock_st;		/* SOCKET, as this handler made it */
	int reserve[2];			/* spare descriptors, for EMFILE */
	int64_t paused;			/* accepting off until then */
	int pause_logged;
	int owed;			/* K_UNLISTENED is owed to the server */
};

/* --metrics: what the keeper writes to, and what it keeps for it. */
struct metrics {
	int fd[2];			/* PATH, and for .prom PATH.tmp; -1: none */
	int dirfd;			/* PATH's directory (.prom) */
	int prom;			/* Prometheus text; else JSON lines */
	char name[NAME_MAX + 1];	/* PATH's last part, and with .tmp */
	char tmp[NAME_MAX + 5];
	int64_t next;			/* ms: the next write */
	int failing;			/* a failure logged, no success since */
	int nomem;			/* the text could not be made whole */
	const char *op;			/* the call that failed */
	struct counters retired;	/* of the VMs that ended */
	struct counters sent;		/* the totals the last JSON line had */
	uint64_t killed;		/* VMMs killed: sessions ended not 0 */
	uint64_t sent_killed, sent_restarts;
	char *buf;			/* what one write says */
	size_t len, cap;
	size_t off;			/* of a JSON line a FIFO took in part */
};

/* Where the server is in its life (see permitted[]). */
enum server_life { LIFE_NONE, LIFE_STARTING, LIFE_READY, LIFE_STOPPING };

#define CRASH_LIMIT	5		/* server deaths ... */
#define CRASH_WINDOW_MS	10000		/* ... in this long fail closed */
#define STOP_MS		3000		/* a server told to stop has this long */

struct keeper {
	struct inputs in;
	struct listener ls;
	int sigfd, epfd;
	int ctl;			/* the keeper's end, with the server */
	int ctl_full;			/* its buffer was full: EPOLLOUT */
	pid_t server;
	enum server_life life;
	int ready_once;			/* a server got ready */
	int done;			/* S_DONE's exit code; -1 before */
	int stop;			/* a stopping signal's exit code; 0: none */
	int64_t stop_by;		/* the server must be gone by then */
	int worst;			/* the gravest ending so far */
	long vmms;			/* connections that were VMMs, ever */
	struct slot *slot;
	size_t nslot, slotcap;
	int64_t crash[CRASH_LIMIT];	/* the last deaths, ms, a ring */
	unsigned ncrash;
	int procfd;			/* /proc, for the server's oom_score_adj */
	int oom;			/* the server's oom_score_adj */
	char **argv;			/* as started, for an upgrade */
	char exe[PATH_MAX];		/* the binary's path, resolved at start */
	int self_fd;			/* that binary, to go back to */
	struct metrics m;
	int upgrade;			/* the new binary, while one is under way */
	struct watch wl, ws, wc;
};

/* The serving and population threads (--threads 2 or more). */
struct workers {
	int wepfd;			/* the serving threads' set: the uffds */
	int stopfd;			/* in it, readable once they must stop */
	int notefd;			/* in the loop's: a thread ended a session */
	int stop;
	struct thread *threads;
	int nthreads;			/* started */
	struct thread *pops;		/* population's, when --populate */
	int npops;			/* started */
	pthread_mutex_t popmu;		/* popq, stop */
	pthread_cond_t popcv;
	struct session **popq;		/* sessions populating */
	size_t npop, popcap;
	struct grave *graves;		/* ended, not yet freed */
	size_t ngraves, gravecap;
};

/* What a session and the serving threads hang off. */
#define EPOLL_BATCH	64
#define MAX_SILENT	64		/* connections that sent nothing yet */
#define CLOSING_MS	500		/* see handshake_failed */

struct server {
	int epfd;
	int ctl;			/* the server's end, with the keeper */
	struct keeper *k;		/* the keeper as forked: inputs, slots */
	const struct inputs *in;
	int listening;			/* the keeper still takes connections */
	int unlisten_asked;
	int stop;			/* K_STOP's exit code; 0: none */
	struct session **s;		/* in the order accepted */
	size_t n, cap;
	long vmms;			/* connections that were VMMs, ever */
	size_t live;			/* VMM sessions now */
	int worst;			/* the exit code so far: note_exit */
	int64_t idle_end;		/* --accept-timeout; INT64_MAX: off */
	int tight;			/* the serving-only filter is on */
	struct watch wc, wn;
	int ctl_ev, note_ev;		/* ready this round */
	struct workers w;		/* --threads 2 or more */
};

struct thread {
	struct server *srv;
	int id;				/* its lane in every session */
	uint64_t epoch;			/* odd while waiting for events */
	pthread_t tid;
};

struct grave {
	struct session *s;
	uint64_t epoch[MAX_THREADS];	/* the threads' when it ended */
};

/* Defined with the metrics, the protocol and the server loop below. */
static int metrics_open(struct metrics *m);
static void metrics_close(struct metrics *m);
static void metrics_write(struct keeper *k);
static void metrics_due(struct keeper *k, int64_t now);
static void metrics_retire(struct keeper *k, const struct slot *sl, int code);
static void metrics_end(struct keeper *k);
static void metrics_env(const struct metrics *m, char *buf, size_t cap);
static void metrics_take(struct keeper *k);
static void keeper_blank(struct keeper *k, char **argv);
static int keeper_start(struct keeper *k);
static void keeper_close(struct keeper *k);
static void keeper_unlisten(struct keeper *k);
static int keeper_answer(struct keeper *k, const struct ctl *m, int fds[2]);
static void add_peer(struct server *srv, const struct ctl *m, int conn,
    int pidfd, int64_t now);
static void session_end(struct server *srv, struct session *s, int code);
static int server_answer(struct server *srv, int64_t now);
static void keeper_gone(struct server *srv);
static void keeper_upgrade(struct keeper *k, int64_t now);
static void keeper_exec(struct keeper *k);
static int keeper_init(struct keeper *k);
static void fail_closed(struct server *srv, struct session *s, int code);
static int ask_drop(struct keeper *k, size_t i);
static int ask_held(struct keeper *k, size_t i);
static int ask_conn(struct keeper *k, size_t i);
static int ask_unlistened(struct keeper *k);
static int ask_stop(struct keeper *k, int code);
static int ask_usr1(struct keeper *k);
static int ctl_recv(int fd, struct ctl *m, int fds[2]);
static int server_main(struct keeper *k, int ctl);
static int turn_away(int conn, int pidfd, pid_t pid, const char *why);
static int sent_anything(int conn);

/* The memory file and the list --populate names. */
static int
open_inputs(struct inputs *in, int sigfd)
{
	int rc;

	if ((rc = chain_open(&in->chain, opt.layers, opt.nlayers, sigfd)) < 0)
		return rc;
	if (opt.populate_path != NULL)
		return load_list(opt.populate_path, &in->list, &in->nlist);
	return 0;
}

/*
 * The --record file, emptied only once everything else is set up, and
 * never when it is the memory file itself: a slip of the command line
 * must not destroy the snapshot. -EINVAL for that, a usage error. Opened
 * non-blocking, and left so: a FIFO nobody reads would hold up the start
 * with signals unanswered, and one whose reader stalls the end (see
 * write_record).
 */
static int
open_record(struct inputs *in)
{
	struct stat a;

	if (opt.record_path == NULL)
		return 0;
	if ((in->record_fd = open(opt.record_path, O_WRONLY | O_CREAT | O_CLOEXEC |
	    O_NONBLOCK, 0644)) < 0 || fstat(in->record_fd, &a) < 0) {
		logmsg(LOG_ERROR, "open(%s): %s", opt.record_path, strerror(errno));
		return -EIO;
	}
	for (int i = 0; i < in->chain.n; i++)
		if (a.st_dev == in->chain.layer[i].dev &&
		    a.st_ino == in->chain.layer[i].ino) {
			logmsg(LOG_ERROR, "--record %s is the memory file; not "
			    "overwriting it", opt.record_path);
			return -EINVAL;
		}
	if (S_ISREG(a.st_mode) && ftruncate(in->record_fd, 0) < 0) {
		logmsg(LOG_ERROR, "ftruncate(%s): %s", opt.record_path, strerror(errno));
		return -EIO;
	}
	return 0;
}

static int
bind_to(int fd, const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };

	memcpy(a.sun_path, path, strlen(path));
	return bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 ? -errno : 0;
}

static int
same_file(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

/*
 * A socket file nobody listens on is what a killed handler leaves behind.
 * The probe does not block: a live handler whose backlog is full answers
 * EAGAIN, a stale socket ECONNREFUSED. Only the file probed is removed:
 * the path is looked at again after the probe.
 */
static int
replace_stale(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	struct stat st, again;
	int probe, rc;

	if (lstat(path, &st) < 0) {
		logmsg(LOG_ERROR, "lstat(%s): %s", path, strerror(errno));
		return -errno;
	}
	if (!S_ISSOCK(st.st_mode)) {
		logmsg(LOG_ERROR, "%s exists and is not a socket; not replacing it",
		    path);
		return -EEXIST;
	}
	memcpy(a.sun_path, path, strlen(path));
	if ((probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK,
	    0)) < 0) {
		logmsg(LOG_ERROR, "socket(AF_UNIX) to probe %s: %s", path,
		    strerror(errno));
		return -errno;
	}
	rc = connect(probe, (const struct sockaddr *)&a, sizeof(a));
	close(probe);
	if (rc == 0 || errno == EAGAIN) {
		logmsg(LOG_ERROR, "%s: another process is listening on it", path);
		return -EADDRINUSE;
	}
	if (errno != ECONNREFUSED) {
		logmsg(LOG_ERROR, "connect(%s): %s", path, strerror(errno));
		return -errno;
	}
	if (lstat(path, &again) < 0 || !same_file(&st, &again)) {
		logmsg(LOG_ERROR, "%s changed while it was probed; not replacing it",
		    path);
		return -EADDRINUSE;
	}
	if (unlink(path) < 0 && errno != ENOENT) {
		logmsg(LOG_ERROR, "unlink(%s): %s", path, strerror(errno));
		return -errno;
	}
	logmsg(LOG_INFO, "replaced stale socket %s", path);
	return 0;
}

/* The jailed VMM connects as the jail's uid and gid (--socket-owner). */
static int
set_socket_access(const char *path)
{
	if ((opt.sock_uid >= 0 || opt.sock_gid >= 0) &&
	    chown(path, (uid_t)opt.sock_uid, (gid_t)opt.sock_gid) < 0) {
		logmsg(LOG_ERROR, "chown(%s, %ld:%ld): %s", path, opt.sock_uid,
		    opt.sock_gid, strerror(errno));
		return -errno;
	}
	if (opt.sock_mode >= 0 && chmod(path, (mode_t)opt.sock_mode) < 0) {
		logmsg(LOG_ERROR, "chmod(%s, %lo): %s", path, opt.sock_mode,
		    strerror(errno));
		return -errno;
	}
	return 0;
}

/*
 * Handlers starting on one directory take turns: an exclusive flock(2) of
 * SOCKET's directory is held from the first look at the path to listen(2).
 * So no handler probes a socket another has bound but not yet listens on
 * (it looks stale), nor removes one it has just made, whatever their pid
 * namespaces. A directory this handler may not read (x only, as jails
 * have) cannot be opened to lock: SOCKET.lock is locked instead, made if
 * need be and left in place (removing a lock file others may wait on
 * would let two hold one). A lock held past DIR_LOCK_MS is an error, not
 * a race to risk; a stopping signal ends the wait. The locked descriptor,
 * or a negative errno, logged.
 */
#define DIR_LOCK_MS	5000

static int
open_lock(const char *path)
{
	char dir[sizeof(((struct sockaddr_un *)0)->sun_path)], file[PATH_MAX];
	int fd;

	split_path(path, dir, sizeof(dir), NULL, 0);
	if ((fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0 ||
	    errno != EACCES) {
		if (fd < 0)
			logmsg(LOG_ERROR, "open(%s) to lock it: %s", dir, strerror(errno));
		return fd < 0 ? -errno : fd;
	}
	snprintf(file, sizeof(file), "%s.lock", path);
	if ((fd = open(file, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600)) < 0) {
		logmsg(LOG_ERROR, "%s cannot be read, and open(%s): %s", dir, file,
		    strerror(errno));
		return -errno;
	}
	logmsg(LOG_INFO, "%s cannot be read: locking %s instead", dir, file);
	return fd;
}

static int
lock_socket_dir(const char *path, int sigfd)
{
	int64_t end = now_ms() + DIR_LOCK_MS;
	int fd, rc;

	if ((fd = open_lock(path)) < 0)
		return fd;
	while (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		if (errno != EWOULDBLOCK || now_ms() >= end) {
			logmsg(LOG_ERROR, "flock(%s's directory): %s; not binding",
			    path, errno == EWOULDBLOCK ? "another process has held it "
			    "for 5 s" : strerror(errno));
			close(fd);
			return errno == EWOULDBLOCK ? -EBUSY : -errno;
		}
		if ((rc = setup_interrupted(sigfd)) < 0) {
			close(fd);
			return rc;
		}
		usleep(10000);
	}
	return fd;
}

/* --max-vms restores often start together; the kernel caps this at
 * net.core.somaxconn (4096 since Linux 5.4). */
#define LISTEN_BACKLOG	4096

/* Bound and listening at path, replacing a stale socket; logged. */
static int
bind_listen(int fd, const char *path)
{
	int rc = bind_to(fd, path);

	if (rc == -EADDRINUSE) {
		if ((rc = replace_stale(path)) < 0)
			return rc;
		rc = bind_to(fd, path);
	}
	if (rc == 0 && listen(fd, LISTEN_BACKLOG) < 0)
		rc = -errno;
	if (rc < 0)
		logmsg(LOG_ERROR, "bind/listen(%s): %s", path, strerror(-rc));
	return rc;
}

/*
 * The listening socket at path, under the directory's lock (see above).
 * own gets the file, so that only this handler's is ever removed; once it
 * is made, every failure removes it again.
 */
static int
listen_socket(const char *path, struct stat *own, int sigfd)
{
	int fd, rc, dirfd;

	if (strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
		logmsg(LOG_ERROR, "socket path %s is longer than %zu bytes", path,
		    sizeof(((struct sockaddr_un *)0)->sun_path) - 1);
		return -ENAMETOOLONG;
	}
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) < 0) {
		logmsg(LOG_ERROR, "socket(AF_UNIX) for %s: %s", path, strerror(errno));
		return -errno;
	}
	if ((dirfd = lock_socket_dir(path, sigfd)) < 0) {
		close(fd);
		return dirfd;
	}
	rc = bind_listen(fd, path);
	if (rc == 0 && lstat(path, own) < 0) {
		rc = -errno;
		logmsg(LOG_ERROR, "lstat(%s): %s", path, strerror(errno));
	} else if (rc == 0 && (rc = set_socket_access(path)) < 0) {
		unlink(path);
	}
	close(dirfd);
	if (rc < 0) {
		close(fd);
		return rc;
	}
	return fd;
}

/*
 * SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGCHLD arrive
 * through the keeper's signalfd: the keeper decides. Left to their default
 * action, the stopping signals would end the handler without killing its
 * VMMs, freezing their guests. A server is born with them blocked and
 * never reads them: it hears of them from the keeper.
 */
static void
handled_signals(sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGTERM);
	sigaddset(set, SIGINT);
	sigaddset(set, SIGHUP);
	sigaddset(set, SIGQUIT);
	sigaddset(set, SIGUSR1);
	sigaddset(set, SIGUSR2);
	sigaddset(set, SIGCHLD);
}

static int
signal_fd(void)
{
	sigset_t set;
	int fd;

	signal(SIGPIPE, SIG_IGN);
	signal(SIGBUS, on_sigbus);
	handled_signals(&set);
	if (sigprocmask(SIG_BLOCK, &set, NULL) < 0 ||
	    (fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK)) < 0) {
		logmsg(LOG_ERROR, "signalfd: %s", strerror(errno));
		return -errno;
	}
	return fd;
}

/*
 * Each VM holds 3 descriptors (its socket, uffd and pidfd): the soft limit,
 * often 1024, goes up to the hard one, which needs no privilege.
 */
static void
raise_nofile(void)
{
	struct rlimit r;

	if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
		r.rlim_cur = r.rlim_max;
		setrlimit(RLIMIT_NOFILE, &r);
	}
}

/*
 * Confinement. The keeper's filter allows what serving needs (reading
 * events, installing pages, writing logs, freeing memory, signalling a
 * VMM, talking to the other process, ioctl only with the UFFDIO requests
 * used), what a server needs before its own filter, and what the keeper
 * needs besides: accepting, forking, reaping; no open (but for the
 * server's oom_score_adj), no socket, no exec. A server stacks a filter of
 * the first two lists, and once no connection can come and every
 * handshake is in, one of the first list alone. A denied call fails with
 * EPERM rather than killing the process: a dead handler would leave the
 * guest frozen, an EPERM is logged and ends in the fail-closed path, which
 * the filter keeps open.
 */

#if defined(__x86_64__)
#define AUDIT_ARCH_NATIVE	AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define AUDIT_ARCH_NATIVE	AUDIT_ARCH_AARCH64
#else
#error "seccomp filter: unknown architecture"
#endif

static const long allowed_syscalls[] = {
	SYS_read, SYS_write, SYS_writev, SYS_close, SYS_ppoll, SYS_mmap,
	SYS_munmap, SYS_mremap, SYS_madvise, SYS_brk, SYS_exit, SYS_exit_group,
	SYS_rt_sigreturn, SYS_rt_sigprocmask, SYS_clock_gettime, SYS_lseek,
	SYS_newfstatat, SYS_kill, SYS_pidfd_send_signal, SYS_getpid, SYS_gettid,
	SYS_tgkill, SYS_restart_syscall, SYS_epoll_pwait, SYS_epoll_ctl,
	SYS_futex, SYS_clock_nanosleep, SYS_sched_yield, SYS_sendmsg,
	SYS_recvmsg, SYS_mincore, SYS_fadvise64, SYS_epoll_pwait2,
#ifdef SYS_nanosleep
	SYS_nanosleep,
#endif
#ifdef SYS_epoll_wait
	SYS_epoll_wait,
#endif
#ifdef SYS_poll
	SYS_poll,
#endif
#ifdef SYS_fstat
	SYS_fstat,
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
	/* The sanitizer runtimes' own calls, in the test builds only. */
	SYS_clone, SYS_clone3, SYS_ptrace, SYS_wait4, SYS_prctl, SYS_openat,
	SYS_getdents64, SYS_readlinkat, SYS_sched_yield, SYS_sigaltstack,
	SYS_rt_sigaction, SYS_mprotect, SYS_futex, SYS_set_robust_list,
	SYS_rseq, SYS_sched_getaffinity, SYS_pread64, SYS_getrandom, SYS_getppid,
#ifdef SYS_getdents
	SYS_getdents,
#endif
#ifdef SYS_readlink
	SYS_readlink,
#endif
#ifdef SYS_open
	SYS_open,
#endif
#endif
};

/* The handshake, the peer's pidfd, refusing, the state's memfd, the
 * second filter, and starting the serving threads (clone3, rseq,
 * set_robust_list: glibc's, in the test builds). */
static const long accepting_syscalls[] = {
	SYS_getsockopt, SYS_setsockopt, SYS_pidfd_open, SYS_fcntl,
	SYS_shutdown, SYS_seccomp, SYS_clone, SYS_mprotect,
	SYS_epoll_create1, SYS_eventfd2, SYS_memfd_create, SYS_ftruncate,
#ifdef SYS_clone3
	SYS_clone3,
#endif
#ifdef SYS_rseq
	SYS_rseq,
#endif
	SYS_set_robust_list,
};

/* The keeper: accepting, the socket's removal (lstat first: musl's on
 * x86_64), forking and reaping servers, and what its server needs before
 * its own filter (which it inherits). */
static const long keeper_syscalls[] = {
	SYS_accept4, SYS_unlinkat, SYS_wait4, SYS_waitid, SYS_socketpair,
	SYS_prctl, SYS_dup3, SYS_recvfrom, SYS_execveat, SYS_pread64,
	SYS_set_tid_address, SYS_prlimit64, SYS_signalfd4, SYS_rt_sigaction,
	SYS_fstatfs,
#ifdef SYS_arch_prctl
	SYS_arch_prctl,
#endif
#ifdef SYS_fork
	SYS_fork,
#endif
#ifdef SYS_lstat
	SYS_lstat,
#endif
#ifdef SYS_unlink
	SYS_unlink,
#endif
};

static const uint32_t allowed_ioctls[] = {
	UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE, UFFDIO_UNREGISTER,
};

#define LOAD(off)	(struct sock_filter){ BPF_LD_W_ABS, 0, 0, (uint32_t)(off) }
#define IS(k)		(struct sock_filter){ BPF_JEQ_K, 0, 1, (uint32_t)(k) }
#define RET(k)		(struct sock_filter){ BPF_RET_K, 0, 0, (uint32_t)(k) }
#define NCALLS(a)	(sizeof(a) / sizeof((a)[0]))

/* Who installs a filter: a server serving, a server accepting, the keeper. */
enum stage { STAGE_SERVING, STAGE_ACCEPTING, STAGE_KEEPER };

static size_t
allow_calls(struct sock_filter *f, size_t n, const long *calls, size_t ncalls)
{
	for (size_t i = 0; i < ncalls; i++) {
		f[n++] = IS(calls[i]);
		f[n++] = RET(SECCOMP_RET_ALLOW);
	}
	return n;
}

/* openat only relative to /proc (the server's oom_score_adj), or
 * read-only (the new binary of an upgrade, to check and execute): checked
 * on the descriptor and the flags, the arguments a filter can read. */
static size_t
allow_openat(struct sock_filter *f, size_t n, int procfd)
{
	f[n++] = (struct sock_filter){ BPF_JEQ_K, 0, 5, SYS_openat };
	f[n++] = LOAD(offsetof(struct seccomp_data, args[0]));
	f[n++] = (struct sock_filter){ BPF_JEQ_K, 2, 0, (uint32_t)procfd };
	f[n++] = LOAD(offsetof(struct seccomp_data, args[2]));
	f[n++] = (struct sock_filter){ BPF_JEQ_K, 0, 1, O_RDONLY | O_CLOEXEC };
	f[n++] = RET(SECCOMP_RET_ALLOW);
	f[n++] = LOAD(offsetof(struct seccomp_data, nr));
	return n;
}

/* renameat2 only inside the directory --metrics writes in (see metrics). */
static size_t
allow_rename(struct sock_filter *f, size_t n, int dirfd)
{
	f[n++] = (struct sock_filter){ BPF_JEQ_K, 0, 3, SYS_renameat2 };
	f[n++] = LOAD(offsetof(struct seccomp_data, args[0]));
	f[n++] = (struct sock_filter){ BPF_JEQ_K, 0, 1, (uint32_t)dirfd };
	f[n++] = RET(SECCOMP_RET_ALLOW);
	f[n++] = LOAD(offsetof(struct seccomp_data, nr));
	return n;
}

/*
 * The filters stack, and the stricter wins: the keeper's, then in each
 * server the accepting one, then, once no connection can come, the
 * serving one. procfd and dirfd: see allow_openat and allow_rename (the
 * keeper's only).
 */
static int
seccomp_confine(enum stage stage, int procfd, int dirfd)
{
	struct sock_filter f[2 * (NCALLS(allowed_syscalls) +
	    NCALLS(accepting_syscalls) + NCALLS(keeper_syscalls) +
	    NCALLS(allowed_ioctls)) + 24];
	struct sock_fprog prog = { 0, f };
	size_t n = 0;

	/* Another ABI's numbers mean other calls: not a case to reason about. */
	f[n++] = LOAD(offsetof(struct seccomp_data, arch));
	f[n++] = (struct sock_filter){ BPF_JEQ_K, 1, 0, AUDIT_ARCH_NATIVE };
	f[n++] = RET(SECCOMP_RET_KILL_PROCESS);
	f[n++] = LOAD(offsetof(struct seccomp_data, nr));
	n = allow_calls(f, n, allowed_syscalls, NCALLS(allowed_syscalls));
	if (stage >= STAGE_ACCEPTING)
		n = allow_calls(f, n, accepting_syscalls, NCALLS(accepting_syscalls));
	if (stage == STAGE_KEEPER) {
		n = allow_calls(f, n, keeper_syscalls, NCALLS(keeper_syscalls));
		n = allow_openat(f, n, procfd);
		n = allow_rename(f, n, dirfd);
	}
	f[n++] = (struct sock_filter){ BPF_JEQ_K, 1, 0, SYS_ioctl };
	f[n++] = RET(SECCOMP_RET_ERRNO | EPERM);
	/* The request's low 32 bits: musl passes it as a sign-extended int. */
	f[n++] = LOAD(offsetof(struct seccomp_data, args[1]));
	for (size_t i = 0; i < NCALLS(allowed_ioctls); i++) {
		f[n++] = IS(allowed_ioctls[i]);
		f[n++] = RET(SECCOMP_RET_ALLOW);
	}
	f[n++] = RET(SECCOMP_RET_ERRNO | EPERM);
	prog.len = (unsigned short)n;
	/* Through prctl, which valgrind knows, while the process has one
	 * thread; the serving filter through seccomp(2), which the others
	 * allow, with TSYNC: on every thread at once. */
	if (stage != STAGE_SERVING ? prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
	    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0 :
	    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
	    opt.threads > 1 ? SECCOMP_FILTER_FLAG_TSYNC : 0, &prog) != 0) {
		logmsg(LOG_ERROR, "installing the seccomp filter: %s", strerror(errno));
		return -errno;
	}
	logmsg(LOG_DEBUG, "seccomp filter of %zu instructions installed", n);
	return 0;
}

/* After binding, as the jailer's uid and gid; no way back to root. */
static int
drop_privileges(void)
{
	if (opt.gid >= 0 && (setgroups(0, NULL) < 0 || setgid((gid_t)opt.gid) < 0)) {
		logmsg(LOG_ERROR, "setgid(%ld): %s", opt.gid, strerror(errno));
		return -errno;
	}
	if (opt.uid >= 0 && setuid((uid_t)opt.uid) < 0) {
		logmsg(LOG_ERROR, "setuid(%ld): %s", opt.uid, strerror(errno));
		return -errno;
	}
	if (opt.uid > 0 && setuid(0) == 0) {
		logmsg(LOG_ERROR, "setuid(%ld) left a way back to root", opt.uid);
		return -EPERM;
	}
	return 0;
}


/*
 * The exit code with several VMs is the gravest ending: a stopping signal,
 * then a fatal error (VMM killed), then a rejected handshake (VMM killed),
 * then 0, every VM gone its own way. One VM is the same rule.
 */
static int
exit_rank(int code)
{
	return code == EXIT_SIGNAL ? 4 : code == EXIT_FATAL ? 3 :
	    code == EXIT_HANDSHAKE ? 2 : code == EXIT_SETUP ? 1 : 0;
}

#define ACCEPT_BATCH	16		/* accepts a round, so others go on */
#define PAUSE_MS	100		/* when accepting fails */

/* The gravest of two endings (see exit_rank). */
static void
note_worst(int *worst, int code)
{
	if (exit_rank(code) > exit_rank(*worst))
		*worst = code;
}

/* A slot for a connection just accepted; -ENOMEM. */
static int
slot_new(struct keeper *k, int conn, int pidfd, pid_t pid, int64_t now)
{
	struct slot *v;
	size_t i;

	for (i = 0; i < k->nslot && k->slot[i].state != SLOT_FREE; i++)
		;
	if (i == k->nslot) {
		v = grow_array(k->slot, &k->slotcap, k->nslot, sizeof(*v), 16);
		if (v == NULL)
			return -ENOMEM;
		k->slot = v;
		k->nslot++;
	}
	k->slot[i] = (struct slot){ .vm = { conn, -1, pidfd, -1, pid, NULL },
	    .state = SLOT_CONN, .gen = k->slot[i].gen + 1, .since = now };
	return (int)i;
}

/* Closes what the slot holds; safe to call twice. */
static void
slot_free(struct slot *sl)
{
	closefd(&sl->vm.conn);
	closefd(&sl->vm.uffd);
	closefd(&sl->vm.pidfd);
	closefd(&sl->vm.statefd);
	sl->state = SLOT_FREE;
	sl->vmm = sl->sent = 0;
}

static int
server_alive(const struct keeper *k)
{
	return k->life != LIFE_NONE;
}

/*
 * Sends the server what it has not had yet: the connections accepted
 * since it was forked, in order, then K_UNLISTENED once every one of them
 * is out. A full buffer (a burst of connections) waits for EPOLLOUT.
 */
static void
keeper_flush(struct keeper *k)
{
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = &k->wc };
	int rc = 0;

	for (size_t i = 0; server_alive(k) && rc == 0 && i < k->nslot; i++) {
		if (k->slot[i].state == SLOT_CONN && !k->slot[i].sent &&
		    (rc = ask_conn(k, i)) == 0)
			k->slot[i].sent = 1;
		if (rc == 0 && k->slot[i].answer && (rc = ask_held(k, i)) == 0)
			k->slot[i].answer = 0;
	}
	if (server_alive(k) && rc == 0 && k->ls.owed && (rc = ask_unlistened(k)) == 0)
		k->ls.owed = 0;
	if (!server_alive(k) || (rc == -EAGAIN) == k->ctl_full)
		return;
	k->ctl_full = rc == -EAGAIN;
	e.events |= k->ctl_full ? EPOLLOUT : 0;
	epoll_ctl(k->epfd, EPOLL_CTL_MOD, k->ctl, &e);
}

static void
reserve_release(struct listener *ls)
{
	closefd(&ls->reserve[0]);
	closefd(&ls->reserve[1]);
}

/* Two spare descriptors: at EMFILE one accepts the connection and one
 * takes the peer's pidfd, so a VMM is killed, not left in the backlog
 * with its memory registered. */
static int
reserve_fill(struct listener *ls, int from)
{
	for (int i = 0; i < 2; i++)
		if (ls->reserve[i] < 0 &&
		    (ls->reserve[i] = fcntl(from, F_DUPFD_CLOEXEC, 0)) < 0)
			return -errno;
	return 0;
}

static const char no_fds[] = "out of file descriptors (EMFILE); each VM "
    "needs 4 in the keeper, raise the limit (ulimit -n)";

/* Accepting fails for a while (no descriptor, no memory): the listener
 * leaves the set until then rather than wake every round. */
static void
pause_listener(struct keeper *k, int64_t now, const char *why)
{
	struct epoll_event e = { .events = 0, .data.ptr = &k->wl };

	if (!k->ls.pause_logged)
		logmsg(LOG_ERROR, "accept(%s): %s; accepting again every %d ms",
		    opt.socket_path, why, PAUSE_MS);
	k->ls.pause_logged = 1;
	epoll_ctl(k->epfd, EPOLL_CTL_MOD, k->ls.lfd, &e);
	k->ls.paused = now + PAUSE_MS;
}

static void
resume_listener(struct keeper *k, int64_t now)
{
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = &k->wl };

	if (k->ls.paused == 0 || now < k->ls.paused || k->ls.lfd < 0)
		return;
	epoll_ctl(k->epfd, EPOLL_CTL_MOD, k->ls.lfd, &e);
	k->ls.paused = 0;
}

/* A connection the keeper cannot hold: killed if it was a VMM, closed
 * otherwise; a VMM's refusal is exit code 1. */
static void
keeper_refuse(struct keeper *k, int conn, const char *why)
{
	if (turn_away(conn, -1, 0, why))
		note_worst(&k->worst, EXIT_FATAL);
}

/*
 * Out of descriptors: the oldest connection that has sent nothing gives
 * up its own (and the server its copies), before a VMM is refused for want
 * of them. Not one accepted less than ROOM_MS ago: a VMM sends as soon as
 * it connects, but may not have yet. Looked at without shutting it down
 * first, so that a VMM whose bytes the server has not read yet is left
 * alone. 1 when one did.
 */
#define ROOM_MS		100

static int
keeper_make_room(struct keeper *k)
{
	int64_t now = now_ms();
	size_t oldest = k->nslot;
	char c;

	for (size_t i = 0; i < k->nslot; i++) {
		struct slot *sl = &k->slot[i];

		if (sl->state != SLOT_CONN || sl->vmm || now - sl->since < ROOM_MS ||
		    recv(sl->vm.conn, &c, 1, MSG_PEEK | MSG_DONTWAIT) >= 0 ||
		    errno != EAGAIN)
			continue;
		if (oldest == k->nslot || sl->since < k->slot[oldest].since)
			oldest = i;
	}
	if (oldest == k->nslot || sent_anything(k->slot[oldest].vm.conn))
		return 0;
	logmsg(LOG_INFO, "peer pid %d made room: out of descriptors; it sent "
	    "nothing, so it is no VMM in restore and is not killed",
	    (int)k->slot[oldest].vm.pid);
	if (server_alive(k) && k->slot[oldest].sent)
		ask_drop(k, oldest);
	slot_free(&k->slot[oldest]);
	return 1;
}

/* EMFILE: the spare descriptors take one connection, to be refused. */
static int
accept_spare(struct keeper *k, int64_t now)
{
	int conn, err;

	reserve_release(&k->ls);
	conn = accept4(k->ls.lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
	err = errno;
	if (conn >= 0)
		keeper_refuse(k, conn, no_fds);
	if (reserve_fill(&k->ls, k->sigfd) < 0 || (conn < 0 && err != EAGAIN)) {
		pause_listener(k, now, conn < 0 ? strerror(err) :
		    "no spare descriptor left");
		return -1;
	}
	return conn >= 0 ? 0 : -1;
}

/* A connection accepted: its pidfd taken now, while its pid is surely
 * the one that connected, and held in a slot for the server. */
static int
keeper_take(struct keeper *k, int conn, int64_t now)
{
	pid_t pid;
	int pidfd, rc;

	if ((rc = peer_of(conn, &pid, &pidfd)) < 0 && out_of_fds(-rc) &&
	    keeper_make_room(k))
		rc = peer_of(conn, &pid, &pidfd);
	if (rc < 0) {
		keeper_refuse(k, conn, no_fds);
		return rc;
	}
	if ((rc = slot_new(k, conn, pidfd, pid, now)) < 0) {
		closefd(&pidfd);
		keeper_refuse(k, conn, "out of memory");
		return rc;
	}
	return 0;
}

static void
keeper_accept(struct keeper *k, int64_t now)
{
	for (int i = 0; k->ls.lfd >= 0 && i < ACCEPT_BATCH; i++) {
		int conn = accept4(k->ls.lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
		int err = errno;

		if (conn >= 0) {
			k->ls.pause_logged = 0;
			keeper_take(k, conn, now);
		} else if (err == EAGAIN) {
			break;
		} else if (out_of_fds(err)) {
			if (!keeper_make_room(k) && accept_spare(k, now) < 0)
				break;
		} else if (err != EINTR && err != ECONNABORTED) {
			pause_listener(k, now, strerror(err));
			break;
		}
	}
	keeper_flush(k);
}

/* Removes SOCKET if it is still this handler's: another may have taken
 * the path since. */
static void
unlink_own(const struct listener *ls)
{
	struct stat st;

	if (lstat(opt.socket_path, &st) < 0 || !same_file(&st, &ls->sock_st))
		return;
	if (unlink(opt.socket_path) < 0)
		logmsg(LOG_WARN, "unlink(%s): %s; the socket file stays (the next "
		    "handler replaces it)", opt.socket_path, strerror(errno));
}

/*
 * No more connections. The socket file goes first, so no new peer finds
 * it; then the backlog is drained into slots, because a VMM waiting there
 * has sent its uffd and would wait forever once the socket is closed: the
 * server refuses each (killing those that sent anything), or, with no
 * server left, the keeper does.
 */
static void
keeper_unlisten(struct keeper *k)
{
	int conn;

	if (k->ls.lfd < 0)
		return;
	unlink_own(&k->ls);
	reserve_release(&k->ls);
	while ((conn = accept4(k->ls.lfd, NULL, NULL, SOCK_CLOEXEC |
	    SOCK_NONBLOCK)) >= 0 || errno == EINTR || errno == ECONNABORTED) {
		if (conn < 0)
			continue;
		if (!server_alive(k) || k->life == LIFE_STOPPING)
			keeper_refuse(k, conn, "it came as the handler stopped");
		else
			keeper_take(k, conn, now_ms());
	}
	epoll_ctl(k->epfd, EPOLL_CTL_DEL, k->ls.lfd, NULL);
	closefd(&k->ls.lfd);
	k->ls.owed = server_alive(k);
	keeper_flush(k);
}

/*
 * The keeper is the last process the OOM killer should pick: it is small,
 * and its death is the only one the VMs do not survive. Where permitted
 * (root, and /proc there) it sets its oom_score_adj to the lowest; each
 * server sets its own back to what the keeper had, through a /proc kept
 * open (the keeper's filter allows openat there only). Not with --uid:
 * after setuid a server may not open its own oom_score_adj, and would stay
 * at the lowest, below the VMs it serves.
 */
#define OOM_LOWEST	-1000

static void
keeper_oom(struct keeper *k)
{
	char buf[16] = "";
	int fd;
	ssize_t n;

	k->procfd = -1;
	if (geteuid() != 0 || opt.uid >= 0 ||
	    (fd = open("/proc/self/oom_score_adj", O_RDWR | O_CLOEXEC)) < 0) {
		logmsg(LOG_DEBUG, "oom_score_adj left as it is (not root, --uid, "
		    "or no /proc)");
		return;
	}
	if ((n = read(fd, buf, sizeof(buf) - 1)) > 0)
		k->oom = atoi(buf);
	if (n <= 0 || lseek(fd, 0, SEEK_SET) < 0 || write(fd, "-1000\n", 6) != 6 ||
	    (k->procfd = open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
		logmsg(errno == EACCES || errno == EPERM ? LOG_INFO : LOG_WARN,
		    "oom_score_adj of the keeper left at %d: %s%s", k->oom,
		    strerror(errno), errno == EACCES ? " (lowering it needs "
		    "CAP_SYS_RESOURCE)" : "");
	close(fd);
}

/* The server's own oom_score_adj, back to what the keeper had. */
static void
server_oom(struct keeper *k)
{
	char buf[16];
	int fd, n;

	if (k->procfd < 0)
		return;
	fd = (int)syscall(SYS_openat, k->procfd, "self/oom_score_adj",
	    O_WRONLY | O_CLOEXEC);
	n = snprintf(buf, sizeof(buf), "%d\n", k->oom);
	if (fd < 0 || write(fd, buf, (size_t)n) != n)
		logmsg(LOG_WARN, "oom_score_adj of the server: %s", strerror(errno));
	if (fd >= 0)
		close(fd);
	closefd(&k->procfd);
}

/*
 * A new server, forked with every descriptor the keeper holds: it adopts
 * each slot from the copy of the keeper it is born with, so only what the
 * keeper takes after the fork is sent to it. -errno when none can start.
 */
static int
keeper_spawn(struct keeper *k)
{
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = &k->wc };
	int sv[2];
	pid_t pid;

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
		logmsg(LOG_ERROR, "socketpair: %s", strerror(errno));
		return -errno;
	}
	fflush(stdout);
	if ((pid = fork()) < 0) {
		logmsg(LOG_ERROR, "fork: %s", strerror(errno));
		close(sv[0]);
		close(sv[1]);
		return -errno;
	}
	if (pid == 0) {
		close(sv[0]);
		exit(server_main(k, sv[1]));
	}
	close(sv[1]);
	fcntl(sv[0], F_SETFL, O_NONBLOCK);
	k->ctl = sv[0];
	k->ctl_full = 0;
	k->server = pid;
	k->life = LIFE_STARTING;
	k->done = -1;
	k->ls.owed = 0;
	for (size_t i = 0; i < k->nslot; i++)
		k->slot[i].sent = 1;
	if (epoll_ctl(k->epfd, EPOLL_CTL_ADD, k->ctl, &e) < 0)
		logmsg(LOG_ERROR, "epoll_ctl(ADD, ctl): %s", strerror(errno));
	logmsg(LOG_DEBUG, "server pid %d started", (int)pid);
	return 0;
}

/* Everything the server sent before it went: the kernel keeps a dead
 * sender's messages, descriptors included. */
static void
keeper_read_ctl(struct keeper *k)
{
	struct ctl m;
	int fds[CTL_FDS], rc;

	for (;;) {
		/* Room for the descriptors a message may bring: the spares. */
		reserve_release(&k->ls);
		rc = k->ctl >= 0 ? ctl_recv(k->ctl, &m, fds) : 0;
		if (reserve_fill(&k->ls, k->sigfd) < 0)
			keeper_make_room(k);
		if (rc == 0 || rc == -EAGAIN)
			break;
		if ((rc == 1 || rc == -EMFILE) && keeper_answer(k, &m, fds) == 0) {
			closefd(&fds[0]);
			closefd(&fds[1]);
			continue;
		}
		closefd(&fds[0]);
		closefd(&fds[1]);
		/* A server that breaks the protocol is treated as dead. */
		logmsg(LOG_ERROR, "server pid %d sent message %u (slot %u), "
		    "which is not what it may send now: ending it", (int)k->server,
		    rc == 1 ? m.type : 0, rc == 1 ? m.slot : 0);
		kill(k->server, SIGKILL);
		break;
	}
}

/* The counters line of a held session, from its state. */
static void
keeper_counters(const struct slot *sl, int code)
{
	struct vm_state *st = NULL;

	if (sl->state == SLOT_HELD && state_map(sl->vm.statefd, &st) == 0) {
		print_counters_of(sl->vm.pid, &st->n, code);
		munmap(st, st->bytes);
	}
}

/*
 * No server can serve on (it crashed too often, or is gone and the
 * keeper was told to stop): every VMM is killed, which a frozen guest
 * would be worse than, every other peer closed, the socket removed.
 */
static void
keeper_fail_closed(struct keeper *k, int code, const char *why)
{
	logmsg(LOG_ERROR, "%s: killing every VMM", why);
	keeper_unlisten(k);
	for (size_t i = 0; i < k->nslot; i++) {
		struct slot *sl = &k->slot[i];

		if (sl->state == SLOT_FREE)
			continue;
		if (sl->state == SLOT_HELD || sl->vmm || sent_anything(sl->vm.conn)) {
			kill_peer(sl->vm.pidfd, sl->vm.pid);
			keeper_counters(sl, code);
			note_worst(&k->worst, code);
			metrics_retire(k, sl, code);
		}
		slot_free(sl);
	}
	k->done = code;
}

/* Whether this death makes CRASH_LIMIT in CRASH_WINDOW_MS. */
static int
crash_loop(struct keeper *k, int64_t now)
{
	k->crash[k->ncrash++ % CRASH_LIMIT] = now;
	/* The next to be overwritten: the oldest of the last CRASH_LIMIT. */
	return k->ncrash >= CRASH_LIMIT &&
	    now - k->crash[k->ncrash % CRASH_LIMIT] < CRASH_WINDOW_MS;
}

static void
describe_status(int status, char *buf, size_t cap)
{
	if (WIFSIGNALED(status))
		snprintf(buf, cap, "killed by %s", strsignal(WTERMSIG(status)));
	else
		snprintf(buf, cap, "exit %d", WEXITSTATUS(status));
}

/*
 * The server is gone. If it said it was done, so is the keeper. Else it
 * crashed: its messages are taken first (a uffd it handed over is held),
 * then another is started, unless that makes a crash loop, or a stopping
 * signal came (the keeper then stops the VMs itself).
 */
static void
server_ended(struct keeper *k, int status, int64_t now)
{
	char how[64];

	keeper_read_ctl(k);
	epoll_ctl(k->epfd, EPOLL_CTL_DEL, k->ctl, NULL);
	closefd(&k->ctl);
	k->life = LIFE_NONE;
	if (k->upgrade >= 0 && !k->stop) {
		keeper_exec(k);
		return;
	}
	closefd(&k->upgrade);
	if (k->done >= 0)
		return;
	describe_status(status, how, sizeof(how));
	if (k->stop) {
		keeper_fail_closed(k, k->stop, "the server ended while stopping");
		return;
	}
	if (crash_loop(k, now)) {
		logmsg(LOG_ERROR, "server pid %d %s: %d deaths in %d s", (int)k->server,
		    how, CRASH_LIMIT, CRASH_WINDOW_MS / 1000);
		keeper_fail_closed(k, EXIT_FATAL, "the server keeps dying");
		return;
	}
	logmsg(LOG_ERROR, "server pid %d %s: starting another, which adopts "
	    "every session", (int)k->server, how);
	if (keeper_spawn(k) < 0)
		keeper_fail_closed(k, EXIT_FATAL, "no server could be started");
}

static void
keeper_reap(struct keeper *k, int64_t now)
{
	int status;

	if (server_alive(k) && waitpid(k->server, &status, WNOHANG) == k->server)
		server_ended(k, status, now);
}

/* A stopping signal: the server stops the VMs, or, with none to, the
 * keeper does. */
static void
keeper_stop(struct keeper *k, int code, int64_t now)
{
	if (k->stop)
		return;
	k->stop = code;
	if (!server_alive(k)) {
		keeper_fail_closed(k, code, "stopping with no server");
		return;
	}
	ask_stop(k, code);
	k->life = LIFE_STOPPING;
	k->stop_by = now + STOP_MS;
}

static void
keeper_signal(struct keeper *k, int64_t now)
{
	struct signalfd_siginfo si;

	while (read(k->sigfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		switch (si.ssi_signo) {
		case SIGCHLD:
			keeper_reap(k, now);
			break;
		case SIGUSR1:
			if (server_alive(k))
				ask_usr1(k);
			break;
		case SIGUSR2:
			keeper_upgrade(k, now);
			break;
		default:
			logmsg(LOG_WARN, "received %s", strsignal((int)si.ssi_signo));
			keeper_stop(k, EXIT_SIGNAL, now);
			break;
		}
	}
}

/* The wait: up to a paused listener's return or a stopping server's end. */
static int
keeper_wait_ms(const struct keeper *k)
{
	int64_t end = INT64_MAX;

	if (k->ls.paused)
		end = k->ls.paused;
	if (k->life == LIFE_STOPPING && k->stop_by < end)
		end = k->stop_by;
	if (k->m.fd[0] >= 0 && k->m.next < end)
		end = k->m.next;
	return ms_until(end);
}

/* Returns the exit code: the gravest of the server's and every ending. */
static int
keeper_run(struct keeper *k)
{
	struct epoll_event ev[8];
	int64_t now;
	int n;

	while (k->done < 0 || server_alive(k)) {
		n = epoll_wait(k->epfd, ev, 8, keeper_wait_ms(k));
		now = now_ms();
		for (int i = 0; i < n; i++) {
			struct watch *w = ev[i].data.ptr;

			if (w->what == W_LISTEN)
				keeper_accept(k, now);
			else if (w->what == W_SIGNAL)
				keeper_signal(k, now);
			else if (ev[i].events & EPOLLOUT)
				keeper_flush(k);
			else
				keeper_read_ctl(k);
		}
		keeper_reap(k, now);
		resume_listener(k, now);
		if (k->life == LIFE_STOPPING && now >= k->stop_by) {
			logmsg(LOG_ERROR, "server pid %d did not stop within %d ms",
			    (int)k->server, STOP_MS);
			kill(k->server, SIGKILL);
			k->stop_by = INT64_MAX;
		}
		metrics_due(k, now);
	}
	metrics_end(k);
	note_worst(&k->worst, k->done);
	note_worst(&k->worst, k->stop);
	return k->worst;
}

/*
 * Upgrade in place (SIGUSR2). The keeper stops its server at a safe point
 * (no read of a uffd under way), writes what it holds into a hand-over
 * memfd, and executes the binary at the path it was started from, keeping
 * its pid and every descriptor it holds. The new image reads the
 * hand-over, checks every session's state, and starts a server of its own
 * version, which adopts every session as after a crash. A binary that
 * cannot start here (missing, not executable, not a static binary for
 * this machine) is found out before the server is stopped; a new image
 * that cannot read the hand-over or a state goes back to the old binary,
 * kept open for that, before it has started anything.
 *
 * The hand-over's first fields keep their place in every format: a
 * version that reads another format finds there the old binary to go
 * back to, and the VMMs' pidfds to kill if even that fails.
 */
#define HANDOVER_MAGIC	0x55464648u	/* "UFFH" */
#ifndef HANDOVER_FORMAT
#define HANDOVER_FORMAT	1
#endif
#define HANDOVER_ENV	"UFFD_HANDLER_HANDOVER"
#define HANDBACK_ENV	"UFFD_HANDLER_HANDBACK"	/* set by one going back */
#define METRICS_ENV	"UFFD_HANDLER_METRICS"	/* see metrics_take */
#define EXIT_HANDOVER	100		/* a server stopped for an upgrade */

struct handover_slot {
	int32_t conn, pidfd, uffd, statefd;
	int32_t pid;
	uint32_t state, gen, vmm;
	int64_t since;
};

struct handover {
	/* The same place in every format. */
	uint32_t magic, format;
	uint64_t bytes;
	char version[64];		/* of the image that wrote it */
	int32_t rollback_fd;		/* that image's binary */
	uint32_t npidfd;
	uint64_t pidfds;		/* offset of npidfd int32s */
	/* HANDOVER_FORMAT 1 */
	int32_t self_fd;		/* the binary being executed */
	int32_t lfd, procfd, oom, record_fd;
	uint64_t sock_dev, sock_ino;
	int32_t worst;
	int32_t nlayers;
	int32_t layer_fd[MAX_LAYERS];
	int64_t vmms;
	uint64_t nlist, list;		/* --populate FILE, parsed: offset */
	uint64_t nslot, slots;		/* struct handover_slot: offset */
	char exe[PATH_MAX];
};

/* The binary's path, resolved at the start: an upgrade replaces the file,
 * /proc/self/exe would name the old inode, and a jail has no /proc. */
static void
keeper_find_self(struct keeper *k, const char *argv0)
{
	char cand[PATH_MAX];
	const char *path = getenv("PATH"), *end;

	k->self_fd = -1;
	if (strchr(argv0, '/') != NULL) {
		if (realpath(argv0, k->exe) == NULL)
			k->exe[0] = '\0';
	} else {
		k->exe[0] = '\0';
		for (; path != NULL && *path && k->exe[0] == '\0'; path = *end ?
		    end + 1 : end) {
			end = strchr(path, ':') ? strchr(path, ':') : path + strlen(path);
			snprintf(cand, sizeof(cand), "%.*s/%s", (int)(end - path), path,
			    argv0);
			if (access(cand, X_OK) == 0 && realpath(cand, k->exe) == NULL)
				k->exe[0] = '\0';
		}
	}
	if (k->exe[0] != '\0')
		k->self_fd = open(k->exe, O_PATH | O_CLOEXEC);
	if (k->self_fd < 0)
		logmsg(LOG_DEBUG, "the binary's path was not found: no upgrade "
		    "in place");
}

/* Whether the file at fd can start under the keeper's filter: an ELF
 * executable of this machine, static (a dynamic one's loader would open
 * its libraries, which the filter forbids; the test builds allow it). */
static int
exec_ready(int fd, char *why, size_t cap)
{
	unsigned char h[64], ph[56];
	struct stat st;
	uint64_t phoff;
	uint16_t phnum, phentsize;

	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || !(st.st_mode & 0111))
		return snprintf(why, cap, "not an executable file"), -1;
	if (pread(fd, h, sizeof(h), 0) != (ssize_t)sizeof(h) ||
	    memcmp(h, "\177ELF", 4) != 0 || h[4] != 2)
		return snprintf(why, cap, "not a 64-bit ELF file"), -1;
	memcpy(&phoff, h + 32, 8);
	memcpy(&phentsize, h + 54, 2);
	memcpy(&phnum, h + 56, 2);
	for (uint16_t i = 0; i < phnum && phentsize >= sizeof(ph); i++) {
		uint32_t type;

		if (pread(fd, ph, sizeof(ph), (off_t)(phoff + (uint64_t)i *
		    phentsize)) != (ssize_t)sizeof(ph))
			return snprintf(why, cap, "a truncated ELF file"), -1;
		memcpy(&type, ph, 4);
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
		if (type == 3)		/* PT_INTERP */
			return snprintf(why, cap, "dynamically linked"), -1;
#endif
	}
	return 0;
}

/* Sets or clears FD_CLOEXEC: what the next image keeps. */
static void
inherit(int fd, int keep)
{
	if (fd >= 0)
		fcntl(fd, F_SETFD, keep ? 0 : FD_CLOEXEC);
}

static size_t
handover_size(const struct keeper *k)
{
	return sizeof(struct handover) + k->in.nlist * sizeof(uint64_t) +
	    k->nslot * sizeof(struct handover_slot) + k->nslot * sizeof(int32_t);
}

/* What the keeper holds, for the next image: a memfd of struct handover,
 * the --populate list, the slots and the pidfds. -errno. */
static int
handover_write(struct keeper *k, int newfd)
{
	size_t bytes = handover_size(k);
	struct handover *h;
	struct handover_slot *hs;
	int32_t *pidfds;
	int fd;

	if ((fd = memfd_create("uffd-handler-handover", MFD_CLOEXEC)) < 0 ||
	    ftruncate(fd, (off_t)bytes) < 0 || (h = mmap(NULL, bytes,
	    PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED) {
		if (fd >= 0)
			close(fd);
		return -errno;
	}
	*h = (struct handover){ HANDOVER_MAGIC, HANDOVER_FORMAT, bytes, "",
	    k->self_fd, (uint32_t)k->nslot, sizeof(*h) + k->in.nlist * 8 +
	    k->nslot * sizeof(*hs), newfd, k->ls.lfd, k->procfd, k->oom,
	    k->in.record_fd, k->ls.sock_st.st_dev, k->ls.sock_st.st_ino, k->worst,
	    k->in.chain.n, { 0 }, k->vmms, k->in.nlist, sizeof(*h), k->nslot,
	    sizeof(*h) + k->in.nlist * 8, "" };
	snprintf(h->version, sizeof(h->version), "%s", VERSION_LINE);
	snprintf(h->exe, sizeof(h->exe), "%s", k->exe);
	for (int i = 0; i < k->in.chain.n; i++)
		h->layer_fd[i] = k->in.chain.layer[i].fd;
	memcpy((char *)h + h->list, k->in.list, k->in.nlist * 8);
	hs = (struct handover_slot *)(void *)((char *)h + h->slots);
	pidfds = (int32_t *)(void *)((char *)h + h->pidfds);
	for (size_t i = 0; i < k->nslot; i++) {
		const struct slot *sl = &k->slot[i];

		hs[i] = (struct handover_slot){ sl->vm.conn, sl->vm.pidfd, sl->vm.uffd,
		    sl->vm.statefd, sl->vm.pid, sl->state, sl->gen, (uint32_t)sl->vmm,
		    sl->since };
		pidfds[i] = sl->state == SLOT_FREE ? -1 : sl->vm.pidfd;
	}
	munmap(h, bytes);
	return fd;
}

/* Every descriptor the next image is to keep, kept or let go. */
static void
handover_fds(struct keeper *k, int hfd, int newfd, int keep)
{
	inherit(hfd, keep);
	inherit(newfd, keep);
	inherit(k->self_fd, keep);
	inherit(k->ls.lfd, keep);
	inherit(k->procfd, keep);
	inherit(k->in.record_fd, keep);
	inherit(k->m.fd[0], keep);
	inherit(k->m.fd[1], keep);
	inherit(k->m.dirfd, keep);
	for (int i = 0; i < k->in.chain.n; i++)
		inherit(k->in.chain.layer[i].fd, keep);
	for (size_t i = 0; i < k->nslot; i++) {
		inherit(k->slot[i].vm.conn, keep);
		inherit(k->slot[i].vm.pidfd, keep);
		inherit(k->slot[i].vm.uffd, keep);
		inherit(k->slot[i].vm.statefd, keep);
	}
}

/* The environment with HANDOVER_ENV=hfd, HANDBACK_ENV when going back,
 * and metrics (METRICS_ENV=..., or NULL to keep what came), and no other
 * value of any. */
static char **
handover_env(int hfd, int back, char *metrics, char *buf, size_t cap)
{
	extern char **environ;
	size_t n = 0;
	char **env;

	while (environ[n] != NULL)
		n++;
	if ((env = calloc(n + 4, sizeof(*env))) == NULL)
		return NULL;
	n = 0;
	for (char **e = environ; *e != NULL; e++)
		if (strncmp(*e, HANDOVER_ENV "=", sizeof(HANDOVER_ENV)) != 0 &&
		    strncmp(*e, HANDBACK_ENV "=", sizeof(HANDBACK_ENV)) != 0 &&
		    (metrics == NULL || strncmp(*e, METRICS_ENV "=",
		    sizeof(METRICS_ENV)) != 0))
			env[n++] = *e;
	snprintf(buf, cap, "%s=%d", HANDOVER_ENV, hfd);
	env[n++] = buf;
	if (metrics != NULL)
		env[n++] = metrics;
	if (back)
		env[n] = HANDBACK_ENV "=1";
	return env;
}

/* Executes the binary at fd with the hand-over; returns only on failure. */
static int
exec_with(struct keeper *k, int fd, int hfd, int back)
{
	char buf[64], metrics[80];
	char **env;

	metrics_env(&k->m, metrics, sizeof(metrics));
	env = handover_env(hfd, back, k->m.fd[0] >= 0 ? metrics : NULL, buf,
	    sizeof(buf));

	if (env == NULL)
		return -ENOMEM;
	fflush(stdout);
	syscall(SYS_execveat, fd, "", k->argv, env, AT_EMPTY_PATH);
	free(env);
	return -errno;
}

/* SIGUSR2: the new binary checked, then the server stopped; the exec
 * follows once it is gone (keeper_exec). */
static void
keeper_upgrade(struct keeper *k, int64_t now)
{
	char why[64];
	int fd;

	if (k->upgrade >= 0 || k->stop || !server_alive(k)) {
		logmsg(LOG_WARN, "upgrade: not now (one is under way, the handler "
		    "stops, or no server runs)");
		return;
	}
	if (k->self_fd < 0) {
		logmsg(LOG_ERROR, "upgrade: the binary's path was not found at the "
		    "start; %s serves on", VERSION_LINE);
		return;
	}
	if ((fd = (int)syscall(SYS_openat, AT_FDCWD, k->exe, O_RDONLY |
	    O_CLOEXEC)) < 0 || exec_ready(fd, why, sizeof(why)) < 0) {
		logmsg(LOG_ERROR, "upgrade: %s: %s; %s serves on", k->exe,
		    fd < 0 ? strerror(errno) : why, VERSION_LINE);
		if (fd >= 0)
			close(fd);
		return;
	}
	logmsg(LOG_INFO, "upgrade: stopping server pid %d to execute %s",
	    (int)k->server, k->exe);
	k->upgrade = fd;
	ask_stop(k, EXIT_HANDOVER);
	k->life = LIFE_STOPPING;
	k->stop_by = now + STOP_MS;
}

/* The server is gone: the new image, or, if it cannot be executed, a
 * server of this one. */
static void
keeper_exec(struct keeper *k)
{
	int hfd, rc;

	k->done = -1;
	metrics_write(k);
	if ((hfd = handover_write(k, k->upgrade)) < 0) {
		rc = hfd;
	} else {
		handover_fds(k, hfd, k->upgrade, 1);
		rc = exec_with(k, k->upgrade, hfd, 0);
		handover_fds(k, hfd, k->upgrade, 0);
		close(hfd);
	}
	logmsg(LOG_ERROR, "upgrade: executing %s: %s; %s serves on", k->exe,
	    strerror(-rc), VERSION_LINE);
	closefd(&k->upgrade);
	if (keeper_spawn(k) < 0)
		keeper_fail_closed(k, EXIT_FATAL, "no server could be started");
}

/*
 * Back to the binary that wrote the hand-over, which reads it as it left
 * it; if even that cannot run, every VMM is killed (their pidfds are where
 * every format keeps them), since no one would serve them.
 */
static void __attribute__((noreturn))
handover_back(struct keeper *k, const struct handover *h, int hfd,
    const char *why)
{
	const int32_t *pidfd;

	logmsg(LOG_ERROR, "upgrade to %s failed: %s; back to %s", VERSION_LINE,
	    why, h->version);
	exec_with(k, h->rollback_fd, hfd, 1);
	logmsg(LOG_ERROR, "going back to %s: %s: killing every VMM", h->version,
	    strerror(errno));
	pidfd = (const int32_t *)(const void *)((const char *)h + h->pidfds);
	for (uint32_t i = 0; h->pidfds + (i + 1) * 4 <= h->bytes && i < h->npidfd;
	    i++)
		kill_peer(pidfd[i], 0);
	exit(EXIT_FATAL);
}

/* Why this version cannot take the hand-over, or NULL. */
static const char *
handover_unreadable(const struct handover *h, uint64_t bytes)
{
	static char why[96];

	if (h->format != HANDOVER_FORMAT) {
		snprintf(why, sizeof(why), "its hand-over has format %u, this "
		    "version reads %u", h->format, (unsigned)HANDOVER_FORMAT);
		return why;
	}
	if (bytes < sizeof(*h) || h->bytes != bytes || h->nlayers != opt.nlayers ||
	    h->list + h->nlist * 8 > bytes ||
	    h->slots + h->nslot * sizeof(struct handover_slot) > bytes)
		return "its hand-over does not add up";
	return NULL;
}

/* Each held session's state must be one this version reads. */
static const char *
states_unreadable(const struct handover *h)
{
	static char why[96];
	const struct handover_slot *hs = (const void *)((const char *)h + h->slots);
	struct vm_state *st;

	for (uint64_t i = 0; i < h->nslot; i++) {
		if (hs[i].state != SLOT_HELD)
			continue;
		if (state_map(hs[i].statefd, &st) < 0) {
			snprintf(why, sizeof(why), "the state of VMM pid %d has a layout "
			    "this version does not read (it reads %u)", (int)hs[i].pid,
			    (unsigned)STATE_LAYOUT);
			return why;
		}
		munmap(st, st->bytes);
	}
	return NULL;
}

/* The hand-over's slots, the keeper's from here. */
static int
take_slots(struct keeper *k, const struct handover *h)
{
	const struct handover_slot *hs = (const void *)((const char *)h + h->slots);

	if (h->nslot > 0 && (k->slot = calloc(h->nslot, sizeof(*k->slot))) == NULL)
		return -ENOMEM;
	k->nslot = k->slotcap = h->nslot;
	for (uint64_t i = 0; i < h->nslot; i++)
		k->slot[i] = (struct slot){ .vm = { hs[i].conn, hs[i].uffd,
		    hs[i].pidfd, hs[i].statefd, hs[i].pid, NULL },
		    .state = (enum slot_state)hs[i].state, .gen = hs[i].gen,
		    .vmm = (int)hs[i].vmm, .since = hs[i].since };
	return 0;
}

/* What the image before held, taken as it is. */
static int
take_handover(struct keeper *k, const struct handover *h)
{
	int fds[MAX_LAYERS];
	int rc;

	k->ls.lfd = h->lfd;
	k->ls.sock_st.st_dev = (dev_t)h->sock_dev;
	k->ls.sock_st.st_ino = (ino_t)h->sock_ino;
	k->procfd = h->procfd;
	k->oom = h->oom;
	k->in.record_fd = h->record_fd;
	k->worst = h->worst;
	k->vmms = (long)h->vmms;
	k->self_fd = h->self_fd;
	snprintf(k->exe, sizeof(k->exe), "%s", h->exe);
	for (int i = 0; i < h->nlayers; i++)
		fds[i] = h->layer_fd[i];
	if ((rc = take_slots(k, h)) < 0)
		return rc;
	if (h->nlist > 0 && (k->in.list = malloc(h->nlist * 8)) == NULL)
		return -ENOMEM;
	memcpy(k->in.list, (const char *)h + h->list, h->nlist * 8);
	k->in.nlist = h->nlist;
	return chain_take(&k->in.chain, opt.layers, fds, h->nlayers, k->sigfd);
}

/*
 * The new image of an upgrade: the hand-over read, checked and taken,
 * then a server of this version. Anything this version cannot read sends
 * it back to the old binary before it has changed anything.
 */
static int
keeper_resume(struct keeper *k, int hfd)
{
	struct handover *h;
	struct stat sb;
	const char *why;
	int rc;

	if (fstat(hfd, &sb) < 0 || (uint64_t)sb.st_size < offsetof(struct handover,
	    self_fd) || (h = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_SHARED,
	    hfd, 0)) == MAP_FAILED || h->magic != HANDOVER_MAGIC) {
		logmsg(LOG_ERROR, "%s names no hand-over: killing nothing, "
		    "serving nothing", HANDOVER_ENV);
		return EXIT_SETUP;
	}
	if ((why = handover_unreadable(h, (uint64_t)sb.st_size)) != NULL ||
	    (why = states_unreadable(h)) != NULL)
		handover_back(k, h, hfd, why);
	raise_nofile();
	if ((k->sigfd = signal_fd()) < 0 || (rc = take_handover(k, h)) < 0 ||
	    keeper_init(k) < 0)
		handover_back(k, h, hfd, "its setup failed");
	metrics_take(k);
	if (getenv(HANDBACK_ENV) != NULL)
		logmsg(LOG_INFO, "%s serves on: the upgrade did not take",
		    VERSION_LINE);
	else
		logmsg(LOG_INFO, "upgraded from %s to %s, %zu connection(s) handed "
		    "over", h->version, VERSION_LINE, k->nslot);
	if (h->rollback_fd != k->self_fd)
		close(h->rollback_fd);
	handover_fds(k, -1, -1, 0);
	munmap(h, (size_t)sb.st_size);
	close(hfd);
	unsetenv(HANDOVER_ENV);
	unsetenv(HANDBACK_ENV);
	unsetenv(METRICS_ENV);
	return keeper_spawn(k) < 0 ? EXIT_FATAL : 0;
}

/* ------------------------------------------------------------------------
 * 11. Metrics
 *
 * --metrics PATH: every --metrics-interval seconds, and once more at the
 * end, the keeper writes the counters of each VM it holds and of every VM
 * since the start. The keeper, because it holds each session's state,
 * whose counters the server adds to in place, and outlives any server: the
 * figures go on across a server's death. It reads those counters and
 * nothing else of a session. Everything it writes to is opened before its
 * filter, which lets it rename only inside PATH's directory.
 *
 * A PATH ending in .prom gets Prometheus's text format (node_exporter's
 * textfile collector reads *.prom): written whole into PATH.tmp, which
 * then trades places with PATH (renameat2 RENAME_EXCHANGE), so a reader
 * finds one complete file or the other, and no file is ever opened again.
 * Any other PATH gets one JSON line a write as Firecracker writes its
 * metrics: the time, then groups; counters are what was added since the
 * line before. It is opened read-write and non-blocking, as Firecracker
 * opens its own, so a FIFO nobody reads takes lines into its buffer and
 * then refuses them, and never holds the keeper up. A failed write is
 * logged once, until one succeeds again; serving never waits for one.
 * ------------------------------------------------------------------------ */

#define RENAME_EXCHANGE	(1 << 1)
#define NCOUNTERS	(sizeof(struct counters) / sizeof(uint64_t))

static const char *const field_help[NFIELDS] = {
	"Page faults read", "Pages copied from the memory file",
	"Removed pages served as zeros", "Zero pages of the snapshot mapped",
	"Memory the zero pages saved", "Pages installed ahead of a stream",
	"Pages populated", "Pages population left out",
	"Pages population found unregistered", "REMOVE events",
	"Pages REMOVE events covered", "Faults deferred by a pending REMOVE",
	"Bytes copied from the memory file", "Faults whose page was there",
	"Faults whose range was unregistered",
	"Faults whose page was read in first", "System calls serving",
};

/* A VM held, as one write reports it. */
struct vm_figures {
	size_t slot;
	pid_t pid;
	struct counters c;
};

static void
metrics_close(struct metrics *m)
{
	closefd(&m->fd[0]);
	closefd(&m->fd[1]);
	closefd(&m->dirfd);
	free(m->buf);
	m->buf = NULL;
}

static void
metrics_names(struct metrics *m, char *dir, size_t cap)
{
	size_t len = strlen(opt.metrics_path);

	m->prom = len > 5 && strcmp(opt.metrics_path + len - 5, ".prom") == 0;
	split_path(opt.metrics_path, dir, cap, m->name, sizeof(m->name));
	snprintf(m->tmp, sizeof(m->tmp), "%s.tmp", m->name);
}

/* Before the filter: PATH (and PATH.tmp, and its directory, for .prom). */
static int
metrics_open(struct metrics *m)
{
	char dir[PATH_MAX];
	int fl = O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW;

	m->fd[0] = m->fd[1] = m->dirfd = -1;
	if (opt.metrics_path == NULL)
		return 0;
	metrics_names(m, dir, sizeof(dir));
	if (m->prom ? (m->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0 ||
	    (m->fd[0] = openat(m->dirfd, m->name, fl, 0644)) < 0 ||
	    (m->fd[1] = openat(m->dirfd, m->tmp, fl | O_TRUNC, 0644)) < 0 :
	    (m->fd[0] = open(opt.metrics_path, fl | O_APPEND | O_NONBLOCK, 0644)) < 0) {
		logmsg(LOG_ERROR, "--metrics %s: %s", opt.metrics_path, strerror(errno));
		return -errno;
	}
	if ((m->buf = malloc(m->cap = 4096)) == NULL)
		return -ENOMEM;
	return 0;
}

static void __attribute__((format(printf, 2, 3)))
mput(struct metrics *m, const char *fmt, ...)
{
	va_list ap;
	char *b;
	int n;

	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(m->buf + m->len, m->cap - m->len, fmt, ap);
		va_end(ap);
		if (n >= 0 && m->len + (size_t)n < m->cap) {
			m->len += (size_t)n;
			return;
		}
		if (n < 0 || (b = realloc(m->buf, 2 * (m->cap + (size_t)n))) == NULL) {
			m->nomem = 1;
			return;
		}
		m->buf = b;
		m->cap = 2 * (m->cap + (size_t)n);
	}
}

/* A counter family: the handler's total, then each VM's. */
static void
prom_counter(struct metrics *m, const char *name, const char *help,
    uint64_t total, const struct vm_figures *v, size_t n, size_t field)
{
	uint64_t f[NFIELDS];

	mput(m, "# HELP uffd_handler_%s_total %s, all VMs.\n"
	    "# TYPE uffd_handler_%s_total counter\nuffd_handler_%s_total %llu\n",
	    name, help, name, name, (unsigned long long)total);
	if (v == NULL)
		return;
	mput(m, "# HELP uffd_handler_vm_%s_total %s, per VM.\n"
	    "# TYPE uffd_handler_vm_%s_total counter\n", name, help, name);
	for (size_t i = 0; i < n; i++) {
		counter_fields(&v[i].c, f);
		mput(m, "uffd_handler_vm_%s_total{vmm_pid=\"%d\"} %llu\n", name,
		    (int)v[i].pid, (unsigned long long)f[field]);
	}
}

/* service_us_log2 as a histogram: bucket k counts services under 2^k us,
 * so the cumulative sum to k is the count at le = 2^k us. No _sum: the
 * handler keeps no total of the time. */
static void
prom_histogram(struct metrics *m, const struct counters *c, pid_t pid)
{
	const char *family = pid > 0 ? "vm_" : "";
	char lb[32] = "", lc[32] = "";
	uint64_t cum = 0;

	if (pid > 0) {
		snprintf(lb, sizeof(lb), "vmm_pid=\"%d\",", (int)pid);
		snprintf(lc, sizeof(lc), "{vmm_pid=\"%d\"}", (int)pid);
	}
	for (int k = 0; k < 16; k++) {
		cum += c->service_us_log2[k];
		if (k < 15)
			mput(m, "uffd_handler_%sservice_seconds_bucket{%sle=\"0.%06u\"} "
			    "%llu\n", family, lb, 1u << k, (unsigned long long)cum);
	}
	mput(m, "uffd_handler_%sservice_seconds_bucket{%sle=\"+Inf\"} %llu\n"
	    "uffd_handler_%sservice_seconds_count%s %llu\n", family, lb,
	    (unsigned long long)cum, family, lc, (unsigned long long)cum);
}

static void
prom_text(struct metrics *m, const struct counters *total,
    const struct vm_figures *v, size_t n, uint64_t restarts)
{
	static const char help[] = "Time from a fault read to its page in";
	uint64_t f[NFIELDS];

	counter_fields(total, f);
	for (size_t i = 0; i < NFIELDS; i++)
		prom_counter(m, field_names[i], field_help[i], f[i], v, n, i);
	prom_counter(m, "server_restarts", "Servers replaced", restarts, NULL, 0, 0);
	prom_counter(m, "vms_killed", "VMMs killed", m->killed, NULL, 0, 0);
	mput(m, "# HELP uffd_handler_vms VMs served now.\n# TYPE uffd_handler_vms "
	    "gauge\nuffd_handler_vms %zu\n", n);
	mput(m, "# HELP uffd_handler_service_seconds %s, all VMs.\n"
	    "# TYPE uffd_handler_service_seconds histogram\n", help);
	prom_histogram(m, total, 0);
	mput(m, "# HELP uffd_handler_vm_service_seconds %s, per VM.\n"
	    "# TYPE uffd_handler_vm_service_seconds histogram\n", help);
	for (size_t i = 0; i < n; i++)
		prom_histogram(m, &v[i].c, v[i].pid);
}

/* a - b, counter by counter, into d. */
static void
counters_delta(struct counters *d, const struct counters *a,
    const struct counters *b)
{
	for (size_t i = 0; i < NCOUNTERS; i++)
		((uint64_t *)d)[i] = ((const uint64_t *)a)[i] -
		    ((const uint64_t *)b)[i];
}

static void
counters_add(struct counters *to, const struct counters *c)
{
	for (size_t i = 0; i < NCOUNTERS; i++)
		((uint64_t *)to)[i] += ((const uint64_t *)c)[i];
}

/* One JSON line: the time, the handler's group, a group a VM. */
static void
json_line(struct metrics *m, const struct counters *total,
    const struct vm_figures *v, const struct keeper *k, size_t n)
{
	struct timespec ts;
	struct counters d;
	char buf[1536];

	clock_gettime(CLOCK_REALTIME, &ts);
	counters_delta(&d, total, &m->sent);
	counters_json(buf, sizeof(buf), &d);
	mput(m, "{\"utc_timestamp_ms\":%lld,\"uffd_handler\":{\"vms\":%zu,"
	    "\"server_restarts\":%llu,\"vms_killed\":%llu%s}", (long long)ts.tv_sec *
	    1000 + ts.tv_nsec / 1000000, n,
	    (unsigned long long)(k->ncrash - m->sent_restarts),
	    (unsigned long long)(m->killed - m->sent_killed), buf);
	for (size_t i = 0; i < n; i++) {
		counters_delta(&d, &v[i].c, &k->slot[v[i].slot].reported);
		counters_json(buf, sizeof(buf), &d);
		mput(m, ",\"vm_%d\":{\"vmm_pid\":%d%s}", (int)v[i].pid, (int)v[i].pid,
		    buf);
	}
	mput(m, "}\n");
}

/* The counters of every VM held, and their total with those ended; the
 * number of VMs, or -ENOMEM. */
static ssize_t
metrics_gather(struct keeper *k, struct vm_figures **out, struct counters *total)
{
	struct vm_figures *v = calloc(k->nslot + 1, sizeof(*v));
	struct vm_state *st;
	size_t n = 0;

	if (v == NULL)
		return -ENOMEM;
	*total = k->m.retired;
	for (size_t i = 0; i < k->nslot; i++) {
		if (k->slot[i].state != SLOT_HELD ||
		    state_map(k->slot[i].vm.statefd, &st) < 0)
			continue;
		v[n].slot = i;
		v[n].pid = k->slot[i].vm.pid;
		counters_read(&st->n, &v[n].c);
		munmap(st, st->bytes);
		counters_add(total, &v[n++].c);
	}
	*out = v;
	return (ssize_t)n;
}

static int
write_all(int fd, const char *buf, size_t len)
{
	ssize_t n;

	for (; len > 0; buf += n, len -= (size_t)n)
		if ((n = write(fd, buf, len)) < 0 && errno != EINTR)
			return -errno;
		else if (n < 0)
			n = 0;
	return 0;
}

/* The text into PATH.tmp, which then trades places with PATH. */
static int
prom_publish(struct metrics *m)
{
	int fd = m->fd[1], rc;

	m->op = "ftruncate";
	if (ftruncate(fd, 0) < 0 || lseek(fd, 0, SEEK_SET) < 0)
		return -errno;
	m->op = "write";
	if ((rc = write_all(fd, m->buf, m->len)) < 0)
		return rc;
	m->op = "renameat2(RENAME_EXCHANGE)";
	if (syscall(SYS_renameat2, m->dirfd, m->tmp, m->dirfd, m->name,
	    RENAME_EXCHANGE) < 0)
		return -errno;
	m->fd[1] = m->fd[0];
	m->fd[0] = fd;
	return 0;
}

/*
 * One line a write. A FIFO with less room than a line (over PIPE_BUF, at
 * a dozen VMs) takes part of it; the rest goes before anything else, so
 * its reader never sees half a line followed by another. The line counts
 * as written once begun: its figures are the base of the next.
 */
static int
json_publish(struct metrics *m)
{
	ssize_t n = write(m->fd[0], m->buf, m->len);

	m->op = "write";
	if (n < 0)
		return -errno;
	m->off = (size_t)n < m->len ? (size_t)n : 0;
	return 0;
}

/* The rest of a line begun: 0 once it is all out. */
static int
json_rest(struct metrics *m)
{
	ssize_t n = write(m->fd[0], m->buf + m->off, m->len - m->off);

	m->op = "write (the rest of a line)";
	if (n < 0)
		return -errno;
	m->off += (size_t)n;
	if (m->off < m->len)
		return -EAGAIN;
	m->off = 0;
	return 0;
}

static void
metrics_outcome(struct metrics *m, int rc)
{
	if (rc < 0 && !m->failing)
		logmsg(LOG_WARN, "--metrics %s: %s: %s%s; serving goes on, and this "
		    "is said once until a write succeeds", opt.metrics_path, m->op,
		    strerror(-rc), rc == -EAGAIN ? " (its reader takes nothing)" : "");
	else if (rc == 0 && m->failing)
		logmsg(LOG_INFO, "--metrics %s: written again", opt.metrics_path);
	m->failing = rc < 0;
}

/* JSON counts what was added since the last line written: that line's
 * figures become the base only once it is out. */
static void
metrics_sent(struct keeper *k, const struct counters *total,
    const struct vm_figures *v, size_t n)
{
	k->m.sent = *total;
	k->m.sent_killed = k->m.killed;
	k->m.sent_restarts = k->ncrash;
	for (size_t i = 0; i < n; i++)
		k->slot[v[i].slot].reported = v[i].c;
}

static void
metrics_write(struct keeper *k)
{
	struct metrics *m = &k->m;
	struct vm_figures *v;
	struct counters total;
	ssize_t n;
	int rc;

	if (m->fd[0] < 0)
		return;
	if (m->off > 0 && (rc = json_rest(m)) < 0) {
		metrics_outcome(m, rc);
		return;
	}
	m->len = 0;
	m->op = "gathering the counters";
	if ((n = metrics_gather(k, &v, &total)) < 0) {
		metrics_outcome(m, (int)n);
		return;
	}
	m->nomem = 0;
	if (m->prom)
		prom_text(m, &total, v, (size_t)n, k->ncrash);
	else
		json_line(m, &total, v, k, (size_t)n);
	m->op = "writing the text";
	rc = m->nomem ? -ENOMEM : m->prom ? prom_publish(m) : json_publish(m);
	if (rc == 0 && !m->prom)
		metrics_sent(k, &total, v, (size_t)n);
	metrics_outcome(m, rc);
	free(v);
}

static void
metrics_due(struct keeper *k, int64_t now)
{
	if (k->m.fd[0] < 0 || now < k->m.next)
		return;
	metrics_write(k);
	k->m.next = now + (int64_t)opt.metrics_interval * 1000;
}

/* A VM's session ends: its counters go into the handler's totals. */
static void
metrics_retire(struct keeper *k, const struct slot *sl, int code)
{
	struct vm_state *st;

	if (k->m.fd[0] < 0 || sl->state != SLOT_HELD)
		return;
	/* A JSON line first, while the VM is still in it: what it added
	 * since the last is in its own group, not only in the handler's. */
	if (!k->m.prom)
		metrics_write(k);
	k->m.killed += code != EXIT_VM_GONE;
	if (state_map(sl->vm.statefd, &st) < 0)
		return;
	counters_add(&k->m.retired, counters_read(&st->n, &(struct counters){ 0 }));
	munmap(st, st->bytes);
}

/* The last figures, and PATH.tmp removed: only PATH stays. */
static void
metrics_end(struct keeper *k)
{
	metrics_write(k);
	if (k->m.prom && k->m.dirfd >= 0)
		unlinkat(k->m.dirfd, k->m.tmp, 0);
	metrics_close(&k->m);
}

/* The fds an upgrade keeps, in the new image's environment. */
static void
metrics_env(const struct metrics *m, char *buf, size_t cap)
{
	snprintf(buf, cap, "%s=%d,%d,%d", METRICS_ENV, m->fd[0], m->fd[1], m->dirfd);
}

/*
 * The new image of an upgrade takes the fds the one before wrote to. Its
 * totals of the VMs that ended start again (Prometheus reads a counter
 * reset), and its JSON lines count from the figures as they stand, which
 * the image before wrote out before it went.
 */
static void
metrics_take(struct keeper *k)
{
	const char *e = getenv(METRICS_ENV);
	int *fd[3] = { &k->m.fd[0], &k->m.fd[1], &k->m.dirfd };
	char dir[PATH_MAX];
	struct vm_figures *v;
	struct counters total;
	uint64_t x;
	ssize_t n;
	int i;

	k->m.fd[0] = k->m.fd[1] = k->m.dirfd = -1;
	if (opt.metrics_path == NULL)
		return;
	/* fd,fd,dirfd; -1 is written for none. */
	for (i = 0; e != NULL && i < 3; i++, e += *e == ',') {
		if (*e == '-' && e[1] == '1')
			e += 2;
		else if (parse_number(e, 10, INT_MAX, &e, &x) == 0)
			*fd[i] = (int)x;
		else
			break;
	}
	if (i < 3 || (k->m.buf = malloc(k->m.cap = 4096)) == NULL) {
		logmsg(LOG_WARN, "--metrics %s: the image before handed over no "
		    "metrics; none are written until the handler restarts",
		    opt.metrics_path);
		k->m.fd[0] = k->m.fd[1] = k->m.dirfd = -1;
		return;
	}
	metrics_names(&k->m, dir, sizeof(dir));
	if ((n = metrics_gather(k, &v, &total)) >= 0) {
		metrics_sent(k, &total, v, (size_t)n);
		free(v);
	}
}

/* ------------------------------------------------------------------------
 * 12. The keeper's protocol
 *
 * The keeper and its server talk over a SOCK_SEQPACKET socketpair: one
 * struct ctl a message, descriptors as SCM_RIGHTS. A request has one name
 * on both sides, ask_X where it is sent and answer_X where it is taken (as
 * OpenSSH's privilege separation names mm_X and mm_answer_X). What the
 * keeper takes from a server depends on where that server is in its life:
 * permitted[] says what; anything else ends that server as a crash would.
 * ------------------------------------------------------------------------ */

#define BIT(t)		(1u << (t))

/* What a server may ask, by where it is in its life. */
static const uint32_t permitted[] = {
	[LIFE_NONE] = 0,
	[LIFE_STARTING] = BIT(S_READY) | BIT(S_VMM) | BIT(S_HOLD) | BIT(S_CLOSE) |
	    BIT(S_UNLISTEN) | BIT(S_DONE),
	[LIFE_READY] = BIT(S_VMM) | BIT(S_HOLD) | BIT(S_CLOSE) | BIT(S_UNLISTEN) |
	    BIT(S_DONE),
	[LIFE_STOPPING] = BIT(S_READY) | BIT(S_VMM) | BIT(S_HOLD) |
	    BIT(S_CLOSE) | BIT(S_UNLISTEN) | BIT(S_DONE),
};

/* One message; -EAGAIN when the socket's buffer is full (the keeper's
 * end is non-blocking: a slow server never holds it up). */
static int
ctl_send(int fd, uint32_t type, uint32_t slot, uint32_t gen, int32_t arg,
    int32_t pid, const int *fds, int nfds)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * CTL_FDS)];
		struct cmsghdr align;
	} cm;
	struct ctl m = { type, slot, gen, arg, pid };
	struct iovec iov = { &m, sizeof(m) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *c;

	if (nfds > 0) {
		mh.msg_control = cm.b;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		c = CMSG_FIRSTHDR(&mh);
		*c = (struct cmsghdr){ .cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds),
		    .cmsg_level = SOL_SOCKET, .cmsg_type = SCM_RIGHTS };
		memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
	}
	while (sendmsg(fd, &mh, MSG_NOSIGNAL) < 0)
		if (errno != EINTR)
			return -errno;
	return 0;
}

/*
 * One message, without waiting: 1, 0 at EOF (the other side is gone),
 * -EAGAIN when none is there. fds gets what came with it (-1 for none);
 * -EMFILE when the kernel could not install them all.
 */
static int
ctl_recv(int fd, struct ctl *m, int fds[CTL_FDS])
{
	union {
		char b[CMSG_SPACE(sizeof(int) * CTL_FDS)];
		struct cmsghdr align;
	} cm;
	struct iovec iov = { m, sizeof(*m) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
	    .msg_control = cm.b, .msg_controllen = sizeof(cm.b) };
	ssize_t n;
	int got = 0;

	fds[0] = fds[1] = -1;
	do
		n = recvmsg(fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	/* A seqpacket peer that exited with messages unread reads as reset. */
	if (n == 0 || (n < 0 && errno == ECONNRESET))
		return 0;
	if (n < 0)
		return -errno;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			got = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			memcpy(fds, CMSG_DATA(c), sizeof(int) * (size_t)(got < CTL_FDS ?
			    got : CTL_FDS));
		}
	if (n != (ssize_t)sizeof(*m) || m->type == 0 || m->type >= CTL_TYPES) {
		closefd(&fds[0]);
		closefd(&fds[1]);
		return -EPROTO;
	}
	if (mh.msg_flags & MSG_CTRUNC) {
		closefd(&fds[0]);
		closefd(&fds[1]);
		return -EMFILE;
	}
	return 1;
}

/* The keeper's side: what it tells its server. */

static int
ask_conn(struct keeper *k, size_t i)
{
	struct slot *sl = &k->slot[i];
	int fds[2] = { sl->vm.conn, sl->vm.pidfd };

	return ctl_send(k->ctl, K_CONN, (uint32_t)i, sl->gen, 0, sl->vm.pid, fds,
	    sl->vm.pidfd >= 0 ? 2 : 1);
}

static int
ask_drop(struct keeper *k, size_t i)
{
	return ctl_send(k->ctl, K_DROP, (uint32_t)i, k->slot[i].gen, 0, 0, NULL, 0);
}

static int
ask_held(struct keeper *k, size_t i)
{
	return ctl_send(k->ctl, (uint32_t)k->slot[i].answer, (uint32_t)i,
	    k->slot[i].gen, 0, 0, NULL, 0);
}

static int
ask_unlistened(struct keeper *k)
{
	return ctl_send(k->ctl, K_UNLISTENED, 0, 0, 0, 0, NULL, 0);
}

static int
ask_stop(struct keeper *k, int code)
{
	return ctl_send(k->ctl, K_STOP, 0, 0, code, 0, NULL, 0);
}

static int
ask_usr1(struct keeper *k)
{
	return ctl_send(k->ctl, K_USR1, 0, 0, 0, 0, NULL, 0);
}

/* The keeper's answers to its server. */

static void
answer_ready(struct keeper *k)
{
	/* A server told to stop while it was starting says ready all the
	 * same, on its way to the stop. */
	if (k->life == LIFE_STARTING)
		k->life = LIFE_READY;
	k->ready_once = 1;
}

static void
answer_vmm(struct keeper *k, struct slot *sl)
{
	if (!sl->vmm)
		k->vmms++;
	sl->vmm = 1;
}

/*
 * The uffd and the state are the keeper's from here: a server that dies
 * now leaves them to the next. The server takes the handshake off the
 * socket only once told so (K_HELD). Without the descriptors (the keeper
 * had none free for them), the server is told to refuse the VMM.
 */
static void
answer_hold(struct keeper *k, struct slot *sl, int fds[CTL_FDS])
{
	if (fds[0] < 0 || fds[1] < 0) {
		logmsg(LOG_ERROR, "VMM pid %d: %s", (int)sl->vm.pid, no_fds);
		sl->answer = K_UNHELD;
	} else {
		closefd(&sl->vm.uffd);
		closefd(&sl->vm.statefd);
		sl->vm.uffd = fds[0];
		sl->vm.statefd = fds[1];
		fds[0] = fds[1] = -1;
		sl->state = SLOT_HELD;
		sl->answer = K_HELD;
	}
	keeper_flush(k);
}

/* -1: the server could not take the connection in (no descriptor for
 * it): the keeper turns it away, killing it if it was a VMM. */
static void
answer_close(struct keeper *k, struct slot *sl, int code)
{
	if (code < 0) {
		code = turn_away(sl->vm.conn, sl->vm.pidfd, sl->vm.pid, no_fds) ?
		    EXIT_FATAL : EXIT_VM_GONE;
		sl->vm.conn = sl->vm.pidfd = -1;
	}
	note_worst(&k->worst, code);
	metrics_retire(k, sl, code);
	slot_free(sl);
}

static void
answer_unlisten(struct keeper *k)
{
	keeper_unlisten(k);
}

static void
answer_done(struct keeper *k, int code)
{
	k->done = code;
}

/* Takes one message from the server; -EPROTO for one its life does not
 * permit, or about a slot it does not have. */
static int
keeper_answer(struct keeper *k, const struct ctl *m, int fds[CTL_FDS])
{
	struct slot *sl = m->slot < k->nslot ? &k->slot[m->slot] : NULL;

	if (!(permitted[k->life] & BIT(m->type)))
		return -EPROTO;
	if ((m->type == S_VMM || m->type == S_HOLD || m->type == S_CLOSE) &&
	    sl == NULL)
		return -EPROTO;
	/* About a connection the keeper dropped for room (K_DROP): gone. */
	if ((m->type == S_VMM || m->type == S_HOLD || m->type == S_CLOSE) &&
	    (sl->state == SLOT_FREE || sl->gen != m->gen))
		return 0;
	switch (m->type) {
	case S_READY:
		answer_ready(k);
		break;
	case S_VMM:
		answer_vmm(k, sl);
		break;
	case S_HOLD:
		answer_hold(k, sl, fds);
		break;
	case S_CLOSE:
		answer_close(k, sl, m->arg);
		break;
	case S_UNLISTEN:
		answer_unlisten(k);
		break;
	case S_DONE:
		answer_done(k, m->arg);
		break;
	}
	return 0;
}

/* The server's side: what it tells the keeper. Its end blocks: the
 * keeper reads at once, and a message must not be lost. */

static void
ask_ready(struct server *srv)
{
	ctl_send(srv->ctl, S_READY, 0, 0, 0, 0, NULL, 0);
}

static void
ask_vmm(struct server *srv, struct session *s)
{
	ctl_send(srv->ctl, S_VMM, (uint32_t)s->slot, s->gen, 0, 0, NULL, 0);
}

static int
ask_hold(struct server *srv, struct session *s)
{
	int fds[2] = { s->vm.uffd, s->vm.statefd };

	return ctl_send(srv->ctl, S_HOLD, (uint32_t)s->slot, s->gen, 0, 0, fds, 2);
}

static void
ask_close(struct server *srv, int slot, uint32_t gen, int code)
{
	ctl_send(srv->ctl, S_CLOSE, (uint32_t)slot, gen, code, 0, NULL, 0);
}

static void
ask_unlisten(struct server *srv)
{
	ctl_send(srv->ctl, S_UNLISTEN, 0, 0, 0, 0, NULL, 0);
}

static void
ask_done(struct server *srv, int code)
{
	ctl_send(srv->ctl, S_DONE, 0, 0, code, 0, NULL, 0);
}

/* The server's answers to the keeper. */

static void
answer_conn(struct server *srv, const struct ctl *m, int fds[CTL_FDS],
    int64_t now)
{
	add_peer(srv, m, fds[0], fds[1], now);
	fds[0] = fds[1] = -1;
}

static struct session *
session_of(struct server *srv, const struct ctl *m)
{
	for (size_t i = 0; i < srv->n; i++)
		if (srv->s[i]->slot == (int)m->slot && srv->s[i]->gen == m->gen &&
		    srv->s[i]->state != S_ENDED)
			return srv->s[i];
	return NULL;
}

/* The keeper holds the uffd and the state: the handshake can go, and the
 * state's memfd (it stays mapped). */
static void
answer_held(struct server *srv, const struct ctl *m)
{
	struct session *s = session_of(srv, m);

	if (s == NULL)
		return;
	closefd(&s->vm.statefd);
	consume_handshake(s);
}

/* The keeper could not hold them: the VMM cannot outlive this server. */
static void
answer_unheld(struct server *srv, const struct ctl *m)
{
	struct session *s = session_of(srv, m);

	if (s == NULL)
		return;
	logmsg(LOG_ERROR, "refused VMM pid %d: the keeper had no descriptor "
	    "free to hold its uffd", (int)s->vm.pid);
	fail_closed(srv, s, EXIT_FATAL);
}

/* The keeper closed a connection that had sent nothing, for room: the
 * session goes without a word back (the slot is the keeper's again). */
static void
answer_drop(struct server *srv, const struct ctl *m)
{
	struct session *s = session_of(srv, m);

	if (s == NULL)
		return;
	s->slot = -1;
	session_end(srv, s, EXIT_VM_GONE);
}

static void
answer_unlistened(struct server *srv)
{
	srv->listening = 0;
}

static void
answer_stop(struct server *srv, int code)
{
	srv->stop = code;
}

static void
answer_usr1(struct server *srv)
{
	for (size_t i = 0; i < srv->n; i++)
		if (srv->s[i]->state == S_SERVING)
			print_counters(srv->s[i], -1);
}

/* What the keeper said since the last round; -EPIPE once it is gone. */
static int
server_answer(struct server *srv, int64_t now)
{
	struct ctl m;
	int fds[CTL_FDS], rc;

	while ((rc = ctl_recv(srv->ctl, &m, fds)) != -EAGAIN) {
		if (rc == 0)
			return -EPIPE;
		if (rc == -EMFILE && m.type == K_CONN) {
			/* The connection could not be taken in: the keeper
			 * turns it away, as it would at its own EMFILE. */
			closefd(&fds[0]);
			closefd(&fds[1]);
			ask_close(srv, (int)m.slot, m.gen, -1);
			continue;
		}
		if (rc < 0)
			return rc;
		switch (m.type) {
		case K_CONN:
			answer_conn(srv, &m, fds, now);
			break;
		case K_DROP:
			answer_drop(srv, &m);
			break;
		case K_HELD:
			answer_held(srv, &m);
			break;
		case K_UNHELD:
			answer_unheld(srv, &m);
			break;
		case K_UNLISTENED:
			answer_unlistened(srv);
			break;
		case K_STOP:
			answer_stop(srv, m.arg);
			break;
		case K_USR1:
			answer_usr1(srv);
			break;
		}
		closefd(&fds[0]);
		closefd(&fds[1]);
	}
	return 0;
}

/* ------------------------------------------------------------------------
 * 13. The server loop
 *
 * The server's one epoll loop takes the connections the keeper hands it,
 * reads handshakes, watches pidfds and ends sessions; the serving threads
 * serve the uffds. A round waits once, notes what is ready on each
 * session, then steps only the sessions with something to do (an event, a
 * deferred fault, population) or a deadline passed: what one round costs
 * in syscalls does not grow with the number of sessions.
 *
 * A connection becomes a VMM when it sends its first byte (an fd comes
 * with one). Only a VMM is ever killed: a peer that sent nothing (a probe,
 * a second handler checking whether the socket is live) has registered no
 * memory with anyone, so it is closed and the handler goes on listening.
 * ------------------------------------------------------------------------ */

static int
watch(struct server *srv, int fd, struct watch *w)
{
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = w };

	if (epoll_ctl(srv->epfd, EPOLL_CTL_ADD, fd, &e) < 0) {
		logmsg(LOG_ERROR, "epoll_ctl(ADD, fd %d): %s", fd, strerror(errno));
		return -errno;
	}
	return 0;
}

/* epoll watches files, not fds, and the uffd's file outlives this fd
 * (Firecracker holds it): left in the set, a closed uffd would go on
 * reporting events for a freed session. */
static void
unwatch(struct server *srv, int fd)
{
	if (fd >= 0)
		epoll_ctl(srv->epfd, EPOLL_CTL_DEL, fd, NULL);
}

/*
 * Threads (--threads 2 or more). Each serving thread waits on the set of
 * serving uffds, reads the events of one that is ready into its own lane
 * and serves the faults it read; population has a thread of its own. The
 * loop keeps the rest: handshakes, pidfds, signals, ending sessions, which
 * a thread asks for through notefd (session_outcome).
 *
 * A session ends only with no thread inside it (users, open). Its uffd
 * leaves the set first, but a thread may hold an event for it already, so
 * the struct itself is freed only once every thread has been back to its
 * wait since (epoch, odd while waiting): until then it lies in a grave.
 */
static int
session_enter(struct session *s)
{
	__atomic_fetch_add(&s->users, 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&s->open, __ATOMIC_SEQ_CST))
		return 1;
	__atomic_fetch_sub(&s->users, 1, __ATOMIC_SEQ_CST);
	return 0;
}

static void
session_leave(struct session *s)
{
	__atomic_fetch_sub(&s->users, 1, __ATOMIC_SEQ_CST);
}

/* The first ending a thread finds for a session (1 gone, < 0 fatal),
 * for the loop to act on. */
static void
session_outcome(struct server *srv, struct session *s, int rc)
{
	uint64_t one = 1;
	int none = 0;

	if (__atomic_compare_exchange_n(&s->outcome, &none, rc < 0 ? rc : 1, 0,
	    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
		(void)!write(srv->w.notefd, &one, sizeof(one));
}

static void
pause_us(long us)
{
	struct timespec ts = { 0, us * 1000 };

	nanosleep(&ts, NULL);
}

/*
 * The events read, then the faults deferred by EAGAIN, until none is left:
 * the REMOVE that caused it is read on the next round, and its madvise
 * caller resumes within microseconds.
 */
static void
serve_turn(struct server *srv, struct session *s, int id, uint32_t events)
{
	struct lane *l;
	int rc;

	if (!session_enter(s))
		return;
	l = &s->lanes[id];
	l->armed = 0;
	count(&s->n->syscalls, 1);		/* the epoll_wait */
	while ((rc = serve_round(l, events)) == 0 && l->nfaults > 0 &&
	    __atomic_load_n(&s->open, __ATOMIC_SEQ_CST)) {
		events = EPOLLIN;
		pause_us(DEFER_US);
		count(&s->n->syscalls, 1);
	}
	if (rc != 0)
		session_outcome(srv, s, rc);
	else
		rearm(l);
	session_leave(s);
}

static void *
serving_thread(void *arg)
{
	struct thread *t = arg;
	struct epoll_event e;
	int n;

	for (;;) {
		__atomic_fetch_add(&t->epoch, 1, __ATOMIC_SEQ_CST);
		n = epoll_wait(t->srv->w.wepfd, &e, 1, -1);
		__atomic_fetch_add(&t->epoch, 1, __ATOMIC_SEQ_CST);
		if (__atomic_load_n(&t->srv->w.stop, __ATOMIC_SEQ_CST))
			return NULL;
		if (n == 1 && e.data.ptr != NULL)
			serve_turn(t->srv, e.data.ptr, t->id, e.events);
	}
}

static void
popq_remove(struct server *srv, struct session *s)
{
	pthread_mutex_lock(&srv->w.popmu);
	for (size_t i = 0; i < srv->w.npop; i++)
		if (srv->w.popq[i] == s)
			srv->w.popq[i--] = srv->w.popq[--srv->w.npop];
	pthread_mutex_unlock(&srv->w.popmu);
}

static int
popq_add(struct server *srv, struct session *s)
{
	struct session **q;
	int rc = 0;

	pthread_mutex_lock(&srv->w.popmu);
	if ((q = grow_array(srv->w.popq, &srv->w.popcap, srv->w.npop, sizeof(*q), 16)) == NULL)
		rc = -ENOMEM;
	else
		srv->w.popq = q;
	if (rc == 0) {
		srv->w.popq[srv->w.npop++] = s;
		pthread_cond_broadcast(&srv->w.popcv);
	}
	pthread_mutex_unlock(&srv->w.popmu);
	return rc;
}

/* Whether lane l has nothing left to populate: no step of its own, and
 * every step claimed. Claims only ever run out, so that lasts. */
static int
steps_exhausted(const struct lane *l)
{
	return l->step == UINT64_MAX &&
	    __atomic_load_n(&l->s->step_next, __ATOMIC_SEQ_CST) >= l->s->vm.st->steps;
}

/* Whether population thread id has nothing left in any queued session
 * (under popmu): every step claimed, none held. Claims only run out, so
 * only a new session brings it work. */
static int
nothing_to_claim(const struct server *srv, int id)
{
	for (size_t i = 0; i < srv->w.npop; i++)
		if (!steps_exhausted(&srv->w.popq[i]->lanes[id]))
			return 0;
	return 1;
}

/*
 * Population: a step of each populating session in turn. Its copies go
 * on beside the faults', which never wait behind more than one step. A
 * thread with nothing left to claim in any session sleeps until a session
 * comes, rather than spin while others finish their last steps.
 */
static void *
population_thread(void *arg)
{
	struct thread *t = arg;
	struct server *srv = t->srv;
	struct session *s;
	size_t next = 0;
	int rc;

	for (;;) {
		pthread_mutex_lock(&srv->w.popmu);
		while ((srv->w.npop == 0 || nothing_to_claim(srv, t->id)) &&
		    !__atomic_load_n(&srv->w.stop, __ATOMIC_SEQ_CST))
			pthread_cond_wait(&srv->w.popcv, &srv->w.popmu);
		if (__atomic_load_n(&srv->w.stop, __ATOMIC_SEQ_CST)) {
			pthread_mutex_unlock(&srv->w.popmu);
			return NULL;
		}
		s = srv->w.popq[next++ % srv->w.npop];
		rc = session_enter(s);
		pthread_mutex_unlock(&srv->w.popmu);
		if (!rc)
			continue;
		rc = serve_round(&s->lanes[t->id], 0);
		if (rc != 0)
			session_outcome(srv, s, rc);
		if (rc != 0 || !population_on(s))
			popq_remove(srv, s);
		session_leave(s);
	}
}

/* Before a session's fds and memory go: no thread inside, none to come. */
static void
quiesce(struct server *srv, struct session *s)
{
	popq_remove(srv, s);
	__atomic_store_n(&s->open, 0, __ATOMIC_SEQ_CST);
	epoll_ctl(srv->w.wepfd, EPOLL_CTL_DEL, s->vm.uffd, NULL);
	while (__atomic_load_n(&s->users, __ATOMIC_SEQ_CST) > 0)
		pause_us(DEFER_US);
}

/* Hands a session that starts serving to the threads. */
static int
publish(struct server *srv, struct session *s)
{
	struct epoll_event e = { .events = EPOLLIN | EPOLLONESHOT, .data.ptr = s };

	s->threaded = 1;
	s->wepfd = srv->w.wepfd;
	__atomic_store_n(&s->open, 1, __ATOMIC_SEQ_CST);
	if (epoll_ctl(srv->w.wepfd, EPOLL_CTL_ADD, s->vm.uffd, &e) < 0) {
		logmsg(LOG_ERROR, "epoll_ctl(ADD, uffd %d): %s", s->vm.uffd,
		    strerror(errno));
		return -errno;
	}
	return s->populating ? popq_add(srv, s) : 0;
}

static int
grave_ready(const struct server *srv, const struct grave *g)
{
	for (int i = 0; i < srv->w.nthreads; i++) {
		uint64_t e = __atomic_load_n(&srv->w.threads[i].epoch, __ATOMIC_SEQ_CST);

		if (e < g->epoch[i] + (g->epoch[i] & 1 ? 2 : 1))
			return 0;
	}
	return 1;
}

/* An ended session of the threads' is freed once none can hold it; kept
 * (a leak, not a use after free) if there is no room to wait. */
static void
bury(struct server *srv, struct session *s)
{
	struct grave *g;

	if ((g = grow_array(srv->w.graves, &srv->w.gravecap, srv->w.ngraves, sizeof(*g),
	    16)) == NULL)
		return;
	srv->w.graves = g;
	g = &srv->w.graves[srv->w.ngraves++];
	g->s = s;
	for (int i = 0; i < srv->w.nthreads; i++)
		g->epoch[i] = __atomic_load_n(&srv->w.threads[i].epoch, __ATOMIC_SEQ_CST);
}

static void
sweep_graves(struct server *srv, int all)
{
	size_t kept = 0;

	for (size_t i = 0; i < srv->w.ngraves; i++)
		if (all || grave_ready(srv, &srv->w.graves[i]))
			session_destroy(srv->w.graves[i].s);
		else
			srv->w.graves[kept++] = srv->w.graves[i];
	srv->w.ngraves = kept;
}

static int
start_thread(pthread_t *tid, void *(*fn)(void *), void *arg)
{
	pthread_attr_t a;
	int rc;

	pthread_attr_init(&a);
	pthread_attr_setstacksize(&a, THREAD_STACK);
	rc = pthread_create(tid, &a, fn, arg);
	pthread_attr_destroy(&a);
	if (rc != 0)
		logmsg(LOG_ERROR, "pthread_create: %s", strerror(rc));
	return -rc;
}

/* opt.threads threads into t, counted in *n as they start; their lanes
 * are first, first + 1, ... */
static int
start_group(struct server *srv, struct thread *t, int *n, int first,
    void *(*fn)(void *))
{
	for (int i = 0; i < opt.threads; i++) {
		t[i] = (struct thread){ srv, first + i, 0, 0 };
		if (start_thread(&t[i].tid, fn, &t[i]) < 0)
			return -1;
		(*n)++;
	}
	return 0;
}

/* Under the first seccomp filter, which they inherit, and with every
 * signal blocked, as the signalfd needs. */
static int
threads_start(struct server *srv)
{
	struct epoll_event e = { .events = EPOLLIN, .data.ptr = NULL };

	if (opt.threads < 2)
		return 0;
	srv->wn = (struct watch){ NULL, W_NOTE };
	if ((srv->w.wepfd = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
	    (srv->w.stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0 ||
	    (srv->w.notefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0 ||
	    epoll_ctl(srv->w.wepfd, EPOLL_CTL_ADD, srv->w.stopfd, &e) < 0 ||
	    watch(srv, srv->w.notefd, &srv->wn) < 0 ||
	    (srv->w.threads = calloc((size_t)opt.threads, sizeof(*srv->w.threads))) == NULL) {
		logmsg(LOG_ERROR, "setting up the serving threads: %s", strerror(errno));
		return -1;
	}
	if (start_group(srv, srv->w.threads, &srv->w.nthreads, 0, serving_thread) < 0)
		return -1;
	if (!opt.populate_all && !opt.populate_path)
		return 0;
	if ((srv->w.pops = calloc((size_t)opt.threads, sizeof(*srv->w.pops))) == NULL) {
		logmsg(LOG_ERROR, "setting up the population threads: %s",
		    strerror(ENOMEM));
		return -1;
	}
	return start_group(srv, srv->w.pops, &srv->w.npops, opt.threads,
	    population_thread);
}

/* Safe to call twice, and with the threads half started. */
static void
threads_stop(struct server *srv)
{
	uint64_t one = 1;

	pthread_mutex_lock(&srv->w.popmu);
	__atomic_store_n(&srv->w.stop, 1, __ATOMIC_SEQ_CST);
	pthread_cond_broadcast(&srv->w.popcv);
	pthread_mutex_unlock(&srv->w.popmu);
	if (srv->w.stopfd >= 0)
		(void)!write(srv->w.stopfd, &one, sizeof(one));
	for (int i = 0; i < srv->w.nthreads; i++)
		pthread_join(srv->w.threads[i].tid, NULL);
	for (int i = 0; i < srv->w.npops; i++)
		pthread_join(srv->w.pops[i].tid, NULL);
	srv->w.nthreads = srv->w.npops = 0;
	sweep_graves(srv, 1);
	free(srv->w.graves);
	free(srv->w.threads);
	free(srv->w.pops);
	free(srv->w.popq);
	srv->w.graves = NULL;
	srv->w.threads = NULL;
	srv->w.pops = NULL;
	srv->w.popq = NULL;
	closefd(&srv->w.wepfd);
	closefd(&srv->w.stopfd);
	closefd(&srv->w.notefd);
}

/* The keeper's messages, taken while a record waits (see struct heard). */
static int
heard_from_keeper(void *arg)
{
	struct server *srv = arg;

	if (server_answer(srv, now_ms()) < 0) {
		keeper_gone(srv);
		return -1;
	}
	return srv->stop != 0;
}

/* A VMM's session ends with its record, its counter line and its code; a
 * peer that sent nothing just goes. The keeper lets go of the slot. Freed
 * at the end of the round. A message taken while the record is written may
 * end it again: it ends once. */
static void
session_end(struct server *srv, struct session *s, int code)
{
	struct heard h = { srv->ctl, heard_from_keeper, srv };

	if (s->state == S_ENDED || s->ending)
		return;
	s->ending = 1;
	if (s->threaded)
		quiesce(srv, s);
	unwatch(srv, s->vm.conn);
	unwatch(srv, s->vm.uffd);
	unwatch(srv, s->vm.pidfd);
	if (s->state != S_HELLO) {
		write_record(s, &h);
		print_counters(s, code);
		note_worst(&srv->worst, code);
		srv->live--;
	}
	session_teardown(s);
	s->state = S_ENDED;
	if (s->slot >= 0)
		ask_close(srv, s->slot, s->gen, s->vmm ? code : EXIT_VM_GONE);
}

static void
fail_closed(struct server *srv, struct session *s, int code)
{
	kill_peer(s->vm.pidfd, s->vm.pid);
	session_end(srv, s, code);
}

/*
 * Whether a connection being given up has sent anything. After shutdown
 * any send of the peer's fails (EPIPE), so what is queued then is all it
 * will have sent: a byte means a VMM that registered its memory and
 * believes it handed it over, to be killed; nothing, a peer that is no VMM
 * in restore, whose send is yet to fail. The peek looks from the start of
 * the queue, wherever a server's reading of it had come to.
 */
static int
sent_anything(int conn)
{
	char c;
	struct iovec iov = { &c, 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	int off = -1;

	shutdown(conn, SHUT_RDWR);
	setsockopt(conn, SOL_SOCKET, SO_PEEK_OFF, &off, sizeof(off));
	return recvmsg(conn, &mh, MSG_PEEK | MSG_DONTWAIT) > 0;
}

static const char after_last[] = "it came after the last VMM this handler "
    "takes, or as it stopped";

/* Closes a connection that has sent nothing so far, unless a byte came
 * since the last read: then it is a VMM, and killed. */
static void
drop_peer(struct server *srv, struct session *s, const char *why)
{
	if (sent_anything(s->vm.conn)) {
		if (s->fresh)
			logmsg(LOG_ERROR, "refused VMM pid %d: %s", (int)s->vm.pid,
			    after_last);
		else
			logmsg(LOG_ERROR, "refused VMM pid %d: its handshake came as "
			    "it was closed (it %s)", (int)s->vm.pid, why);
		s->state = S_HANDSHAKE;
		s->vmm = 1;
		srv->live++;
		fail_closed(srv, s, EXIT_HANDSHAKE);
		return;
	}
	logmsg(LOG_INFO, "peer pid %d %s: closed; it sent nothing, so it is no "
	    "VMM in restore and is not killed", (int)s->vm.pid, why);
	session_end(srv, s, EXIT_VM_GONE);
}

/*
 * A connection that cannot be taken: killed if it was a VMM (see
 * sent_anything), closed otherwise; the descriptors given are closed.
 * Returns 1 when it was a VMM.
 */
static int
turn_away(int conn, int pidfd, pid_t pid, const char *why)
{
	int vmm = sent_anything(conn);

	if (pidfd < 0 && pid == 0)
		peer_of(conn, &pid, &pidfd);
	if (vmm) {
		logmsg(LOG_ERROR, "refused VMM pid %d: %s", (int)pid, why);
		kill_peer(pidfd, pid);
	} else {
		logmsg(LOG_WARN, "closed a connection from pid %d before it sent "
		    "anything: %s", (int)pid, why);
	}
	closefd(&pidfd);
	close(conn);
	return vmm;
}

/*
 * No more VMMs. The keeper removes the socket file, then hands over the
 * backlog, which is refused here (a VMM waiting there has sent its uffd);
 * the peers that sent nothing go.
 */
static void
stop_listening(struct server *srv, const char *why)
{
	if (srv->unlisten_asked)
		return;
	srv->unlisten_asked = 1;
	ask_unlisten(srv);
	for (size_t i = 0; i < srv->n; i++)
		if (srv->s[i]->state == S_HELLO)
			drop_peer(srv, srv->s[i], why);
}

/* A VMM, in a session or refused; the last --max-vms allows ends the
 * listening: in one-VM mode that is the first. */
static void
count_vmm(struct server *srv)
{
	if (++srv->vmms == opt.max_vms)
		stop_listening(srv, "was still silent when the last VMM came");
}

static void
vmm_arrived(struct server *srv, struct session *s)
{
	s->state = S_HANDSHAKE;
	s->vmm = 1;
	srv->live++;
	ask_vmm(srv, s);
	count_vmm(srv);
}

/* A connection the keeper handed over that cannot be taken: code is the
 * ending if it was a VMM. */
static void
refuse(struct server *srv, const struct ctl *m, int conn, int pidfd, int code,
    const char *why)
{
	int vmm = turn_away(conn, pidfd, (pid_t)m->pid, why);

	if (vmm)
		note_worst(&srv->worst, code);
	ask_close(srv, (int)m->slot, m->gen, vmm ? code : EXIT_VM_GONE);
}

static int
grow(struct server *srv)
{
	struct session **v = grow_array(srv->s, &srv->cap, srv->n, sizeof(*v), 16);

	if (v == NULL)
		return -ENOMEM;
	srv->s = v;
	return 0;
}

/* Past max connections that sent nothing when read, the oldest makes
 * room; 1 when one did. */
static int
evict_silent(struct server *srv, size_t max, const char *why)
{
	size_t silent = 0, oldest = srv->n;

	for (size_t i = 0; i < srv->n; i++) {
		if (srv->s[i]->state != S_HELLO || srv->s[i]->fresh)
			continue;
		if (silent++ == 0)
			oldest = i;
	}
	if (silent <= max)
		return 0;
	drop_peer(srv, srv->s[oldest], why);
	return 1;
}

/* A session for a connection of the keeper's slot; NULL when it was
 * refused. The handshake is read by peeking (see recv_chunk), from the
 * start of the queue. */
static struct session *
session_for(struct server *srv, const struct ctl *m, int conn, int pidfd,
    int64_t since)
{
	struct session *s;
	pid_t pid = (pid_t)m->pid;
	int off = 0;

	if (grow(srv) < 0 || (s = session_new(conn, &srv->in->chain)) == NULL) {
		refuse(srv, m, conn, pidfd, EXIT_FATAL, "out of memory");
		return NULL;
	}
	s->slot = (int)m->slot;
	s->gen = m->gen;
	s->vm.pidfd = pidfd;
	s->vm.pid = pid;
	s->record_fd = srv->in->record_fd;
	s->pop_list = srv->in->list;
	s->pop_n = srv->in->nlist;
	s->deadline = since + (int64_t)opt.handshake_timeout * 1000;
	setsockopt(conn, SOL_SOCKET, SO_PEEK_OFF, &off, sizeof(off));
	if (watch(srv, conn, &s->w[W_CONN]) < 0 ||
	    (pidfd >= 0 && watch(srv, pidfd, &s->w[W_PIDFD]) < 0)) {
		unwatch(srv, conn);
		s->vm.conn = s->vm.pidfd = -1;
		session_destroy(s);
		refuse(srv, m, conn, pidfd, EXIT_FATAL, "epoll_ctl failed");
		return NULL;
	}
	if (pidfd < 0)
		logmsg(LOG_WARN, "no pidfd for the peer (pid %d): its exit is seen "
		    "only through the uffd", (int)pid);
	if (pid <= 0)
		logmsg(LOG_WARN, "the peer's pid is not visible here (another pid "
		    "namespace?): it cannot be killed on a fatal error");
	srv->s[srv->n++] = s;
	return s;
}

/* A new connection, in its handshake; Firecracker sends at once, so it is
 * read in this very round. */
static void
add_peer(struct server *srv, const struct ctl *m, int conn, int pidfd,
    int64_t now)
{
	struct session *s;

	if (srv->unlisten_asked) {
		refuse(srv, m, conn, pidfd, EXIT_HANDSHAKE, after_last);
		return;
	}
	if ((s = session_for(srv, m, conn, pidfd, now)) == NULL)
		return;
	s->ev[W_CONN] = EPOLLIN;
	s->fresh = 1;
	evict_silent(srv, MAX_SILENT, "made room for newer connections");
}

static void
gone_in_handshake(struct server *srv, struct session *s)
{
	logmsg(LOG_INFO, "VMM pid %d exited during the handshake (%zu bytes "
	    "received)", (int)s->vm.pid, s->got);
	session_end(srv, s, EXIT_VM_GONE);
}

static void
hung_up_in_handshake(struct server *srv, struct session *s)
{
	logmsg(LOG_ERROR, "handshake rejected: VMM pid %d closed the socket "
	    "after %zu bytes of an incomplete message", (int)s->vm.pid, s->got);
	fail_closed(srv, s, EXIT_HANDSHAKE);
}

/* Whether a handshake failed for what the VMM sent (exit 4), rather than
 * for want of memory, descriptors or anything else of the handler's. */
static int
vmm_at_fault(int rc)
{
	return rc == -EINVAL || rc == -EMSGSIZE || rc == -EBADF ||
	    rc == -ENOTTY || rc == -ETIMEDOUT || rc == -ECONNRESET;
}

/*
 * A handshake that failed. EOF mid-message may be the VMM dying: a dying
 * process closes its files before its pidfd says it exited, so EOF gets
 * CLOSING_MS to be explained by its death before the VMM is killed.
 */
static void
handshake_failed(struct server *srv, struct session *s, int rc, int64_t now)
{
	if (rc == -ECONNRESET && (s->ev[W_PIDFD] || vmm_gone(s))) {
		gone_in_handshake(srv, s);
	} else if (rc == -ECONNRESET && s->vm.pidfd >= 0) {
		unwatch(srv, s->vm.conn);
		s->state = S_CLOSING;
		s->deadline = now + CLOSING_MS;
	} else if (rc == -ECONNRESET) {
		hung_up_in_handshake(srv, s);
	} else {
		fail_closed(srv, s, vmm_at_fault(rc) ? EXIT_HANDSHAKE : EXIT_FATAL);
	}
}

/*
 * Who serves a VM. Unless --threads is given, a VM alone is served by the
 * loop, as with --threads 1: whether a second thread pays for one VM
 * depends on the host. On one 2-CPU host it served random faults from two
 * vCPUs in 0.54x the time; on two others it lost (ws10 1.14x and 1.61x
 * slower, rand2 1.37x, one VM's throughput 0.77x: wake-ups and moves
 * between CPUs cost more than the overlap gains). With two VMs or more
 * served at once the threads paid on each (4 VMs 1.22x the throughput, 16
 * VMs 1.27x; with a CPU-bound neighbour on one core 2.37x and 1.34x), so
 * every VM then goes to the threads, and stays there.
 */
static int
serving_alone(const struct server *srv, const struct session *s)
{
	if (opt.threads_given)
		return 0;
	for (size_t i = 0; i < srv->n; i++)
		if (srv->s[i] != s && srv->s[i]->state == S_SERVING)
			return 0;
	return 1;
}

/* A VM the loop serves goes to the threads once its lane holds no fault
 * and no population step under way: no thread would look there for them. */
static int
to_threads(struct server *srv, struct session *s)
{
	struct lane *l = &s->lanes[0];

	s->to_threads = 1;
	if (l->nfaults > 0 || (l->step != UINT64_MAX && population_on(s)))
		return 0;
	s->to_threads = 0;
	unwatch(srv, s->vm.uffd);
	l->populates = 0;
	return publish(srv, s);
}

static int
start_serving(struct server *srv, struct session *s)
{
	int rc;

	unwatch(srv, s->vm.conn);
	if ((rc = lanes_open(s)) < 0) {
		logmsg(LOG_ERROR, "setting up the session: %s", strerror(-rc));
		return rc;
	}
	s->state = S_SERVING;
	if (opt.threads < 2 || serving_alone(srv, s)) {
		s->lanes[0].populates = 1;
		population_begin(s);
		return watch(srv, s->vm.uffd, &s->w[W_UFFD]);
	}
	population_begin(s);
	for (size_t i = 0; i < srv->n; i++)
		if (srv->s[i]->state == S_SERVING && !srv->s[i]->threaded &&
		    srv->s[i] != s && (rc = to_threads(srv, srv->s[i])) < 0)
			return rc;
	return publish(srv, s);
}

/*
 * The handshake is taken: the uffd and the state go to the keeper, and
 * the VM is served at once. The message is taken off the socket (it was
 * read by peeking) only once the keeper says it holds them (K_HELD), so a
 * server that dies before leaves it for the next to read.
 */
static int
take_handshake(struct server *srv, struct session *s)
{
	int rc;

	if ((rc = ask_hold(srv, s)) < 0) {
		logmsg(LOG_ERROR, "handing the uffd to the keeper: %s", strerror(-rc));
		return rc;
	}
	return start_serving(srv, s);
}

/* The handshake as far as it has arrived, and its deadline. */
static void
handshake_step(struct server *srv, struct session *s, int64_t now)
{
	int n = JSON_PARTIAL;

	if (s->ev[W_CONN])
		n = recv_handshake(s);
	if (s->state == S_HELLO && s->got > 0)
		vmm_arrived(srv, s);
	if (s->state == S_HELLO) {
		if (n == -ENOTCONN || s->ev[W_PIDFD])
			drop_peer(srv, s, "hung up");
		else if (now >= s->deadline)
			drop_peer(srv, s, "was silent past --handshake-timeout");
		return;
	}
	if (n == JSON_PARTIAL && s->ev[W_PIDFD]) {
		gone_in_handshake(srv, s);
		return;
	}
	if (n == JSON_PARTIAL && now < s->deadline)
		return;
	if (n == JSON_PARTIAL) {
		logmsg(LOG_ERROR, "handshake rejected: incomplete after %d s (%zu "
		    "bytes received)", opt.handshake_timeout, s->got);
		n = -ETIMEDOUT;
	}
	if (n >= 0 && (n = accept_handshake(s, n)) == 0) {
		if (take_handshake(srv, s) < 0)
			fail_closed(srv, s, EXIT_FATAL);
		return;
	}
	handshake_failed(srv, s, n, now);
}

static void
closing_step(struct server *srv, struct session *s, int64_t now)
{
	if (s->ev[W_PIDFD])
		gone_in_handshake(srv, s);
	else if (now >= s->deadline)
		hung_up_in_handshake(srv, s);
}

static void
serving_step(struct server *srv, struct session *s)
{
	int rc;

	if (s->ev[W_PIDFD]) {
		logmsg(LOG_INFO, "VMM pid %d exited", (int)s->vm.pid);
		session_end(srv, s, EXIT_VM_GONE);
		return;
	}
	if (s->threaded) {
		rc = __atomic_load_n(&s->outcome, __ATOMIC_SEQ_CST);
		if (rc < 0)
			fail_closed(srv, s, EXIT_FATAL);
		else if (rc > 0)
			session_end(srv, s, EXIT_VM_GONE);
		return;
	}
	if (!s->ev[W_UFFD] && s->lanes[0].nfaults == 0 && !s->populating &&
	    !s->to_threads)
		return;
	count(&s->n->syscalls, 1);		/* the loop's epoll_wait */
	if ((rc = serve_round(&s->lanes[0], s->ev[W_UFFD])) == 0 &&
	    s->to_threads)
		rc = to_threads(srv, s);
	if (rc < 0)
		fail_closed(srv, s, EXIT_FATAL);
	else if (rc > 0)
		session_end(srv, s, EXIT_VM_GONE);
}

static void
step_all(struct server *srv, int64_t now)
{
	for (size_t i = 0; i < srv->n; i++) {
		struct session *s = srv->s[i];

		switch (s->state) {
		case S_HELLO:
		case S_HANDSHAKE:
			handshake_step(srv, s, now);
			break;
		case S_SERVING:
			serving_step(srv, s);
			break;
		case S_CLOSING:
			closing_step(srv, s, now);
			break;
		case S_ENDED:
			break;
		}
		memset(s->ev, 0, sizeof(s->ev));
		s->fresh = 0;
	}
}

/* Ended sessions are freed once nothing of the round can point at them. */
static void
reap_sessions(struct server *srv)
{
	size_t kept = 0;

	for (size_t i = 0; i < srv->n; i++) {
		if (srv->s[i]->state != S_ENDED)
			srv->s[kept++] = srv->s[i];
		else if (srv->s[i]->threaded)
			bury(srv, srv->s[i]);
		else
			session_destroy(srv->s[i]);
	}
	srv->n = kept;
	sweep_graves(srv, 0);
}

/* Kills every VMM, closes every other peer, has the socket removed. */
static void
stop_all(struct server *srv, int code)
{
	stop_listening(srv, "was connected when the handler stopped");
	for (size_t i = 0; i < srv->n; i++)
		if (srv->s[i]->state != S_ENDED)
			fail_closed(srv, srv->s[i], code);
	reap_sessions(srv);
}

/* --accept-timeout: the clock runs while no VMM is connected and the
 * socket is open, from the start and again after the last VM. */
static void
idle_clock(struct server *srv, int64_t now)
{
	if (opt.accept_timeout == 0 || srv->unlisten_asked || srv->live > 0)
		srv->idle_end = INT64_MAX;
	else if (srv->idle_end == INT64_MAX)
		srv->idle_end = now + (int64_t)opt.accept_timeout * 1000;
}

static int
idle_timeout(struct server *srv)
{
	if (srv->vmms == 0)
		logmsg(LOG_ERROR, "no VMM connected within %d s", opt.accept_timeout);
	else
		logmsg(LOG_INFO, "no VMM for %d s: done", opt.accept_timeout);
	stop_listening(srv, "was silent when the handler timed out");
	reap_sessions(srv);
	return srv->vmms == 0 ? EXIT_SETUP : srv->worst;
}

/* The wait, in microseconds (-1: none): none while a session populates,
 * DEFER_US while faults are queued (EAGAIN lasts until the madvise caller
 * has resumed; a page read from storage may be in any moment), else up to
 * the nearest deadline. */
static int64_t
wait_us(const struct server *srv)
{
	int64_t end = srv->idle_end, us = -1;

	for (size_t i = 0; i < srv->n; i++) {
		const struct session *s = srv->s[i];

		if (s->state == S_SERVING && s->threaded)
			continue;
		if (s->state == S_SERVING && s->populating && s->lanes[0].nfaults == 0)
			return 0;
		if (s->state == S_SERVING && s->lanes[0].nfaults > 0)
			us = DEFER_US;
		else if (s->state != S_SERVING && s->deadline < end)
			end = s->deadline;
	}
	if (us >= 0 || end == INT64_MAX)
		return us;
	return (int64_t)ms_until(end) * 1000;
}

/* epoll_wait to the microsecond: epoll_pwait2 (Linux 5.11); before it,
 * to the millisecond, rounded up. */
static int
wait_events(int epfd, struct epoll_event *ev, int n, int64_t us)
{
	static int no_pwait2;
	struct timespec ts = { us / 1000000, us % 1000000 * 1000 };
	int rc;

	if (us > 0 && us < 1000000 && !no_pwait2) {
		/* EPERM: a container's seccomp profile older than the call. */
		rc = (int)syscall(SYS_epoll_pwait2, epfd, ev, n, &ts, NULL, 0);
		if (rc >= 0 || (errno != ENOSYS && errno != EPERM))
			return rc;
		no_pwait2 = 1;
	}
	return epoll_wait(epfd, ev, n, us < 0 ? -1 : (int)((us + 999) / 1000));
}

/*
 * Once no connection can come and every handshake is in, a second filter
 * takes accepting and receiving away (filters stack; the stricter wins).
 */
static void
confine_serving(struct server *srv)
{
	if (!opt.seccomp || srv->tight || srv->listening)
		return;
	for (size_t i = 0; i < srv->n; i++)
		if (srv->s[i]->state == S_HELLO || srv->s[i]->state == S_HANDSHAKE)
			return;
	srv->tight = 1;
	if (seccomp_confine(STAGE_SERVING, -1, -1) < 0)
		logmsg(LOG_WARN, "serving on under the filter for accepting");
}

static void
dispatch(struct server *srv, const struct epoll_event *e)
{
	struct watch *w = e->data.ptr;

	if (w->what == W_CTL)
		srv->ctl_ev = 1;
	else if (w->what == W_NOTE)
		srv->note_ev = 1;
	else
		w->s->ev[w->what] |= e->events;
}

/* The keeper is gone (it never should be): the VMs served go on being
 * served, and the server ends with the last of them. */
static void
keeper_gone(struct server *srv)
{
	logmsg(LOG_ERROR, "the keeper is gone: serving on until the last VM "
	    "ends, taking no connection");
	unwatch(srv, srv->ctl);
	closefd(&srv->ctl);
	srv->listening = 0;
	srv->unlisten_asked = 1;
}

/* Returns the exit code once the last VM is gone, when the keeper says
 * stop, or at the accept timeout. */
static int
run(struct server *srv)
{
	struct epoll_event ev[EPOLL_BATCH];
	int64_t now = now_ms();
	int n;

	for (;;) {
		/* After a round, so that a VMM handed over at the deadline is
		 * taken rather than refused. */
		idle_clock(srv, now);
		if (srv->stop == EXIT_HANDOVER)
			return EXIT_HANDOVER;
		if (srv->stop) {
			stop_all(srv, srv->stop);
			return srv->stop;
		}
		if (!srv->listening && srv->n == 0)
			return srv->worst;
		if (now >= srv->idle_end)
			return idle_timeout(srv);
		confine_serving(srv);
		n = wait_events(srv->epfd, ev, EPOLL_BATCH, wait_us(srv));
		now = now_ms();
		if (n < 0 && errno != EINTR) {
			logmsg(LOG_ERROR, "epoll_wait: %s", strerror(errno));
			stop_all(srv, EXIT_FATAL);
			return EXIT_FATAL;
		}
		for (int i = 0; i < n; i++)
			dispatch(srv, &ev[i]);
		if (srv->ctl_ev && server_answer(srv, now) < 0)
			keeper_gone(srv);
		if (srv->note_ev) {
			uint64_t v;

			(void)!read(srv->w.notefd, &v, sizeof(v));
		}
		srv->ctl_ev = srv->note_ev = 0;
		step_all(srv, now);
		reap_sessions(srv);
	}
}

static int
server_init(struct server *srv)
{
	srv->wc = (struct watch){ NULL, W_CTL };
	if ((srv->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
	    watch(srv, srv->ctl, &srv->wc) < 0) {
		logmsg(LOG_ERROR, "setting up the loop: %s", strerror(errno));
		return -1;
	}
	return 0;
}

/* The server steps aside for an upgrade: its threads joined, every
 * session left as it is (the keeper holds them, their state is in their
 * memfds) and freed, with nothing said or killed. The socket stays open
 * for the next image: no S_UNLISTEN from the teardown. */
static void
server_leave(struct server *srv)
{
	srv->unlisten_asked = 1;
	for (size_t i = 0; i < srv->n; i++)
		if (srv->s[i]->threaded)
			quiesce(srv, srv->s[i]);
	threads_stop(srv);
	for (size_t i = 0; i < srv->n; i++)
		session_destroy(srv->s[i]);
	srv->n = 0;
}

/* Safe to call twice, and on a server half set up. What it inherited from
 * the keeper and did not adopt is closed too. */
static void
server_close(struct server *srv)
{
	struct keeper *k = srv->k;

	stop_all(srv, EXIT_FATAL);
	threads_stop(srv);
	free(srv->s);
	srv->s = NULL;
	srv->cap = 0;
	closefd(&srv->epfd);
	closefd(&srv->ctl);
	chain_close(&k->in.chain);
	closefd(&k->in.record_fd);
	free(k->in.list);
	k->in.list = NULL;
	free(k->slot);
	k->slot = NULL;
	k->nslot = 0;
}

/* What a dead server may have installed without marking it: taken as
 * present (an EEXIST there is no exhausted pool), and, for a fault,
 * recorded. */
static void
settle_marks(struct session *s)
{
	for (int i = 0; i < MAX_LANES; i++) {
		struct install_mark *m = &s->vm.st->marks[i];
		struct region *r = m->len ? find_region(s, m->dst) : NULL;
		uint64_t idx, n;

		if (r != NULL) {
			idx = (m->dst - r->base) / r->page_size;
			n = m->len / r->page_size;
			n = idx + n > r->size / r->page_size ? r->size / r->page_size - idx : n;
			for (uint64_t p = idx; p < idx + n; p++)
				bit_set(r->present, p);
			if (m->fault)
				record_pages(s, r, idx, n);
		}
		m->len = 0;
	}
}

/* Every registered range woken: the faults a dead server read and never
 * served come again as new messages. */
static void
wake_all(struct session *s)
{
	int rc;

	for (size_t i = 0; i < s->nregions; i++)
		if ((rc = uffdio_wake(&s->lanes[0], s->regions[i].base,
		    s->regions[i].size)) < 0)
			log_failure(&s->lanes[0], LOG_WARN, rc);
}

/* Population had finished, with --detach, when the server before died:
 * the regions are let go of here. */
static int
detach_due(const struct session *s)
{
	const struct vm_state *st = s->vm.st;

	return opt.detach && (st->detaching || (st->steps > 0 &&
	    s->steps_left == 0 && !st->pop_failed));
}

/* The detach a server before began, or was about to, done before any
 * thread can enter the session. */
static void
adopt_detach(struct server *srv, struct session *s)
{
	int rc = lanes_open(s);

	if (rc == 0) {
		s->state = S_SERVING;
		rc = detach(&s->lanes[0]);
	}
	if (rc < 0)
		fail_closed(srv, s, EXIT_FATAL);
	else
		session_end(srv, s, EXIT_VM_GONE);
}

/*
 * A session the keeper held when this server was forked, as the server
 * before left its state. If that server died between reading the uffd and
 * recording the REMOVEs it read, nobody can know which pages must read as
 * zero: that VMM, and only it, is killed. Otherwise what the dead server
 * may have installed is settled, the session serves on, and every range is
 * woken.
 */
static void
adopt_held(struct server *srv, size_t i, struct slot *sl)
{
	struct ctl m = { K_CONN, (uint32_t)i, sl->gen, 0, sl->vm.pid };
	struct session *s = session_for(srv, &m, sl->vm.conn, sl->vm.pidfd,
	    sl->since);
	int rc;

	if (s == NULL) {
		closefd(&sl->vm.uffd);
		closefd(&sl->vm.statefd);
		return;
	}
	s->vm.uffd = sl->vm.uffd;
	s->vm.statefd = sl->vm.statefd;
	s->state = S_HANDSHAKE;
	s->vmm = 1;
	srv->live++;
	rc = state_map(s->vm.statefd, &s->vm.st);
	closefd(&s->vm.statefd);	/* the keeper's copy keeps it */
	if (rc < 0) {
		logmsg(LOG_ERROR, "VMM pid %d: its state cannot be read (%s): the "
		    "pages it removed are not known", (int)s->vm.pid, strerror(-rc));
		fail_closed(srv, s, EXIT_FATAL);
		return;
	}
	if (s->vm.st->reading & 1) {
		logmsg(LOG_ERROR, "VMM pid %d: the server before died while reading "
		    "its uffd, so a REMOVE it read may be lost", (int)s->vm.pid);
		fail_closed(srv, s, EXIT_FATAL);
		return;
	}
	if ((rc = state_attach(s)) < 0 || (rc = zeros_map(s)) < 0) {
		logmsg(LOG_ERROR, "adopting VMM pid %d: %s", (int)s->vm.pid,
		    strerror(-rc));
		fail_closed(srv, s, EXIT_FATAL);
		return;
	}
	settle_marks(s);
	consume_handshake(s);
	population_begin(s);
	if (detach_due(s)) {
		adopt_detach(srv, s);
		return;
	}
	if ((rc = start_serving(srv, s)) < 0) {
		fail_closed(srv, s, EXIT_FATAL);
		return;
	}
	wake_all(s);
}
/*
 * A session the keeper held when this server was forked, in its
 * handshake: read again from the start of its queue, which a server
 * before may have peeked at but never took.
 */
static void
adopt_conn(struct server *srv, size_t i, struct slot *sl)
{
	struct ctl m = { K_CONN, (uint32_t)i, sl->gen, 0, sl->vm.pid };
	struct session *s = session_for(srv, &m, sl->vm.conn, sl->vm.pidfd,
	    sl->since);

	if (s == NULL)
		return;
	s->ev[W_CONN] = EPOLLIN;
	if (sl->vmm) {
		s->state = S_HANDSHAKE;
		s->vmm = 1;
		srv->live++;
	}
}

static void
adopt_slots(struct server *srv)
{
	struct keeper *k = srv->k;
	size_t adopted = 0;

	for (size_t i = 0; i < k->nslot; i++) {
		struct slot *sl = &k->slot[i];

		if (sl->state == SLOT_CONN)
			adopt_conn(srv, i, sl);
		else if (sl->state == SLOT_HELD)
			adopt_held(srv, i, sl);
		adopted += sl->state != SLOT_FREE;
		/* Its descriptors are the session's now, or closed. */
		sl->vm = (struct vm){ -1, -1, -1, -1, 0, NULL };
		sl->state = SLOT_FREE;
	}
	if (adopted > 0)
		logmsg(LOG_INFO, "server pid %d adopted %zu session(s)", (int)getpid(),
		    adopted);
}

/*
 * The server, forked from the keeper with a copy of it: its own
 * oom_score_adj, the keeper's descriptors it has no use for closed, its
 * filter and threads, every slot adopted; then the loop, and the exit
 * code told to the keeper.
 */
static int
server_main(struct keeper *k, int ctl)
{
	struct server srv = { .epfd = -1, .ctl = ctl, .k = k, .in = &k->in,
	    .listening = k->ls.lfd >= 0, .vmms = k->vmms, .worst = k->worst,
	    .idle_end = INT64_MAX, .w = { .wepfd = -1, .stopfd = -1, .notefd = -1,
	    .popmu = PTHREAD_MUTEX_INITIALIZER, .popcv = PTHREAD_COND_INITIALIZER } };
	int code = EXIT_SETUP;

	server_oom(k);
	closefd(&k->ls.lfd);
	reserve_release(&k->ls);
	closefd(&k->sigfd);
	closefd(&k->epfd);
	metrics_close(&k->m);
	if ((opt.seccomp && seccomp_confine(STAGE_ACCEPTING, -1, -1) < 0) ||
	    server_init(&srv) < 0 || threads_start(&srv) < 0) {
		ask_done(&srv, code);
	} else {
		adopt_slots(&srv);
		/* Those adoption failed closed end now, not at the next event. */
		reap_sessions(&srv);
		ask_ready(&srv);
		code = run(&srv);
		ask_done(&srv, code);
	}
	if (code == EXIT_HANDOVER)
		server_leave(&srv);
	server_close(&srv);
	return code;
}

/* ------------------------------------------------------------------------
 * 14. The readiness check
 *
 * --check: whether a restore can be served on this host, one line a
 * capability, with what to do where one is missing. What can be tried is
 * tried, in a child that goes away with what it made: a userfaultfd made
 * and used as Firecracker makes it (as the VMM's uid, given with --uid),
 * a seccomp filter installed, a pidfd opened, SO_PEERPIDFD asked for.
 * ------------------------------------------------------------------------ */

#define USERFAULTFD_DEV	"/dev/userfaultfd"

/* A uffd as Firecracker makes one: the syscall (root, CAP_SYS_PTRACE or
 * vm.unprivileged_userfaultfd=1), else /dev/userfaultfd (Linux 6.1), with
 * the API agreed; -errno of the syscall, or of the device when that is
 * the one refused for another reason than its absence. */
static int
uffd_create(void)
{
	struct uffdio_api api = { UFFD_API, UFFD_FEATURE_EVENT_REMOVE, 0 };
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK), dev, err;

	err = errno;
	if (fd < 0 && (dev = open(USERFAULTFD_DEV, O_RDWR | O_CLOEXEC)) >= 0) {
		fd = ioctl(dev, (int)USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		close(dev);
	}
	if (fd < 0)
		return -err;
	if (ioctl(fd, (int)UFFDIO_API, &api) < 0) {
		err = errno;
		close(fd);
		return -err;
	}
	return fd;
}

/* In the child: a page registered, copied into from the next, read back. */
static int
uffd_works(void)
{
	struct uffdio_register reg = { { 0, PAGE_4K }, UFFDIO_REGISTER_MODE_MISSING, 0 };
	struct uffdio_copy c = { 0, 0, PAGE_4K, 0, 0 };
	char *p = mmap(NULL, 2 * PAGE_4K, PROT_READ | PROT_WRITE, MAP_PRIVATE |
	    MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	int fd = uffd_create();

	if (fd < 0 || p == MAP_FAILED)
		return fd < 0 ? -fd : errno;
	memcpy(p + PAGE_4K, "uffd", 5);
	reg.range.start = c.dst = (uintptr_t)p;
	c.src = (uintptr_t)p + PAGE_4K;
	if (ioctl(fd, (int)UFFDIO_REGISTER, &reg) < 0 ||
	    ioctl(fd, (int)UFFDIO_COPY, &c) < 0)
		return errno;
	return memcmp(p, "uffd", 5) == 0 ? 0 : EIO;
}

static int
seccomp_works(void)
{
	struct sock_filter f = RET(SECCOMP_RET_ALLOW);
	struct sock_fprog prog = { 1, &f };

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
	    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0)
		return errno;
	return 0;
}

static int
pidfd_works(void)
{
	int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);

	if (fd < 0 || syscall(SYS_pidfd_send_signal, fd, 0, NULL, 0) < 0)
		return errno;
	return 0;
}

static int
peerpidfd_works(void)
{
	int sv[2], fd = -1;
	socklen_t l = sizeof(fd);

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0 ||
	    getsockopt(sv[0], SOL_SOCKET, SO_PEERPIDFD, &fd, &l) < 0)
		return errno;
	return 0;
}

static int
memfd_works(void)
{
	return memfd_create("uffd-handler-check", MFD_CLOEXEC) < 0 ? errno : 0;
}

/* fn in a child, as uid and gid (-1: as it is); its errno, 0 when it
 * worked. */
static int
try_in_child(int (*fn)(void), long uid, long gid)
{
	int status;
	pid_t pid = fork();

	if (pid == 0) {
		if ((gid >= 0 && (setgroups(0, NULL) < 0 || setgid((gid_t)gid) < 0)) ||
		    (uid >= 0 && setuid((uid_t)uid) < 0))
			_exit(EPERM);
		_exit(fn());
	}
	if (pid < 0 || waitpid(pid, &status, 0) < 0)
		return errno;
	return WIFEXITED(status) ? WEXITSTATUS(status) : EINTR;
}

/* One line; *missing counts what a restore cannot do without. */
static void
check_line(int *missing, int needed, int err, const char *name,
    const char *ok, const char *fix)
{
	printf("%-7s %s: %s%s%s\n", !err ? "ok" : needed ? "missing" : "note",
	    name, err ? strerror(err) : ok, err ? "; " : "", err ? fix : "");
	*missing += needed && err;
}

static void
check_kernel(int *missing)
{
	struct utsname u;
	uint64_t major = 0, minor = 0;
	const char *p;
	char ok[96];

	uname(&u);
	if (parse_number(u.release, 10, 1000, &p, &major) == 0 && *p == '.')
		parse_number(p + 1, 10, 1000, &p, &minor);
	snprintf(ok, sizeof(ok), "Linux %s", u.release);
	check_line(missing, 1, major * 1000 + minor < 5010 ? ENOSYS : 0, "kernel",
	    ok, "Linux 5.10 or later is needed (Firecracker's oldest host)");
}

/* Why a uffd cannot be had, with the sysctl and the device node named. */
static void
check_userfaultfd(int *missing)
{
	char sysctl[8] = "", fix[448], ok[96];
	int fd = open("/proc/sys/vm/unprivileged_userfaultfd", O_RDONLY | O_CLOEXEC);
	int err = try_in_child(uffd_works, opt.uid, opt.gid);
	struct stat st;

	if (fd >= 0 && read(fd, sysctl, sizeof(sysctl) - 1) > 0)
		sysctl[1] = '\0';	/* 0, 1: one digit */
	if (fd >= 0)
		close(fd);
	snprintf(ok, sizeof(ok), "a VMM running as uid %ld can make one and "
	    "have its faults served", opt.uid >= 0 ? opt.uid : (long)getuid());
	snprintf(fix, sizeof(fix), "a VMM as uid %ld cannot make a userfaultfd "
	    "that sees kernel faults: vm.unprivileged_userfaultfd is %s, %s %s; "
	    "give the VMM CAP_SYS_PTRACE (root has it outside containers), or "
	    "sysctl -w vm.unprivileged_userfaultfd=1, or read-write access to "
	    "%s (Linux 6.1; in a jail: mknod ROOT%s c 10 257; in a container: "
	    "--device %s)", opt.uid >= 0 ? opt.uid : (long)getuid(),
	    sysctl[0] ? sysctl : "unknown (no /proc here)", USERFAULTFD_DEV,
	    stat(USERFAULTFD_DEV, &st) == 0 ? "is not open to it" :
	    "does not exist here", USERFAULTFD_DEV, USERFAULTFD_DEV,
	    USERFAULTFD_DEV);
	check_line(missing, 1, err, "userfaultfd", ok, fix);
}

/* The hugetlb pool: guests on 2 MiB pages need it, others do not. */
static void
check_hugetlb(void)
{
	char buf[24] = "";
	const char *end;
	uint64_t free = 0;
	int fd = open("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages",
	    O_RDONLY | O_CLOEXEC);
	int n = fd >= 0 ? (int)read(fd, buf, sizeof(buf) - 1) : -1;

	if (fd >= 0)
		close(fd);
	buf[n > 0 ? n : 0] = '\0';
	if (n > 0 && parse_number(buf, 10, UINT64_MAX, &end, &free) == 0 && free)
		printf("ok      hugetlb: %llu free 2 MiB pages\n",
		    (unsigned long long)free);
	else
		printf("note    hugetlb: %s; guests on 2 MiB pages need them free: "
		    "sysctl -w vm.nr_hugepages=N (guest MiB / 2 for each)\n", n > 0 ?
		    "no free 2 MiB pages" : "the pool is not readable here (no /sys)");
}

static void
check_descriptors(void)
{
	struct rlimit r;

	getrlimit(RLIMIT_NOFILE, &r);
	printf("%-7s descriptors: hard limit %llu, room for %llu VMs in one "
	    "handler (14 + 4 a VM; systemd: LimitNOFILE=)\n", "note",
	    (unsigned long long)r.rlim_max, r.rlim_max > 14 ?
	    (unsigned long long)(r.rlim_max - 14) / 4 : 0ull);
}

static int
check_host(void)
{
	int missing = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	check_kernel(&missing);
	check_userfaultfd(&missing);
	check_line(&missing, opt.seccomp, try_in_child(seccomp_works, -1, -1),
	    "seccomp", "filters can be installed", "the kernel needs "
	    "CONFIG_SECCOMP_FILTER; or run the handler with --no-seccomp");
	check_line(&missing, 1, try_in_child(pidfd_works, -1, -1), "pidfd",
	    "a VMM's exit is seen and it can be killed", "Linux 5.3 or later "
	    "is needed (pidfd_open, pidfd_send_signal)");
	check_line(&missing, 0, try_in_child(peerpidfd_works, -1, -1),
	    "SO_PEERPIDFD", "a VMM in another pid namespace is watched too",
	    "Linux 6.5 has it; until then run the handler in the VMM's pid "
	    "namespace (podman run --pid=host)");
	check_line(&missing, 1, try_in_child(memfd_works, -1, -1), "memfd",
	    "each VM's state outlives a server", "the kernel needs "
	    "CONFIG_MEMFD_CREATE (Linux 3.17)");
	check_hugetlb();
	check_descriptors();
	if (missing == 0)
		printf("ready: a restore can be served here\n");
	else
		printf("not ready: %d missing\n", missing);
	return missing ? EXIT_NOT_READY : 0;
}

/* ------------------------------------------------------------------------
 * 15. The self-test
 *
 * --self-test: this binary restores a snapshot it makes, through itself,
 * and needs nothing else: the snapshot lies in a memfd and the socket in
 * the abstract namespace, so an empty chroot or a FROM scratch image will
 * do. The handler is the real one, a keeper started as the command line
 * starts it, which forks its server. Each VM is a child that plays
 * Firecracker: its own uffd (O_CLOEXEC|O_NONBLOCK, REMOVE events only),
 * guest memory MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE registered for
 * missing faults, the handshake's JSON with the uffd as SCM_RIGHTS, and
 * its own copy of the uffd kept. vCPU threads touch every page, reading
 * or writing first, while a balloon thread removes others (MADV_DONTNEED);
 * then every page is checked against the snapshot, or zeros where removed.
 * Once on 4 KiB pages, once on 2 MiB pages where the hugetlb pool has room.
 * ------------------------------------------------------------------------ */

#define ST_SIZE		(8ull << 20)	/* two regions of 4 MiB */
#define ST_REGION	(4ull << 20)
#define ST_HOLE		1280		/* blocks 1280-1535: a 1 MiB hole */
#define ST_VCPUS	3
#define ST_MS		30000		/* a VM that takes longer is frozen */

/* What block b of the snapshot holds: 0 a hole, 1 zeros written, 2 data. */
static int
st_kind(uint64_t b)
{
	return b >= ST_HOLE && b < ST_HOLE + 256 ? 0 : b % 7 == 3 ? 1 : 2;
}

/* The snapshot's word at file offset off. */
static uint64_t
st_word(uint64_t off)
{
	uint64_t x = (off + 1) * 0x9e3779b97f4a7c15ull;

	return st_kind(off / PAGE_4K) == 2 ? (x ^ (x >> 29)) | 1 : 0;
}

static int
st_snapshot(void)
{
	uint64_t page[PAGE_4K / 8];
	int fd = memfd_create("uffd-handler-self-test", MFD_CLOEXEC);

	if (fd < 0 || ftruncate(fd, (off_t)ST_SIZE) < 0)
		return -errno;
	for (uint64_t b = 0; b < ST_SIZE / PAGE_4K; b++) {
		for (uint64_t i = 0; i < PAGE_4K / 8; i++)
			page[i] = st_word(b * PAGE_4K + i * 8);
		if (st_kind(b) && pwrite(fd, page, PAGE_4K, (off_t)(b * PAGE_4K)) !=
		    (ssize_t)PAGE_4K)
			return -errno;
	}
	return fd;
}

/* One VM: what it is, and in its child what it saw. */
struct st_vm {
	const char *name;
	uint64_t page;
	const char *skip;		/* why it cannot run here */
	pid_t pid;
	int pipe[2];			/* its result line */
	char result[256];
	char *mem[2];
	int bad;			/* pages wrong (atomic) */
	int vcpu;			/* the next thread's number (atomic) */
};

/* Page u's part: the balloon's (removed), written first, or read. */
static int
st_removed(uint64_t u)
{
	return u % 4 == 1;
}

static int
st_written(uint64_t u)
{
	return u % 3 == 0 && !st_removed(u);
}

static volatile uint64_t *
st_page(struct st_vm *v, uint64_t u)
{
	uint64_t off = u * v->page;

	return (volatile uint64_t *)(void *)(v->mem[off / ST_REGION] + off % ST_REGION);
}

/* Page u as it must read now; the first wrong one is told. */
static void
st_verify(struct st_vm *v, uint64_t u, int removed)
{
	volatile uint64_t *p = st_page(v, u);
	uint64_t off = u * v->page, want;

	for (uint64_t i = 0; i < v->page / 8; i++) {
		want = removed ? 0 : i == 1 && st_written(u) ? ~st_word(off + 8) :
		    st_word(off + i * 8);
		if (p[i] == want)
			continue;
		if (__atomic_fetch_add(&v->bad, 1, __ATOMIC_SEQ_CST) == 0)
			snprintf(v->result, sizeof(v->result), "%llu-byte page at file "
			    "offset %llu: word %llu reads %016llx, the snapshot has "
			    "%016llx", (unsigned long long)v->page,
			    (unsigned long long)off, (unsigned long long)i,
			    (unsigned long long)p[i], (unsigned long long)want);
		return;
	}
}

static uint64_t
st_pages(const struct st_vm *v)
{
	return ST_SIZE / v->page;
}

/* A vCPU: its pages in order (runs of 16 on 4 KiB pages, so the handler
 * sees sequential streams), written first or read, each checked. */
static void *
st_vcpu(void *arg)
{
	struct st_vm *v = arg;
	uint64_t t = (uint64_t)__atomic_fetch_add(&v->vcpu, 1, __ATOMIC_SEQ_CST);
	uint64_t run = v->page == PAGE_4K ? 16 : 1;

	for (uint64_t u = 0; u < st_pages(v); u++) {
		if (st_removed(u) || (u / run) % ST_VCPUS != t)
			continue;
		if (st_written(u))
			st_page(v, u)[1] = ~st_word(u * v->page + 8);
		st_verify(v, u, 0);
	}
	return NULL;
}

/* The balloon, racing the vCPUs: half its pages read first, every one
 * given back and read again as zeros. */
static void *
st_balloon(void *arg)
{
	struct st_vm *v = arg;

	for (uint64_t u = 1; u < st_pages(v); u += 4) {
		if (u % 8 == 1)
			st_verify(v, u, 0);
		madvise((void *)st_page(v, u), v->page, MADV_DONTNEED);
		st_verify(v, u, 1);
	}
	return NULL;
}

/* Guest memory as Firecracker maps and registers it. */
static int
st_memory(struct st_vm *v, int uffd)
{
	int huge = v->page == PAGE_2M ? MAP_HUGETLB | MAP_HUGE_2MB : 0;

	for (int r = 0; r < 2; r++) {
		struct uffdio_register reg = { { 0, ST_REGION },
		    UFFDIO_REGISTER_MODE_MISSING, 0 };

		v->mem[r] = mmap(NULL, ST_REGION, PROT_READ | PROT_WRITE, MAP_PRIVATE |
		    MAP_ANONYMOUS | MAP_NORESERVE | huge, -1, 0);
		if (v->mem[r] == MAP_FAILED)
			return -errno;
		reg.range.start = (uintptr_t)v->mem[r];
		if (ioctl(uffd, (int)UFFDIO_REGISTER, &reg) < 0)
			return -errno;
	}
	return 0;
}

/* Firecracker 1.12's message: the regions, the uffd as SCM_RIGHTS. */
static int
st_handshake(struct st_vm *v, int uffd, const struct sockaddr_un *a,
    socklen_t alen)
{
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} cm;
	char json[512];
	struct iovec iov = { json, 0 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b,
	    .msg_controllen = sizeof(cm.b) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
	int conn = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	for (int r = 0; r < 2; r++)
		iov.iov_len += (size_t)snprintf(json + iov.iov_len, sizeof(json) -
		    iov.iov_len, "%s{\"base_host_virt_addr\":%llu,\"size\":%llu,"
		    "\"offset\":%llu,\"page_size\":%llu,\"page_size_kib\":%llu}%s",
		    r ? "," : "[", (unsigned long long)(uintptr_t)v->mem[r],
		    ST_REGION, r * ST_REGION, (unsigned long long)v->page,
		    (unsigned long long)v->page, r ? "]" : "");
	*c = (struct cmsghdr){ .cmsg_len = CMSG_LEN(sizeof(int)),
	    .cmsg_level = SOL_SOCKET, .cmsg_type = SCM_RIGHTS };
	memcpy(CMSG_DATA(c), &uffd, sizeof(int));
	if (conn < 0 || connect(conn, (const struct sockaddr *)a, alen) < 0 ||
	    sendmsg(conn, &mh, MSG_NOSIGNAL) != (ssize_t)iov.iov_len)
		return -errno;
	return conn;		/* kept open, as Firecracker 1.12 does */
}

/* The VM's child: restore, touch, check; its line to the pipe. */
static int
st_vmm(struct st_vm *v, const struct sockaddr_un *a, socklen_t alen)
{
	pthread_t t[ST_VCPUS + 1];
	uint64_t written = 0, removed = 0;
	int uffd = uffd_create(), rc, n = 0;

	if (uffd < 0 || (rc = st_memory(v, uffd)) < 0 ||
	    (rc = st_handshake(v, uffd, a, alen)) < 0) {
		snprintf(v->result, sizeof(v->result), "setting up the VM: %s",
		    strerror(uffd < 0 ? -uffd : -rc));
		return 1;
	}
	while (n <= ST_VCPUS && pthread_create(&t[n], NULL, n ? st_vcpu :
	    st_balloon, v) == 0)
		n++;
	for (int i = 0; i < n; i++)
		pthread_join(t[i], NULL);
	for (uint64_t u = 0; u < st_pages(v) && !v->bad; u++) {
		st_verify(v, u, st_removed(u));
		written += st_written(u);
		removed += st_removed(u);
	}
	if (n != ST_VCPUS + 1 && !v->bad)
		snprintf(v->result, sizeof(v->result), "pthread_create failed");
	if (n != ST_VCPUS + 1 || v->bad)
		return 1;
	snprintf(v->result, sizeof(v->result), "%llu pages of %llu KiB right, "
	    "%llu written first, %llu removed by a balloon racing %d vCPUs",
	    (unsigned long long)st_pages(v), (unsigned long long)v->page / 1024,
	    (unsigned long long)written, (unsigned long long)removed, ST_VCPUS);
	return 0;
}

/* The handler as started from the command line, on the memfd and the
 * listening socket: a keeper, which forks its server. */
static int
st_keeper(int memfd, int lfd, int out, int err)
{
	struct keeper k;
	int code;

	keeper_blank(&k, NULL);
	k.ls.lfd = lfd;
	dup2(out, STDOUT_FILENO);
	dup2(err, STDERR_FILENO);
	raise_nofile();
	if ((k.sigfd = signal_fd()) < 0 ||
	    chain_take(&k.in.chain, opt.layers, &memfd, 1, k.sigfd) < 0)
		code = EXIT_SETUP;
	else if ((code = keeper_start(&k)) == 0)
		code = keeper_run(&k);
	keeper_close(&k);
	return code;
}

/* Reaped within ms, or killed: its wait status, -1 if it hung. */
static int
st_reap(pid_t pid, int ms)
{
	int status;

	for (int64_t end = now_ms() + ms; now_ms() < end; pause_us(5000))
		if (waitpid(pid, &status, WNOHANG) == pid)
			return status;
	kill(pid, SIGKILL);
	waitpid(pid, &status, 0);
	return -1;
}

/* Where key first stands in s, or NULL. */
static const char *
find(const char *s, const char *key)
{
	for (size_t n = strlen(key); s != NULL && *s; s++)
		if (strncmp(s, key, n) == 0)
			return s + n;
	return NULL;
}

/* What the handler's counters line says of VMM pid: a field, or -1. */
static long long
st_counter(const char *out, pid_t pid, const char *field)
{
	char key[48];
	const char *p;
	uint64_t v;

	snprintf(key, sizeof(key), "\"vmm_pid\":%d,", (int)pid);
	if ((p = find(find(out, key), field)) == NULL ||
	    parse_number(p, 10, UINT64_MAX, &p, &v) < 0)
		return -1;
	return (long long)v;
}

/* A VM's check line, from its exit and the handler's counters. */
static int
st_outcome(struct st_vm *v, int status, const char *out)
{
	long long faults = st_counter(out, v->pid, "\"faults\":");
	long long removes = st_counter(out, v->pid, "\"remove_events\":");
	ssize_t n = read(v->pipe[0], v->result, sizeof(v->result) - 1);

	if (n > 0)
		v->result[n] = '\0';
	if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		printf("FAIL    %s: %s%s\n", v->name, status == -1 ? "frozen: "
		    "killed after 30 s; " : WIFSIGNALED(status) ? "the VMM was "
		    "killed; " : "", v->result);
		return 1;
	}
	if (faults <= 0 || removes <= 0) {
		printf("FAIL    %s: %s, but the handler reported %lld faults and "
		    "%lld REMOVE events for it\n", v->name, v->result, faults, removes);
		return 1;
	}
	printf("ok      %s: %s; the handler served %lld faults and %lld REMOVE "
	    "events\n", v->name, v->result, faults, removes);
	return 0;
}

/*
 * A self-test killed from outside (a CI job's timeout) takes its keeper
 * and VMs with it: left behind with a handler that hangs, they would wait
 * for good. The server then ends with its VMs. 1 if the self-test is
 * already gone.
 */
static int
st_orphan(pid_t parent)
{
	return prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent;
}

/* Once its children run with the handler's signals blocked: a stopping
 * signal (a CI job's timeout) ends the self-test at once, as it ends any
 * tool, and its keeper and VMs go with it (st_orphan). */
static void
st_stoppable(void)
{
	sigset_t stop;

	sigemptyset(&stop);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGINT);
	sigaddset(&stop, SIGHUP);
	sigaddset(&stop, SIGQUIT);
	sigprocmask(SIG_UNBLOCK, &stop, NULL);
}

/* Starts the keeper and the VMs; the keeper's pid. */
static pid_t
st_start(struct st_vm *vm, int nvm, int memfd, int io[2])
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	socklen_t alen;
	pid_t keeper, self = getpid();
	int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);

	alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 +
	    (size_t)snprintf(a.sun_path + 1, sizeof(a.sun_path) - 1,
	    "uffd-handler-self-test-%d", (int)getpid()));
	for (int i = 0; i < nvm; i++)
		if (pipe(vm[i].pipe) < 0 || fcntl(vm[i].pipe[0], F_SETFL, O_NONBLOCK) < 0)
			return -1;
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, alen) < 0 ||
	    listen(lfd, 16) < 0 || (keeper = fork()) < 0)
		return -1;
	if (keeper == 0)
		_exit(st_orphan(self) ? EXIT_FATAL :
		    st_keeper(memfd, lfd, io[0], io[1]));
	close(lfd);
	for (int i = 0; i < nvm; i++) {
		if (vm[i].skip != NULL)
			continue;
		if ((vm[i].pid = fork()) < 0)
			snprintf(vm[i].result, sizeof(vm[i].result), "fork: %s",
			    strerror(errno));
		if (vm[i].pid == 0) {
			int rc = st_orphan(self) ? 1 : st_vmm(&vm[i], &a, alen);

			(void)!write(vm[i].pipe[1], vm[i].result, strlen(vm[i].result));
			_exit(rc);
		}
	}
	return keeper;
}

/* The handler's own ending, and its log when anything failed. */
static int
st_handler(int status, int failed, int io[2])
{
	char log[4096];
	ssize_t n;

	if (status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0 && !failed) {
		printf("ok      handler: its keeper and server served the VMs and "
		    "exited 0 once they were gone\n");
		return 0;
	}
	if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
		printf("FAIL    handler: %s\n", status == -1 ? "did not exit 5 s "
		    "after its VMs; killed" : "did not exit 0 after its VMs");
	printf("the handler's log:\n");
	for (off_t at = 0; (n = pread(io[1], log, sizeof(log), at)) > 0; at += n)
		fwrite(log, 1, (size_t)n, stdout);
	return 1;
}

static int
self_test(void)
{
	static char *layers[] = { "the self-test's snapshot (a memfd)" };
	struct st_vm vm[2] = { { .name = "restore_4k", .page = PAGE_4K },
		{ .name = "restore_2m", .page = PAGE_2M } };
	int memfd, uffd, io[2], status[3], failed = 0;
	char out[8192];
	void *pool;
	pid_t keeper;
	ssize_t n;

	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("uffd-handler %s self-test\n", VERSION_LINE);
	if ((memfd = st_snapshot()) < 0) {
		printf("FAIL    snapshot: making it in a memfd: %s\n", strerror(-memfd));
		return EXIT_SETUP;
	}
	printf("ok      snapshot: 8 MiB in a memfd: data, zero pages, a 1 MiB hole\n");
	if ((uffd = uffd_create()) < 0) {
		for (int i = 0; i < 2; i++)
			printf("skip    %s: no userfaultfd here: %s (--check says "
			    "what to do)\n", vm[i].name, strerror(-uffd));
		printf("nothing restored: this host gives a VMM no userfaultfd\n");
		return EXIT_NOT_READY;
	}
	close(uffd);
	if ((pool = mmap(NULL, ST_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE |
	    MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB, -1, 0)) == MAP_FAILED)
		vm[1].skip = "the hugetlb pool has no 4 free pages of 2 MiB "
		    "(sysctl -w vm.nr_hugepages=4)";
	else
		munmap(pool, ST_SIZE);
	opt.layers = layers;
	opt.nlayers = 1;
	opt.socket_path = "@uffd-handler-self-test";
	opt.max_vms = vm[1].skip ? 1 : 2;
	opt.log_level = LOG_WARN;
	io[0] = memfd_create("uffd-handler-self-test-out", MFD_CLOEXEC);
	io[1] = memfd_create("uffd-handler-self-test-log", MFD_CLOEXEC);
	if (io[0] < 0 || io[1] < 0 || (keeper = st_start(vm, 2, memfd, io)) < 0) {
		printf("FAIL    handler: starting it: %s\n", strerror(errno));
		return EXIT_SETUP;
	}
	st_stoppable();
	for (int i = 0; i < 2; i++)
		if (vm[i].skip == NULL)
			status[i] = vm[i].pid > 0 ? st_reap(vm[i].pid, ST_MS) : 1;
	status[2] = st_reap(keeper, 5000);
	n = pread(io[0], out, sizeof(out) - 1, 0);
	out[n > 0 ? n : 0] = '\0';
	for (int i = 0; i < 2; i++)
		if (vm[i].skip)
			printf("skip    %s: %s\n", vm[i].name, vm[i].skip);
		else
			failed += st_outcome(&vm[i], status[i], out);
	failed += st_handler(status[2], failed, io);
	printf("%s%s\n", failed ? "self-test FAILED" : "self-test passed",
	    vm[1].skip ? "; skipped: restore_2m" : "");
	return failed ? EXIT_FATAL : 0;
}

/* ------------------------------------------------------------------------
 * 16. Main
 *
 * The keeper's setup, its loop, one teardown.
 * ------------------------------------------------------------------------ */

static int
keeper_init(struct keeper *k)
{
	k->wl = (struct watch){ NULL, W_LISTEN };
	k->ws = (struct watch){ NULL, W_SIGNAL };
	k->wc = (struct watch){ NULL, W_CTL };
	if ((k->epfd = epoll_create1(EPOLL_CLOEXEC)) < 0 || (k->ls.lfd >= 0 &&
	    epoll_ctl(k->epfd, EPOLL_CTL_ADD, k->ls.lfd, &(struct epoll_event){
	    .events = EPOLLIN, .data.ptr = &k->wl }) < 0) ||
	    epoll_ctl(k->epfd, EPOLL_CTL_ADD, k->sigfd, &(struct epoll_event){
	    .events = EPOLLIN, .data.ptr = &k->ws }) < 0 ||
	    reserve_fill(&k->ls, k->sigfd) < 0) {
		logmsg(LOG_ERROR, "setting up the keeper: %s", strerror(errno));
		return -1;
	}
	return 0;
}

/* A keeper that holds nothing yet. */
static void
keeper_blank(struct keeper *k, char **argv)
{
	*k = (struct keeper){ .ls = { .lfd = -1, .reserve = { -1, -1 } },
	    .in = { .record_fd = -1 }, .sigfd = -1, .epfd = -1, .ctl = -1,
	    .procfd = -1, .done = -1, .argv = argv, .self_fd = -1, .upgrade = -1,
	    .m = { .fd = { -1, -1 }, .dirfd = -1 } };
}

/* Once its inputs and socket are open: its ids, its filter, its server. */
static int
keeper_start(struct keeper *k)
{
	if (drop_privileges() < 0 || keeper_init(k) < 0 || (opt.seccomp &&
	    seccomp_confine(STAGE_KEEPER, k->procfd, k->m.dirfd) < 0))
		return EXIT_SETUP;
	/* Told to stop during setup: no "listening" line for a supervisor
	 * to take for a handler that is ready. */
	if (setup_interrupted(k->sigfd) < 0)
		return EXIT_SIGNAL;
	return keeper_spawn(k) < 0 ? EXIT_SETUP : 0;
}

/*
 * Signals are blocked into the signalfd before anything else, so a
 * stopping signal during setup (a long chain takes a second to map) ends
 * it with exit 5. The oom_score_adj needs root, before --uid drops it.
 */
static int
keeper_setup(struct keeper *k)
{
	int rc;

	raise_nofile();
	if ((k->sigfd = signal_fd()) < 0)
		return EXIT_SETUP;
	keeper_find_self(k, k->argv[0]);
	if ((rc = open_inputs(&k->in, k->sigfd)) < 0 ||
	    (rc = setup_interrupted(k->sigfd)) < 0)
		return rc == -ECANCELED ? EXIT_SIGNAL : EXIT_SETUP;
	if ((k->ls.lfd = listen_socket(opt.socket_path, &k->ls.sock_st,
	    k->sigfd)) < 0)
		return k->ls.lfd == -ECANCELED ? EXIT_SIGNAL : EXIT_SETUP;
	if ((rc = open_record(&k->in)) < 0)
		return rc == -EINVAL ? EXIT_USAGE : EXIT_SETUP;
	if (metrics_open(&k->m) < 0)
		return EXIT_SETUP;
	keeper_oom(k);
	return keeper_start(k);
}

/* Safe to call twice, and on a keeper half set up. */
static void
keeper_close(struct keeper *k)
{
	keeper_unlisten(k);
	for (size_t i = 0; i < k->nslot; i++)
		slot_free(&k->slot[i]);
	free(k->slot);
	k->slot = NULL;
	k->nslot = 0;
	reserve_release(&k->ls);
	closefd(&k->ctl);
	closefd(&k->epfd);
	closefd(&k->sigfd);
	closefd(&k->procfd);
	closefd(&k->self_fd);
	closefd(&k->upgrade);
	metrics_close(&k->m);
	chain_close(&k->in.chain);
	closefd(&k->in.record_fd);
	free(k->in.list);
	k->in.list = NULL;
}

int
main(int argc, char **argv)
{
	struct keeper k;
	const char *handover = getenv(HANDOVER_ENV);
	uint64_t hfd;
	sigset_t set;
	int rc, code;

	/* Before anything: a signal in the first instants is kept for the
	 * signalfd, not taken by its default action. */
	handled_signals(&set);
	sigprocmask(SIG_BLOCK, &set, NULL);
	if ((rc = parse_options(argc, argv)) != 0)
		return rc > 0 ? 0 : EXIT_USAGE;
	if (opt.check)
		return check_host();
	if (opt.self_test)
		return self_test();
	keeper_blank(&k, argv);
	if (handover != NULL) {
		code = parse_number(handover, 10, INT_MAX, NULL, &hfd) < 0 ?
		    EXIT_SETUP : keeper_resume(&k, (int)hfd);
	} else if ((code = keeper_setup(&k)) == 0) {
		logmsg(LOG_INFO, "listening on %s for %s", opt.socket_path,
		    opt.max_vms == 1 ? "a VMM" : "VMMs");
	}
	if (code == 0)
		code = keeper_run(&k);
	keeper_close(&k);
	return code;
}
