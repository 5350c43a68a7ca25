/*
 * bench - uffd-handler against the kernel's File backend and the copy
 * limit, side by side in one run (./build.sh bench).
 *
 *   bench [-r REPS] [-o DIR] [-H HANDLER] [-t N] [-d US] [WORKLOAD...]
 *                     (WORKLOAD "many": --max-vms; "chain": diff layers;
 *                     "threads": --threads 1 against the default, or
 *                     against --threads N with -t;
 *                     "cold": a 256 MiB memory file read from the local
 *                     disk cold; "slow": the same behind slowfs delaying
 *                     each read by -d US microseconds, 2000 unless given.
 *                     slow runs only when named: about 30 s a repetition,
 *                     and it needs /dev/fuse, root and build/test/slowfs;
 *                     "restarts": the pause a VM sees across its server's
 *                     death and an upgrade, only when named, 20 s a
 *                     repetition)
 *
 * -H runs another build of the handler (default build/uffd-handler), to
 * compare two versions on the same machine.
 *
 * Backends: file (MAP_PRIVATE of the memory file, Firecracker's File
 * backend), copy (memcpy of the whole file into anonymous memory: the copy
 * limit), uffd (the handler), uffd0 (the handler with --no-optimize: one
 * page per fault); for the scattered working set also uffd_rec (the
 * handler with --populate of a working set recorded by an earlier run) and
 * uffd_all (--populate all) and uffd_detach (--populate all --detach: the
 * handler leaves once every page is in). Every repetition runs every
 * workload on every backend,
 * interleaved, so a noisy neighbour hits all alike; medians are reported.
 * Writes DIR/results.json and DIR/results.svg and prints the table.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <fnmatch.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <sys/wait.h>

#define MAXREP	15
#define NB	7
#define NB_ALL	4	/* backends every workload runs; the rest only ws10 */
#define NM	9

enum { FILEB, COPY, UFFD, UFFD0, UFFD_REC, UFFD_ALL, UFFD_DETACH };
static const char *const backends[NB] = { "file", "copy", "uffd", "uffd0",
	"uffd_rec", "uffd_all", "uffd_detach" };

/* Per run: the VMM's JSON fields, then the handler's. */
enum { TOTAL, PER_PAGE, P50, P99, ANON, TOUCHED, HCPU, FAULTS, SYSCALLS };
static const char *const metrics[NM] = { "total_ms", "us_per_page", "p50_us",
	"p99_us", "rss_anon_mb", "touched_mb", "handler_cpu_ms", "faults",
	"syscalls" };

struct workload {
	const char *name, *snap, *what, *vmm_workload;
	int threads, cold, selected;
	double m[NB][MAXREP][NM];
	double med[NB][NM];
};

static struct workload work[] = {
	{ "seqread", "snap.mem", "1 vCPU, sequential read", "seqread", 1, 0, 0,
	    {{{0}}}, {{0}} },
	{ "seqwrite", "snap.mem", "1 vCPU, sequential write", "seqwrite", 1, 0, 0,
	    {{{0}}}, {{0}} },
	{ "rand2", "snap.mem", "2 vCPUs, random, every page", "rand2", 2, 0, 0,
	    {{{0}}}, {{0}} },
	{ "ws10", "snap.mem", "2 vCPUs, scattered 10% working set", "ws10", 2, 0, 0,
	    {{{0}}}, {{0}} },
	{ "balloon", "snap.mem", "re-fault after the balloon took all", "balloon",
	    1, 0, 0, {{{0}}}, {{0}} },
	{ "kvm", "snap.mem", "KVM vCPU (long mode) reads 4 MiB", "kvm", 1, 0, 0,
	    {{{0}}}, {{0}} },
	{ "seqread_cold", "snap.mem", "1 vCPU, sequential read, cold cache",
	    "seqread", 1, 1, 0, {{{0}}}, {{0}} },
	{ "halfzero", "half.mem", "sequential read, half the pages zero",
	    "seqread", 1, 0, 0, {{{0}}}, {{0}} },
};
#define NW (int)(sizeof(work) / sizeof(work[0]))

static const char *dir = "build/bench";
static int many;			/* the --max-vms experiment selected */
static const int many_counts[] = { 1, 4, 16 };
static double many_mibs[3][MAXREP], many_med[3];
static const char *vmm = "build/test/vmm", *handler = "build/uffd-handler";

/* The chain experiment: its accesses, and per run what each way took. */
static int chain;
static const char *const chain_access[2] = { "seqread", "rand2" };
enum { CH_CHAIN, CH_MERGED, CH_MERGE, CH_MAP, CH_BASE, NCH };
static double chain_ms[2][NCH][MAXREP], chain_med[2][NCH];
static int reps = 3;

/* The threads experiment: the same runs with --threads 1 (the one loop)
 * and with --threads N, alternating within each repetition. */
static int threads_exp;
static const char *hthreads;		/* the handler's --threads; NULL: its default */
static const char *threads_n;		/* -t N; NULL: the default */
enum { TH_SEQREAD, TH_SEQWRITE, TH_RAND2, TH_WS10, TH_WS10_REC, TH_MANY1,
	TH_MANY4, TH_MANY16, NTH };
static const char *const th_names[NTH] = { "seqread total ms",
	"seqwrite total ms", "rand2 us per page", "ws10 on demand ms",
	"ws10 --populate FILE ms", "1 VM MiB/s", "4 VMs MiB/s", "16 VMs MiB/s" };
static double th_v[2][NTH][MAXREP], th_med[2][NTH];

static void storage_json(FILE *f);	/* the cold and slow sections, below */

static const char *
layout(const struct workload *w)
{
	return strcmp(w->snap, "half.mem") == 0 ? "128,64,64" : "512,256,256";
}

static double
field(const char *json, const char *key)
{
	char pat[64];
	const char *at;

	snprintf(pat, sizeof(pat), "\"%s\":", key);
	return json && (at = strstr(json, pat)) ? strtod(at + strlen(pat), NULL) : -1;
}

static void
slurp(const char *path, char *buf, size_t cap)
{
	FILE *f = fopen(path, "r");
	size_t n = f ? fread(buf, 1, cap - 1, f) : 0;

	if (f)
		fclose(f);
	buf[n] = '\0';
}

static pid_t
spawn(char *const argv[], const char *out, const char *err)
{
	pid_t pid = fork();

	if (pid != 0)
		return pid;
	if (!freopen(out, "w", stdout) || !freopen(err, "w", stderr))
		_exit(126);
	execv(argv[0], argv);
	_exit(127);
}

/* The cold-cache runs start with the page cache empty (as root). */
static void
drop_caches(void)
{
	FILE *f;

	sync();
	if ((f = fopen("/proc/sys/vm/drop_caches", "w")) != NULL) {
		fputs("3\n", f);
		fclose(f);
	}
}

/* The handler's command line for backend b; buf holds a --populate list. */
static void
handler_argv(int b, char **argv, const char *sock, const char *snap, char *buf,
    size_t cap)
{
	int n = 0;

	argv[n++] = (char *)handler;
	if (hthreads) {
		argv[n++] = "--threads";
		argv[n++] = (char *)hthreads;
	}
	if (b == UFFD0)
		argv[n++] = "--no-optimize";
	if (b == UFFD_ALL || b == UFFD_DETACH)
		argv[n++] = "--populate=all";
	if (b == UFFD_DETACH)
		argv[n++] = "--detach";
	if (b == UFFD_REC) {
		snprintf(buf, cap, "--populate=%s/ws10.rec", dir);
		argv[n++] = buf;
	}
	argv[n++] = (char *)sock;
	argv[n++] = (char *)snap;
	argv[n] = NULL;
}

/* Starts the handler and waits until it listens. */
static pid_t
start_handler(char *const argv[], const char *sock)
{
	char out[256], err[256], buf[4096];
	pid_t pid;

	snprintf(out, sizeof(out), "%s/handler.out", dir);
	snprintf(err, sizeof(err), "%s/handler.err", dir);
	unlink(sock);
	unlink(err);
	pid = spawn(argv, out, err);
	for (int i = 0; i < 5000; i++) {
		slurp(err, buf, sizeof(buf));
		if (strstr(buf, "listening on"))
			return pid;
		usleep(1000);
	}
	fprintf(stderr, "bench: the handler did not start: %s\n", buf);
	exit(1);
}

static double
cpu_ms(const struct rusage *ru)
{
	return (double)(ru->ru_utime.tv_sec + ru->ru_stime.tv_sec) * 1e3 +
	    (double)(ru->ru_utime.tv_usec + ru->ru_stime.tv_usec) / 1e3;
}

static int
run_into(struct workload *w, int b, double *m)
{
	char snap[256], sock[256], path[256], threads[8], line[4096], hline[4096];
	char opt[300], *hargv[10];
	char *argv[] = { (char *)vmm, "bench", b >= UFFD ? sock : "-", snap,
		"--regions", (char *)layout(w), "--backend",
		b >= UFFD ? "uffd" : (char *)backends[b], "--workload",
		(char *)w->vmm_workload, "--threads", threads, NULL };
	struct rusage ru = { 0 };
	pid_t h = 0, v;
	int st = 0;

	snprintf(snap, sizeof(snap), "%s/%s", dir, w->snap);
	snprintf(sock, sizeof(sock), "%s/bench.sock", dir);
	snprintf(threads, sizeof(threads), "%d", w->threads);
	if (w->cold)
		drop_caches();
	if (b >= UFFD) {
		handler_argv(b, hargv, sock, snap, opt, sizeof(opt));
		h = start_handler(hargv, sock);
	}
	snprintf(line, sizeof(line), "%s/vmm.out", dir);
	snprintf(path, sizeof(path), "%s/vmm.err", dir);
	v = spawn(argv, line, path);
	waitpid(v, &st, 0);
	if (h > 0)
		wait4(h, NULL, 0, &ru);
	snprintf(path, sizeof(path), "%s/vmm.out", dir);
	slurp(path, line, sizeof(line));
	snprintf(path, sizeof(path), "%s/handler.out", dir);
	slurp(path, hline, sizeof(hline));
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0 || !strstr(line, "{\"backend\"")) {
		snprintf(path, sizeof(path), "%s/vmm.err", dir);
		slurp(path, line, sizeof(line));
		fprintf(stderr, "bench: %s on %s failed: %s\n", w->name, backends[b],
		    line);
		return -1;
	}
	for (int i = TOTAL; i <= TOUCHED; i++)
		m[i] = field(strstr(line, "{\"backend\""), metrics[i]);
	m[HCPU] = b >= UFFD ? cpu_ms(&ru) : -1;
	m[FAULTS] = b >= UFFD ? field(hline, "faults") : -1;
	m[SYSCALLS] = b >= UFFD ? field(hline, "syscalls") : -1;
	return 0;
}

static int
run_one(struct workload *w, int b, int rep)
{
	return run_into(w, b, w->m[b][rep]);
}

static int
cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static void
medians(struct workload *w)
{
	double v[MAXREP];

	for (int b = 0; b < NB; b++)
		for (int i = 0; i < NM; i++) {
			for (int r = 0; r < reps; r++)
				v[r] = w->m[b][r][i];
			qsort(v, (size_t)reps, sizeof(v[0]), cmp_double);
			w->med[b][i] = v[reps / 2];
		}
}

static double
ratio(double a, double b)
{
	return b > 0 ? a / b : -1;
}

static void
machine(char *buf, size_t cap)
{
	char cpu[4096], *at, *end;
	struct utsname u;

	uname(&u);
	slurp("/proc/cpuinfo", cpu, sizeof(cpu));
	at = strstr(cpu, "model name");
	at = at ? strchr(at, ':') + 2 : (char *)"unknown cpu";
	if ((end = strchr(at, '\n')) != NULL)
		*end = '\0';
	snprintf(buf, cap, "%s, %ld CPUs, Linux %s", at, sysconf(_SC_NPROCESSORS_ONLN),
	    u.release);
}

static void
write_json(const char *mach)
{
	char path[256];
	FILE *f;

	snprintf(path, sizeof(path), "%s/results.json", dir);
	if ((f = fopen(path, "w")) == NULL)
		return;
	fprintf(f, "{\"machine\":\"%s\",\"repetitions\":%d,\"workloads\":[", mach, reps);
	for (int i = 0, first = 1; i < NW; i++) {
		struct workload *w = &work[i];

		if (!w->selected)
			continue;
		fprintf(f, "%s\n {\"name\":\"%s\",\"what\":\"%s\",\"median\":{",
		    first ? "" : ",", w->name, w->what);
		first = 0;
		for (int b = 0; b < (strcmp(w->name, "ws10") ? NB_ALL : NB); b++) {
			fprintf(f, "%s\"%s\":{", b ? "," : "", backends[b]);
			for (int m = 0; m < NM; m++)
				fprintf(f, "%s\"%s\":%.3f", m ? "," : "", metrics[m],
				    w->med[b][m]);
			fprintf(f, "}");
		}
		fprintf(f, "},\"runs_us_per_page\":{");
		for (int b = 0; b < (strcmp(w->name, "ws10") ? NB_ALL : NB); b++) {
			fprintf(f, "%s\"%s\":[", b ? "," : "", backends[b]);
			for (int r = 0; r < reps; r++)
				fprintf(f, "%s%.3f", r ? "," : "", w->m[b][r][PER_PAGE]);
			fprintf(f, "]");
		}
		fprintf(f, "},\"uffd_over_file\":%.3f,\"uffd_over_copy\":%.3f,"
		    "\"uffd_over_uffd0\":%.3f,\"uffd0_over_copy\":%.3f}",
		    ratio(w->med[UFFD][TOTAL], w->med[FILEB][TOTAL]),
		    ratio(w->med[UFFD][TOTAL], w->med[COPY][TOTAL]),
		    ratio(w->med[UFFD][PER_PAGE], w->med[UFFD0][PER_PAGE]),
		    ratio(w->med[UFFD0][TOTAL], w->med[COPY][TOTAL]));
	}
	fprintf(f, "\n],\"many_vms_mib_per_s\":{\"1\":%.0f,\"4\":%.0f,"
	    "\"16\":%.0f},\"chain\":{", many_med[0], many_med[1], many_med[2]);
	for (int a = 0; a < 2; a++)
		fprintf(f, "%s\"%s\":{\"chain_ms\":%.1f,\"merged_ms\":%.1f,"
		    "\"base_ms\":%.1f,\"merge_ms\":%.1f,\"map_ms\":%.2f}",
		    a ? "," : "", chain_access[a], chain_med[a][CH_CHAIN],
		    chain_med[a][CH_MERGED], chain_med[a][CH_BASE],
		    chain_med[a][CH_MERGE], chain_med[a][CH_MAP]);
	fprintf(f, "},\"threads\":{\"n\":\"%s\"", threads_n ? threads_n : "default");
	for (int m = 0; m < 2; m++)
		for (int k = 0; k < NTH; k++)
			fprintf(f, ",\"%s %s\":%.2f", m ? "N" : "1", th_names[k],
			    th_med[m][k]);
	fprintf(f, "}");
	storage_json(f);
	fprintf(f, "}\n");
	fclose(f);
}

/* Grouped bars of us per page, log scale, one group per workload. */
static void
write_svg(const char *mach)
{
	static const char *const colour[NB] = { "#4e79a7", "#f28e2b", "#59a14f",
		"#e15759" };
	const double top = 60, h = 300, lo = -2, hi = 4;	/* 10^-2 .. 10^4 us */
	char path[256];
	int n = 0, x0 = 70, gw = 110;
	FILE *f;

	for (int i = 0; i < NW; i++)
		n += work[i].selected;
	snprintf(path, sizeof(path), "%s/results.svg", dir);
	if ((f = fopen(path, "w")) == NULL)
		return;
	fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" "
	    "height=\"460\" font-family=\"sans-serif\" font-size=\"12\">\n"
	    "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
	    "<text x=\"%d\" y=\"24\" font-size=\"16\">uffd-handler: microseconds "
	    "per page touched (median of %d, log scale)</text>\n"
	    "<text x=\"%d\" y=\"42\" fill=\"#555\">%s</text>\n",
	    x0 + n * gw + 40 > 880 ? x0 + n * gw + 40 : 880, x0, reps, x0, mach);
	for (int e = (int)lo; e <= (int)hi; e++) {
		double y = top + h - (e - lo) / (hi - lo) * h;

		fprintf(f, "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" "
		    "stroke=\"#ddd\"/><text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">"
		    "%g</text>\n", x0, x0 + n * gw, y, y, x0 - 6, y + 4, pow(10, e));
	}
	for (int i = 0, g = 0; i < NW; i++) {
		if (!work[i].selected)
			continue;
		for (int b = 0; b < NB_ALL; b++) {
			double v = work[i].med[b][PER_PAGE], l = v > 0 ? log10(v) : lo;
			double y = top + h - ((l < lo ? lo : l) - lo) / (hi - lo) * h;

			fprintf(f, "<rect x=\"%d\" y=\"%.1f\" width=\"20\" height=\"%.1f\" "
			    "fill=\"%s\"><title>%s %s: %.3f us/page</title></rect>\n",
			    x0 + g * gw + 10 + b * 22, y, top + h - y, colour[b],
			    work[i].name, backends[b], v);
		}
		fprintf(f, "<text x=\"%d\" y=\"%.0f\" text-anchor=\"middle\">%s</text>\n",
		    x0 + g * gw + 54, top + h + 18, work[i].name);
		g++;
	}
	for (int b = 0; b < NB_ALL; b++)
		fprintf(f, "<rect x=\"%d\" y=\"410\" width=\"14\" height=\"14\" "
		    "fill=\"%s\"/><text x=\"%d\" y=\"422\">%s</text>\n", x0 + b * 190,
		    colour[b], x0 + b * 190 + 20, b == FILEB ? "file: kernel File backend" :
		    b == COPY ? "copy: memcpy limit" : b == UFFD ? "uffd: uffd-handler" :
		    "uffd0: --no-optimize");
	fprintf(f, "</svg>\n");
	fclose(f);
}

/*
 * Many VMs from one handler (--max-vms N): N VMMs restore the 256 MiB
 * snapshot at once, each reading it sequentially; aggregate MiB/s.
 */

static double
run_many(int n)
{
	char snap[256], sock[256], limit[16];
	char *argv[] = { (char *)vmm, "bench", sock, snap, "--regions", "128,64,64",
		"--workload", "seqread", "--threads", "1", NULL };
	char *hargv[] = { (char *)handler, "--max-vms", limit, sock, snap, NULL,
		NULL, NULL };
	pid_t h, v[16];
	struct timespec t0, t1;
	int ok = 1, st;

	snprintf(snap, sizeof(snap), "%s/half.mem", dir);
	snprintf(sock, sizeof(sock), "%s/many.sock", dir);
	snprintf(limit, sizeof(limit), "%d", n);
	if (hthreads) {
		hargv[3] = "--threads";
		hargv[4] = (char *)hthreads;
		hargv[5] = sock;
		hargv[6] = snap;
	}
	h = start_handler(hargv, sock);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < n; i++)
		v[i] = spawn(argv, "/dev/null", "/dev/null");
	for (int i = 0; i < n; i++) {
		waitpid(v[i], &st, 0);
		ok &= WIFEXITED(st) && WEXITSTATUS(st) == 0;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	waitpid(h, &st, 0);
	if (!ok || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		fprintf(stderr, "bench: %d VMs at once failed\n", n);
		return -1;
	}
	return n * 256.0 / ((double)(t1.tv_sec - t0.tv_sec) +
	    (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
}

static void
print_many(void)
{
	printf("\nmany VMs, one handler (--max-vms N), each reading the 256 MiB "
	    "snapshot at once:\n");
	for (int k = 0; k < 3; k++)
		printf("  %2d VMs: %8.0f MiB/s aggregate\n", many_counts[k],
		    many_med[k]);
}

/*
 * A diff-snapshot chain: base.mem, snap.mem rewritten 1 MiB at a time as a
 * full snapshot's memory is written (a region at a time), and three diffs
 * of about 10% each, written a dirty page at a time as a diff snapshot is.
 * One restore serves the chain as it is; one serves the chain merged into
 * one file; one the base alone; the merge itself is what users run first
 * today (snapshot-editor's rebase: copy the base keeping holes, apply each
 * diff's data). The layer map's build time is the handler's own log line.
 */
static int
make_chain(void)
{
	char cmd[2048];

	snprintf(cmd, sizeof(cmd), "{ [ -f %s/base.mem ] || %s merge %s/base.mem "
	    "%s/snap.mem; } && for i in 1 2 3; do [ -f %s/diff$i.mem ] || %s "
	    "mkdiff %s/base.mem %s/diff$i.mem --dirty 10 --seed $i >/dev/null || "
	    "exit 1; done", dir, vmm, dir, dir, dir, vmm, dir, dir);
	return system(cmd);
}

static double
ms_since(const struct timespec *t0)
{
	struct timespec t1;

	clock_gettime(CLOCK_MONOTONIC, &t1);
	return (double)(t1.tv_sec - t0->tv_sec) * 1e3 +
	    (double)(t1.tv_nsec - t0->tv_nsec) / 1e6;
}

/* One restore, of the chain (layers 4), of merged.mem (1) or of base.mem
 * alone (0): the VMM's total_ms; *map_ms gets the layer map's build time. */
static double
chain_restore(const char *access, int layers, double *map_ms)
{
	char sock[256], snap[256], merged[256], d[3][256], out[256], line[4096];
	char *argv[] = { (char *)vmm, "bench", sock, merged, "--regions",
		"512,256,256", "--workload", (char *)access, "--threads",
		strcmp(access, "rand2") ? "1" : "2", NULL };
	char *hargv[] = { (char *)handler, sock, layers != 1 ? snap : merged, d[0],
		d[1], d[2], NULL };
	const char *at;
	pid_t h, v;
	int st;

	snprintf(sock, sizeof(sock), "%s/chain.sock", dir);
	snprintf(snap, sizeof(snap), "%s/base.mem", dir);
	snprintf(merged, sizeof(merged), "%s/merged.mem", dir);
	for (int i = 0; i < 3; i++)
		snprintf(d[i], sizeof(d[i]), "%s/diff%d.mem", dir, i + 1);
	if (layers < 4)
		hargv[3] = NULL;
	h = start_handler(hargv, sock);
	snprintf(out, sizeof(out), "%s/vmm.out", dir);
	v = spawn(argv, out, "/dev/null");
	waitpid(v, &st, 0);
	waitpid(h, NULL, 0);
	slurp(out, line, sizeof(line));
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
		return -1;
	snprintf(out, sizeof(out), "%s/handler.err", dir);
	slurp(out, line + 2048, sizeof(line) - 2048);
	if (map_ms && (at = strstr(line + 2048, "mapped in ")) != NULL)
		*map_ms = strtod(at + 10, NULL) / 1e3;
	return field(line, "total_ms");
}

/* What users do today: merge (into a fresh file), timed. */
static double
chain_merge(void)
{
	char cmd[1024], merged[256];
	struct timespec t0;
	double ms;

	snprintf(merged, sizeof(merged), "%s/merged.mem", dir);
	snprintf(cmd, sizeof(cmd), "%s merge %s %s/base.mem %s/diff1.mem "
	    "%s/diff2.mem %s/diff3.mem", vmm, merged, dir, dir, dir, dir);
	unlink(merged);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	ms = system(cmd) == 0 ? ms_since(&t0) : -1;
	/* Its writeback would slow the restores that follow. */
	sync();
	return ms;
}

static int
run_chain(int r)
{
	for (int a = 0; a < 2; a++) {
		double *m = &chain_ms[a][0][0];

		if ((m[CH_MERGE * MAXREP + r] = chain_merge()) < 0 ||
		    (m[CH_MERGED * MAXREP + r] = chain_restore(chain_access[a], 1,
		    NULL)) < 0 ||
		    (m[CH_CHAIN * MAXREP + r] = chain_restore(chain_access[a], 4,
		    &m[CH_MAP * MAXREP + r])) < 0 ||
		    (m[CH_BASE * MAXREP + r] = chain_restore(chain_access[a], 0,
		    NULL)) < 0) {
			fprintf(stderr, "bench: the chain experiment failed\n");
			return -1;
		}
	}
	return 0;
}

static void
print_chain(void)
{
	printf("\ndiff-snapshot chain: base.mem and 3 diffs of about 10%% each "
	    "(1 GiB guest):\n");
	for (int a = 0; a < 2; a++) {
		double *m = chain_med[a];

		printf("  %-8s chain %8.1f ms, merged file %8.1f ms (chain/merged "
		    "%.2fx), base alone %8.1f ms (chain/base %.2fx); merge %8.1f ms "
		    "+ restore = %8.1f ms (chain/that %.2fx); layer map %.1f ms\n",
		    chain_access[a], m[CH_CHAIN], m[CH_MERGED],
		    ratio(m[CH_CHAIN], m[CH_MERGED]), m[CH_BASE],
		    ratio(m[CH_CHAIN], m[CH_BASE]), m[CH_MERGE],
		    m[CH_MERGE] + m[CH_MERGED],
		    ratio(m[CH_CHAIN], m[CH_MERGE] + m[CH_MERGED]), m[CH_MAP]);
	}
}

static struct workload *
workload(const char *name)
{
	for (int i = 0; i < NW; i++)
		if (strcmp(work[i].name, name) == 0)
			return &work[i];
	return NULL;
}

/* One repetition of the threads experiment; which mode goes first
 * alternates from one repetition to the next. */
static int
run_threads(int r)
{
	static const int wl[] = { TH_SEQREAD, TH_SEQWRITE, TH_RAND2, TH_WS10,
		TH_WS10_REC };
	static const char *const wname[] = { "seqread", "seqwrite", "rand2", "ws10",
		"ws10" };
	double m[NM];

	for (int k = 0; k < 2; k++) {
		int mode = (k + r) % 2;

		hthreads = mode ? threads_n : "1";
		for (int i = 0; i < 5; i++) {
			fprintf(stderr, "\rbench: run %d/%d, threads %s %-8s   ", r + 1,
			    reps, hthreads ? hthreads : "default", wname[i]);
			if (run_into(workload(wname[i]), wl[i] == TH_WS10_REC ?
			    UFFD_REC : UFFD, m) < 0)
				return -1;
			th_v[mode][wl[i]][r] = wl[i] == TH_RAND2 ? m[PER_PAGE] : m[TOTAL];
		}
		for (int i = 0; i < 3; i++)
			if ((th_v[mode][TH_MANY1 + i][r] = run_many(many_counts[i])) < 0)
				return -1;
	}
	hthreads = NULL;
	return 0;
}

static void
print_threads(void)
{
	printf("\nthreads: --threads 1 against %s%s, side by side (medians):\n",
	    threads_n ? "--threads " : "the default", threads_n ? threads_n : "");
	for (int i = 0; i < NTH; i++)
		printf("  %-24s %10.2f %10.2f   (N/1 %.2fx)\n", th_names[i],
		    th_med[0][i], th_med[1][i], ratio(th_med[1][i], th_med[0][i]));
	printf("  ws10 --populate FILE against on demand: %.2fx sooner with "
	    "--threads 1, %.2fx with %s%s\n",
	    ratio(th_med[0][TH_WS10], th_med[0][TH_WS10_REC]),
	    ratio(th_med[1][TH_WS10], th_med[1][TH_WS10_REC]),
	    threads_n ? "--threads " : "the default", threads_n ? threads_n : "");
}

/*
 * Storage: the memory file read cold, from the local disk ("cold") or
 * through slowfs, a FUSE mount that delays every read ("slow", -d US,
 * 2 ms unless given), as a restore from an uncached file or network
 * storage reads it. Every other run here finds the file in the page
 * cache, which hides what a fault costs when the handler (or the File
 * backend) reads the file through a mapping, with the kernel's readahead
 * around each page: the readahead of the file's device is printed.
 *
 * One 256 MiB snapshot (128,64,64: a fifth of the pages zero, a 16 MiB
 * hole); 4 threads of the test VMM touch a random 5% of it (ws5), or one
 * reads it in order (seqread). Before every run the file's pages are
 * dropped with posix_fadvise(POSIX_FADV_DONTNEED), which needs no root;
 * slowfs's own source file stays cached, so its delay is the only cost of
 * storage there.
 *
 * Bytes from storage: slowfs's counters for slow; for cold the block
 * reads of the process that faulted the file in (the handler, or the VMM
 * for the File backend): wait4's ru_inblock, which is /proc/PID/io's
 * read_bytes, and counts no hole. Cached: the file's pages in the page
 * cache after the run (mincore). Installed: the handler's pages copied
 * and zero pages (for the File backend, the pages touched).
 *
 * The record/replay pair: one cold on-demand run with --record FILE
 * before the repetitions, then in each repetition one with --populate
 * FILE, the VM touching from the first instant.
 */
enum { ST_FILE, ST_UFFD, ST_T1, ST_T8, ST_REP, NST };
static const char *const st_names[NST] = { "file", "uffd", "uffd_t1",
	"uffd_t8", "uffd_rep" };
static const char *const st_threads[NST] = { NULL, NULL, "1", "8", NULL };
/* in flight: the reads storage served at once on average, the delay each
 * read waits times the reads over the time taken (slow only). */
enum { SM_MS, SM_STORAGE, SM_READS, SM_INFLIGHT, SM_CACHED, SM_INSTALLED,
	SM_FAULTS, NSM };
static const char *const sm_names[NSM] = { "total_ms", "storage_mb",
	"storage_reads", "reads_in_flight", "cached_mb", "installed_mb",
	"faults" };
static const char *const st_wl[2] = { "ws5", "seqread" };

struct storage {
	const char *name;
	int selected;
	char snap[512];			/* the memory file as the runs open it */
	double v[2][NST][MAXREP][NSM], med[2][NST][NSM];
	double rec[NSM];		/* the one --record run (ws5) */
	long ra_kb;			/* the file's readahead, read_ahead_kb */
};
static struct storage storage[2] = { { .name = "cold" }, { .name = "slow" } };
static long slow_delay_us = 2000;
static const char *slowfs_bin = "build/test/slowfs";
static char slow_mnt[300];
static pid_t slowfs_pid;

/* The pages of path in the page cache: mapping a file reads nothing,
 * and mincore says which of its pages are there. */
static double
cached_mb(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	unsigned char *vec = NULL;
	void *m = MAP_FAILED;
	double n = -1;

	if (fd >= 0 && fstat(fd, &st) == 0 && st.st_size > 0)
		m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
	if (m != MAP_FAILED && (vec = malloc((size_t)st.st_size / 4096 + 1)) &&
	    mincore(m, (size_t)st.st_size, vec) == 0) {
		n = 0;
		for (off_t i = 0; i < (st.st_size + 4095) / 4096; i++)
			n += vec[i] & 1;
	}
	free(vec);
	if (m != MAP_FAILED)
		munmap(m, (size_t)st.st_size);
	if (fd >= 0)
		close(fd);
	return n < 0 ? -1 : n * 4096 / (1024 * 1024);
}

/* Every run starts cold: the file's pages leave the page cache. */
static void
drop_file(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	double left;

	if (fd >= 0) {
		posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
		close(fd);
	}
	if ((left = cached_mb(path)) != 0)
		fprintf(stderr, "\nbench: %s: %.1f MiB still cached after "
		    "POSIX_FADV_DONTNEED\n", path, left);
}

/* The readahead of the device path lives on, in KiB; -1 if unknown. */
static long
readahead_kb(const char *path)
{
	char sys[128], buf[32];
	struct stat st;

	if (stat(path, &st) != 0)
		return -1;
	snprintf(sys, sizeof(sys), "/sys/class/bdi/%u:%u/read_ahead_kb",
	    major(st.st_dev), minor(st.st_dev));
	slurp(sys, buf, sizeof(buf));
	return buf[0] ? atol(buf) : -1;
}

/* One of slowfs's counters ("reads", "bytes"), read at the mount root. */
static double
slowfs_counter(const char *key)
{
	char path[600], buf[512], *at;
	size_t len = strlen(key);

	snprintf(path, sizeof(path), "%s/.slowfs", slow_mnt);
	slurp(path, buf, sizeof(buf));
	for (at = buf; (at = strstr(at, key)) != NULL; at += len)
		if ((at == buf || at[-1] == '\n') && at[len] == ' ')
			return strtod(at + len + 1, NULL);
	return -1;
}

static void
slowfs_stop(void)
{
	int st;

	if (slowfs_pid > 0) {
		kill(slowfs_pid, SIGTERM);
		waitpid(slowfs_pid, &st, 0);
		slowfs_pid = 0;
	}
}

/* Mounts slowfs over DIR/slow (a snapshot of its own, kept cached) on
 * DIR/slowmnt, and waits for its "mounted" line. */
static int
slowfs_start(void)
{
	char cmd[2048], delay[32], src[300], out[300], buf[1024];
	char *argv[] = { (char *)slowfs_bin, "-d", delay, src, slow_mnt, NULL };

	if (access(slowfs_bin, X_OK) != 0) {
		fprintf(stderr, "bench: no %s: install libfuse3-dev and fuse3 "
		    "(./build.sh bench does as root)\n", slowfs_bin);
		return -1;
	}
	snprintf(src, sizeof(src), "%s/slow", dir);
	snprintf(slow_mnt, sizeof(slow_mnt), "%s/slowmnt", dir);
	snprintf(delay, sizeof(delay), "%ld", slow_delay_us);
	snprintf(out, sizeof(out), "%s/slowfs.out", dir);
	/* A mount a killed bench left behind goes first. */
	umount2(slow_mnt, MNT_DETACH);
	snprintf(cmd, sizeof(cmd), "mkdir -p %s %s && { [ -f %s/s256.mem ] || %s "
	    "mksnap %s/s256.mem --regions 128,64,64 >/dev/null; } && cat "
	    "%s/s256.mem >/dev/null", src, slow_mnt, src, vmm, src, src);
	if (system(cmd) != 0)
		return -1;
	unlink(out);
	slowfs_pid = spawn(argv, out, out);
	atexit(slowfs_stop);
	for (int i = 0; i < 5000; i++) {
		slurp(out, buf, sizeof(buf));
		if (strstr(buf, "slowfs: mounted"))
			return 0;
		usleep(1000);
	}
	fprintf(stderr, "bench: slowfs did not mount: %s\n", buf);
	return -1;
}

/* The handler's command line for a storage run; rec: --record FILE. */
static void
storage_hargv(struct storage *s, int b, int rec, char **argv, char *sock,
    char *buf, size_t cap)
{
	int n = 0;

	argv[n++] = (char *)handler;
	if (st_threads[b]) {
		argv[n++] = "--threads";
		argv[n++] = (char *)st_threads[b];
	}
	if (rec || b == ST_REP) {
		snprintf(buf, cap, "--%s=%s/ws5-%s.rec", rec ? "record" : "populate",
		    dir, s->name);
		argv[n++] = buf;
	}
	argv[n++] = sock;
	argv[n++] = s->snap;
	argv[n] = NULL;
}

static void
storage_fill(struct storage *s, int b, double *m, const char *vline,
    const char *hline, const struct rusage *ru, double reads0, double bytes0)
{
	double pages = field(hline, "pages_copied") + field(hline, "zero_pages") +
	    field(hline, "zero_data_pages");

	m[SM_MS] = field(vline, "total_ms");
	m[SM_CACHED] = cached_mb(s->snap);
	m[SM_INSTALLED] = b == ST_FILE ? field(vline, "touched_mb") :
	    pages * 4096 / (1024 * 1024);
	m[SM_FAULTS] = b == ST_FILE ? -1 : field(hline, "faults");
	if (s == &storage[1]) {
		m[SM_STORAGE] = (slowfs_counter("bytes") - bytes0) / (1024 * 1024);
		m[SM_READS] = slowfs_counter("reads") - reads0;
		m[SM_INFLIGHT] = m[SM_READS] * (double)slow_delay_us / 1e3 / m[SM_MS];
	} else {
		m[SM_STORAGE] = (double)ru->ru_inblock * 512 / (1024 * 1024);
		m[SM_READS] = m[SM_INFLIGHT] = -1;
	}
}

/* One cold run of workload w on backend b into m. */
static int
storage_run(struct storage *s, int w, int b, int rec, double *m)
{
	char sock[256], out[256], err[256], vline[4096], hline[4096], opt[600];
	char *hargv[8], *argv[] = { (char *)vmm, "bench", b == ST_FILE ? "-" : sock,
		s->snap, "--regions", "128,64,64", "--backend", b == ST_FILE ?
		"file" : "uffd", "--workload", (char *)st_wl[w], "--threads",
		w == 0 ? "4" : "1", NULL };
	struct rusage vru = { 0 }, hru = { 0 };
	double reads0 = -1, bytes0 = -1;
	pid_t h = 0, v;
	int st = 0;

	snprintf(sock, sizeof(sock), "%s/bench.sock", dir);
	snprintf(out, sizeof(out), "%s/vmm.out", dir);
	snprintf(err, sizeof(err), "%s/vmm.err", dir);
	drop_file(s->snap);
	if (s == &storage[1]) {
		reads0 = slowfs_counter("reads");
		bytes0 = slowfs_counter("bytes");
	}
	if (b != ST_FILE) {
		storage_hargv(s, b, rec, hargv, sock, opt, sizeof(opt));
		h = start_handler(hargv, sock);
	}
	v = spawn(argv, out, err);
	wait4(v, &st, 0, &vru);
	if (h > 0)
		wait4(h, NULL, 0, &hru);
	slurp(out, vline, sizeof(vline));
	snprintf(out, sizeof(out), "%s/handler.out", dir);
	slurp(out, hline, sizeof(hline));
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0 || !strstr(vline, "{\"backend\"")) {
		slurp(err, vline, sizeof(vline));
		fprintf(stderr, "\nbench: %s %s on %s failed: %s\n", s->name, st_wl[w],
		    st_names[b], vline);
		return -1;
	}
	storage_fill(s, b, m, vline, hline, b == ST_FILE ? &vru : &hru, reads0,
	    bytes0);
	return 0;
}

/* Readies a selected storage section: its snapshot and the recording. */
static int
storage_setup(struct storage *s)
{
	char cmd[1024];

	if (s == &storage[1]) {
		if (slowfs_start() != 0)
			return -1;
		snprintf(s->snap, sizeof(s->snap), "%s/s256.mem", slow_mnt);
	} else {
		snprintf(cmd, sizeof(cmd), "[ -f %s/s256.mem ] || %s mksnap "
		    "%s/s256.mem --regions 128,64,64 >/dev/null", dir, vmm, dir);
		if (system(cmd) != 0)
			return -1;
		/* Dirty pages would stay in the page cache. */
		sync();
		snprintf(s->snap, sizeof(s->snap), "%s/s256.mem", dir);
	}
	s->ra_kb = readahead_kb(s->snap);
	fprintf(stderr, "\rbench: %s, recording ws5 with --record          ",
	    s->name);
	return storage_run(s, 0, ST_UFFD, 1, s->rec);
}

/* One repetition of a storage section; the backends' order turns with
 * each repetition, so none always runs first. */
static int
storage_rep(struct storage *s, int r)
{
	for (int w = 0; w < 2; w++) {
		int nb = w == 0 ? NST : ST_REP;

		for (int k = 0; k < nb; k++) {
			int b = (k + r) % nb;

			fprintf(stderr, "\rbench: run %d/%d, %s %-7s %-8s   ", r + 1,
			    reps, s->name, st_wl[w], st_names[b]);
			if (storage_run(s, w, b, 0, s->v[w][b][r]) < 0)
				return -1;
		}
	}
	return 0;
}

static void
storage_medians(struct storage *s)
{
	double v[MAXREP];

	for (int w = 0; w < 2; w++)
		for (int b = 0; b < NST; b++)
			for (int i = 0; i < NSM; i++) {
				for (int r = 0; r < reps; r++)
					v[r] = s->v[w][b][r][i];
				qsort(v, (size_t)reps, sizeof(v[0]), cmp_double);
				s->med[w][b][i] = v[reps / 2];
			}
}

/* A count, or "-" where it does not apply (-1). */
static const char *
count_or_dash(double v, char *buf, size_t cap)
{
	if (v < 0)
		snprintf(buf, cap, "-");
	else
		snprintf(buf, cap, "%.0f", v);
	return buf;
}

static void
storage_row(const char *wl, const char *name, const double *m, double file_ms)
{
	char reads[32], faults[32], inflight[32];

	if (m[SM_INFLIGHT] < 0)
		snprintf(inflight, sizeof(inflight), "-");
	else
		snprintf(inflight, sizeof(inflight), "%.2f", m[SM_INFLIGHT]);
	printf("  %-8s %-9s %9.1f %6.2fx %10.1f %7s %9s %9.1f %10.1f %8.2f %7s\n",
	    wl, name, m[SM_MS], ratio(m[SM_MS], file_ms), m[SM_STORAGE],
	    count_or_dash(m[SM_READS], reads, sizeof(reads)), inflight,
	    m[SM_CACHED], m[SM_INSTALLED], ratio(m[SM_STORAGE], m[SM_INSTALLED]),
	    count_or_dash(m[SM_FAULTS], faults, sizeof(faults)));
}

static void
print_storage(const struct storage *s)
{
	printf("\n%s: 256 MiB snapshot (128,64,64), %s, page cache dropped "
	    "before every run; readahead %ld KiB; storage: %s; medians of %d\n",
	    s->name, s == &storage[1] ? "behind slowfs" : "local file",
	    s->ra_kb, s == &storage[1] ? "slowfs's counters" :
	    "block reads of the reading process (wait4 ru_inblock)", reps);
	if (s == &storage[1])
		printf("  slowfs delays each read %ld us\n", slow_delay_us);
	printf("  %-8s %-9s %9s %7s %10s %7s %9s %9s %10s %8s %7s\n", "workload",
	    "backend", "total ms", "/file", "storage MB", "reads", "in flight",
	    "cached MB", "install MB", "stor/ins", "faults");
	for (int w = 0; w < 2; w++)
		for (int b = 0; b < (w == 0 ? NST : ST_REP); b++)
			storage_row(b ? "" : st_wl[w], st_names[b], s->med[w][b],
			    s->med[w][ST_FILE][SM_MS]);
	storage_row("ws5", "uffd_rec", s->rec, s->med[0][ST_FILE][SM_MS]);
	printf("  (file: install MB is MB touched; uffd: the default threads, "
	    "_t1/_t8: --threads 1/8; uffd_rec: the one --record run, uffd_rep: "
	    "--populate with its list; in flight: reads x delay / total ms)\n");
}

static void
storage_json(FILE *f)
{
	fprintf(f, ",\"storage\":{\"slow_delay_us\":%ld", slow_delay_us);
	for (int i = 0; i < 2; i++) {
		const struct storage *s = &storage[i];

		if (!s->selected)
			continue;
		fprintf(f, ",\"%s\":{\"readahead_kb\":%ld", s->name, s->ra_kb);
		for (int w = 0; w < 2; w++)
			for (int b = 0; b < (w == 0 ? NST : ST_REP); b++) {
				fprintf(f, ",\"%s %s\":{", st_wl[w], st_names[b]);
				for (int m = 0; m < NSM; m++)
					fprintf(f, "\"%s\":%.2f,", sm_names[m], s->med[w][b][m]);
				fprintf(f, "\"runs\":{");
				for (int m = 0; m < NSM; m++) {
					fprintf(f, "%s\"%s\":[", m ? "," : "", sm_names[m]);
					for (int r = 0; r < reps; r++)
						fprintf(f, "%s%.2f", r ? "," : "", s->v[w][b][r][m]);
					fprintf(f, "]");
				}
				fprintf(f, "}}");
			}
		fprintf(f, ",\"ws5 uffd_rec\":{");
		for (int m = 0; m < NSM; m++)
			fprintf(f, "%s\"%s\":%.2f", m ? "," : "", sm_names[m], s->rec[m]);
		fprintf(f, "}}");
	}
	fprintf(f, "}");
}

/* The table the README carries: medians, and the ratios the targets use. */
static void
print_table(const char *mach)
{
	printf("\n%s; median of %d interleaved runs\n\n", mach, reps);
	printf("%-13s %-6s %9s %8s %8s %8s %9s %9s %9s %8s\n", "workload", "backend",
	    "total ms", "us/page", "p50 us", "p99 us", "anon MiB", "touched",
	    "hdl cpu ms", "faults");
	for (int i = 0; i < NW; i++) {
		struct workload *w = &work[i];

		if (!w->selected)
			continue;
		for (int b = 0; b < (strcmp(w->name, "ws10") ? NB_ALL : NB); b++) {
			double *m = w->med[b];

			printf("%-13s %-6s %9.1f %8.3f %8.2f %8.2f %9.1f %9.1f %9.1f %8.0f\n",
			    b ? "" : w->name, backends[b], m[TOTAL], m[PER_PAGE], m[P50],
			    m[P99], m[ANON], m[TOUCHED], m[HCPU], m[FAULTS]);
		}
		printf("%-13s uffd/file %.2fx, uffd/copy %.2fx, uffd/uffd0 per page "
		    "%.2fx, uffd0/copy %.2fx; handler syscalls per page touched: "
		    "uffd %.2f, uffd0 %.2f\n", "", ratio(w->med[UFFD][TOTAL],
		    w->med[FILEB][TOTAL]), ratio(w->med[UFFD][TOTAL], w->med[COPY][TOTAL]),
		    ratio(w->med[UFFD][PER_PAGE], w->med[UFFD0][PER_PAGE]),
		    ratio(w->med[UFFD0][TOTAL], w->med[COPY][TOTAL]),
		    ratio(w->med[UFFD][SYSCALLS], w->med[UFFD][TOUCHED] * 256),
		    ratio(w->med[UFFD0][SYSCALLS], w->med[UFFD0][TOUCHED] * 256));
	}
}

/*
 * Restarts: the pause a VM sees across its server's death and across an
 * upgrade. The stress oracle (4 vCPUs faulting, reading and writing at
 * random, a balloon racing them) runs 6 s through the handler with
 * --threads 4: as it is; with the server SIGKILLed a second apart, four
 * times; and upgraded (SIGUSR2, the same binary put in place again) two
 * seconds apart, twice. The VM's longest touch, in us; medians.
 */
static const char *const restart_modes[3] = { "as it is", "4 server kills",
	"2 upgrades" };
static double restart_us[3][MAXREP], restart_med[3];
static int restarts;

/* The keeper's child: its server. */
static pid_t
server_of(pid_t keeper)
{
	char path[96], buf[64] = "";

	snprintf(path, sizeof(path), "/proc/%d/task/%d/children", (int)keeper,
	    (int)keeper);
	slurp(path, buf, sizeof(buf));
	return (pid_t)atoi(buf);
}

static double
run_restart(int mode)
{
	char snap[256], sock[256], bin[256], out[256], cmd[1024], text[4096];
	char *argv[] = { (char *)vmm, "run", sock, snap, "--regions", "32,16,16",
		"--stress", "6", "--threads", "4", NULL };
	char *hargv[] = { bin, "--threads", "4", sock, snap, NULL };
	const char *at;
	pid_t h, v;
	int st, ok;

	snprintf(snap, sizeof(snap), "%s/restart.mem", dir);
	snprintf(sock, sizeof(sock), "%s/restart.sock", dir);
	snprintf(bin, sizeof(bin), "%s/restart-bin", dir);
	snprintf(out, sizeof(out), "%s/restart.out", dir);
	snprintf(cmd, sizeof(cmd), "cp %s %s.new && mv %s.new %s", handler, bin,
	    bin, bin);
	if (system(cmd) != 0)
		return -1;
	h = start_handler(hargv, sock);
	v = spawn(argv, out, "/dev/null");
	for (int i = 0; mode > 0 && i < (mode == 1 ? 4 : 2); i++) {
		sleep((unsigned)mode);
		if (mode == 1 && server_of(h) > 0)
			kill(server_of(h), SIGKILL);
		if (mode == 2 && system(cmd) == 0)
			kill(h, SIGUSR2);
	}
	waitpid(v, &st, 0);
	ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
	waitpid(h, &st, 0);
	slurp(out, text, sizeof(text));
	if (!ok || !WIFEXITED(st) || WEXITSTATUS(st) != 0 ||
	    (at = strstr(text, "touches: max ")) == NULL) {
		fprintf(stderr, "bench: restarts, %s: the VM failed\n",
		    restart_modes[mode]);
		return -1;
	}
	return atof(at + 13);
}

static void
print_restarts(void)
{
	printf("\nrestarts: the stress oracle, 4 vCPUs, --threads 4, 6 s; the "
	    "VM's longest touch, median of %d:\n", reps);
	for (int m = 0; m < 3; m++)
		printf("  %-16s %8.0f us\n", restart_modes[m], restart_med[m]);
}

static int
selected(const char *name, char **pats, int n)
{
	for (int i = 0; i < n; i++)
		if (fnmatch(pats[i], name, 0) == 0)
			return 1;
	return n == 0;
}

/* Sections too long for the default run: only when named. */
static int
named(const char *name, char **pats, int n)
{
	return n > 0 && selected(name, pats, n);
}

/* The working set uffd_rec replays: one untimed ws10 run with --record. */
static int
record_ws10(void)
{
	char cmd[1024];

	snprintf(cmd, sizeof(cmd), "rm -f %s/bench.sock; %s --record %s/ws10.rec "
	    "%s/bench.sock %s/snap.mem >/dev/null 2>%s/record.err & sleep 0.5; "
	    "%s bench %s/bench.sock %s/snap.mem --regions 512,256,256 --workload "
	    "ws10 --threads 2 >/dev/null && wait", dir, handler, dir, dir, dir, dir,
	    vmm, dir, dir);
	return system(cmd);
}

static int
make_snapshots(void)
{
	char cmd[1024];

	snprintf(cmd, sizeof(cmd), "mkdir -p %s && { [ -f %s/snap.mem ] || %s mksnap "
	    "%s/snap.mem --regions 512,256,256; } && { [ -f %s/half.mem ] || %s "
	    "mksnap %s/half.mem --regions 128,64,64 --zero-every 2; } && "
	    "{ [ -f %s/restart.mem ] || %s mksnap %s/restart.mem --regions "
	    "32,16,16; }", dir, dir, vmm, dir, dir, vmm, dir, dir, vmm, dir);
	return system(cmd);
}

int
main(int argc, char **argv)
{
	char mach[512];
	int c;

	while ((c = getopt(argc, argv, "r:o:H:t:d:")) != -1) {
		if (c == 'r' && atoi(optarg) > 0 && atoi(optarg) <= MAXREP)
			reps = atoi(optarg);
		else if (c == 'o')
			dir = optarg;
		else if (c == 'H')
			handler = optarg;
		else if (c == 't' && atoi(optarg) > 0)
			threads_n = optarg;
		else if (c == 'd' && atol(optarg) >= 0)
			slow_delay_us = atol(optarg);
		else {
			fprintf(stderr, "usage: bench [-r REPS (1-%d)] [-o DIR] "
			    "[-H HANDLER] [-t N] [-d US] [WORKLOAD...]\n", MAXREP);
			return 2;
		}
	}
	many = selected("many", argv + optind, argc - optind);
	chain = selected("chain", argv + optind, argc - optind);
	threads_exp = selected("threads", argv + optind, argc - optind);
	restarts = named("restarts", argv + optind, argc - optind);
	storage[0].selected = selected("cold", argv + optind, argc - optind);
	storage[1].selected = named("slow", argv + optind, argc - optind);
	for (int i = 0; i < NW; i++) {
		work[i].selected = selected(work[i].name, argv + optind, argc - optind);
		if (work[i].selected && strcmp(work[i].name, "kvm") == 0 &&
		    access("/dev/kvm", R_OK | W_OK) != 0) {
			fprintf(stderr, "bench: skipping kvm: no usable /dev/kvm\n");
			work[i].selected = 0;
		}
		if (work[i].selected && work[i].cold && geteuid() != 0)
			fprintf(stderr, "bench: %s: not root, the page cache cannot be "
			    "dropped; this run is warm\n", work[i].name);
	}
	if (make_snapshots() != 0 || (chain && make_chain() != 0))
		return 1;
	machine(mach, sizeof(mach));
	if ((workload("ws10")->selected || threads_exp) && record_ws10() != 0)
		return 1;
	for (int i = 0; i < 2; i++)
		if (storage[i].selected && storage_setup(&storage[i]) != 0)
			return 1;
	for (int r = 0; r < reps; r++)
		for (int i = 0; i < NW; i++)
			for (int b = 0; work[i].selected && b < NB; b++) {
				if (b >= NB_ALL && strcmp(work[i].name, "ws10") != 0)
					continue;
				fprintf(stderr, "\rbench: run %d/%d, %-13s %-6s", r + 1, reps,
				    work[i].name, backends[b]);
				if (run_one(&work[i], b, r) < 0)
					return 1;
			}
	for (int r = 0; many && r < reps; r++)
		for (int k = 0; k < 3; k++) {
			fprintf(stderr, "\rbench: run %d/%d, %2d VMs at once       ",
			    r + 1, reps, many_counts[k]);
			if ((many_mibs[k][r] = run_many(many_counts[k])) < 0)
				return 1;
		}
	for (int r = 0; chain && r < reps; r++) {
		fprintf(stderr, "\rbench: run %d/%d, chain               ", r + 1, reps);
		if (run_chain(r) < 0)
			return 1;
	}
	for (int r = 0; threads_exp && r < reps; r++)
		if (run_threads(r) < 0)
			return 1;
	for (int r = 0; r < reps; r++)
		for (int i = 0; i < 2; i++)
			if (storage[i].selected && storage_rep(&storage[i], r) < 0)
				return 1;
	for (int r = 0; restarts && r < reps; r++)
		for (int m = 0; m < 3; m++) {
			fprintf(stderr, "\rbench: run %d/%d, restarts: %-16s", r + 1,
			    reps, restart_modes[m]);
			if ((restart_us[m][r] = run_restart(m)) < 0)
				return 1;
		}
	for (int m = 0; restarts && m < 3; m++) {
		qsort(restart_us[m], (size_t)reps, sizeof(double), cmp_double);
		restart_med[m] = restart_us[m][reps / 2];
	}
	slowfs_stop();
	fprintf(stderr, "\n");
	for (int i = 0; i < 2; i++)
		if (storage[i].selected)
			storage_medians(&storage[i]);
	for (int m = 0; threads_exp && m < 2; m++)
		for (int k = 0; k < NTH; k++) {
			qsort(th_v[m][k], (size_t)reps, sizeof(double), cmp_double);
			th_med[m][k] = th_v[m][k][reps / 2];
		}
	for (int a = 0; chain && a < 2; a++)
		for (int k = 0; k < NCH; k++) {
			qsort(chain_ms[a][k], (size_t)reps, sizeof(double), cmp_double);
			chain_med[a][k] = chain_ms[a][k][reps / 2];
		}
	for (int k = 0; many && k < 3; k++) {
		qsort(many_mibs[k], (size_t)reps, sizeof(double), cmp_double);
		many_med[k] = many_mibs[k][reps / 2];
	}
	for (int i = 0; i < NW; i++)
		if (work[i].selected)
			medians(&work[i]);
	write_json(mach);
	write_svg(mach);
	for (c = 0; c < NW && !work[c].selected; c++)
		;
	if (c < NW)
		print_table(mach);
	else
		printf("\n%s\n", mach);
	if (many)
		print_many();
	if (chain)
		print_chain();
	if (threads_exp)
		print_threads();
	if (restarts)
		print_restarts();
	for (int i = 0; i < 2; i++)
		if (storage[i].selected)
			print_storage(&storage[i]);
	printf("\nwrote %s/results.json and %s/results.svg\n", dir, dir);
	return 0;
}
