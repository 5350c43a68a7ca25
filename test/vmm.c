/*
 * vmm - plays Firecracker's side of a Uffd snapshot restore, for tests.
 *
 *   vmm mksnap FILE [--regions MIB,MIB,...] [--hotplug [--slot KIB]]
 *   vmm run SOCKET FILE [options]
 *   vmm mkdiff BASE OUT [--dirty PCT] [--seed N]
 *   vmm merge OUT BASE [DIFF...]
 *
 * mksnap writes a memory file: pseudo-random pages, every fifth page all
 * zero, the last quarter of the last region a sparse hole, and in region 0
 * the page tables and code of a tiny long-mode guest. With --hotplug the
 * last region's never-plugged slots (see the oracle mode) are holes too.
 *
 * run restores it the way Firecracker does (persist.rs,
 * guest_memory_from_uffd): each region its own MAP_PRIVATE|MAP_ANONYMOUS|
 * MAP_NORESERVE mapping, a userfaultfd opened O_CLOEXEC|O_NONBLOCK (not
 * user-mode-only) with only UFFD_FEATURE_EVENT_REMOVE, every region
 * registered for missing faults, then one connect and one sendmsg of the JSON
 * mappings with the uffd as SCM_RIGHTS. It then faults the memory in from
 * threads or from KVM vCPUs and checks every byte against the file.
 * The oracle mode (--access, --write, --balloon none, --layout, --slot)
 * keeps every page's exact expected content while threads touch it, a
 * balloon removes ranges and slots of a hotplug region come and go.
 * Exit: 0 verified, 1 a byte was wrong (or a fault was never served),
 * 2 usage or setup error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>

#define MIB		((uint64_t)1 << 20)
#define GIB		((uint64_t)1 << 30)
#define PAGE		((uint64_t)4096)
#define HUGE		(2 * MIB)
#define MAX_REGIONS	64
#define KVM_REGIONS	4		/* the guest identity-maps 4 GiB */
#define CODE_GPA	0x8000ull
#define SLOT_GPA	0x9000ull
#define DATA_GPA	0x10000ull	/* region 0 bytes below this are the guest's */
#define CHUNK		MIB		/* unit of work for threads and vCPUs */

extern const char guest_code_start[], guest_code_end[];

struct layout {
	int n;
	uint64_t size[MAX_REGIONS], off[MAX_REGIONS], gpa[MAX_REGIONS];
	uint64_t total;
};

static struct {
	struct layout l;
	const char *socket, *file;
	int gen;			/* handshake generation 1, 2, 3 */
	int keep_open;			/* -1: as the generation did */
	int threads;
	int huge;
	int kvm;
	const char *balloon;		/* NULL, "after", "during" */
	int crash;			/* SIGKILL itself midway */
	int stray;			/* fault outside the handshake's regions */
	const char *raw;		/* send this instead of the mappings */
	int nofd, extra_fds, split;
	int linger;			/* seconds to stay alive after checking */
	int pad;			/* pad the handshake with unknown fields */
	int stress;			/* seconds of random faults and removes */
	const char *backend, *workload;	/* bench mode */
	int zero_every;			/* mksnap: every Nth page all zero */
	int delay;			/* ms between handshake and first touch */
	long uid;			/* run as this uid once the uffd exists */
	int oracle;			/* an oracle-mode option was given */
	const char *access;		/* oracle mode: seq, rand, ws10 */
	int write;			/* oracle mode: touches write */
	const char *layout;		/* one, split, hotplug (NULL: one) */
	uint64_t slot;			/* bytes: split pieces, hotplug slots */
	int hotplug;			/* mksnap: never-plugged slots are holes */
	uint64_t limit;			/* oracle mode: bytes of guest memory used */
	int touched_only;		/* oracle mode: the end checks those only */
	int dirty, seed;		/* mkdiff: percent of pages, which ones */
} o = { .gen = 3, .keep_open = -1, .threads = 4, .uid = -1, .backend = "uffd",
	.workload = "seqread", .zero_every = 5, .slot = 2048 * 1024, .dirty = 10 };

static const char *snap;		/* the memory file, mapped */
static char *host[MAX_REGIONS];		/* guest memory in this process */
static atomic_uint_fast64_t checked, zeros_seen, bad;

static void __attribute__((noreturn, format(printf, 1, 2)))
die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "vmm: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	exit(2);
}

/* "8,4,4": sizes in MiB; "64x1": 64 regions of 1 MiB. */
static void
parse_regions(const char *arg)
{
	char *copy = strdup(arg), *tok, *save = NULL, *x;

	o.l.n = 0;
	o.l.total = 0;
	for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		uint64_t count = 1, mib = strtoull(tok, &x, 10);

		if (*x == 'x') {
			count = mib;
			mib = strtoull(x + 1, NULL, 10);
		}
		for (; count > 0; count--) {
			if (o.l.n == MAX_REGIONS || mib == 0 || mib > 1024)
				die("--regions: up to %d sizes in MiB, 1..1024",
				    MAX_REGIONS);
			o.l.size[o.l.n] = mib * MIB;
			o.l.off[o.l.n] = o.l.total;
			o.l.gpa[o.l.n] = (uint64_t)o.l.n * GIB;
			o.l.total += mib * MIB;
			o.l.n++;
		}
	}
	free(copy);
}

static uint64_t
mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static int
layout_is(const char *name)
{
	return strcmp(o.layout ? o.layout : "one", name) == 0;
}

/*
 * The hotplug region is the last one, cut into slots of --slot bytes, as
 * Firecracker adds a virtio-mem region after DRAM. Slots whose index % 3
 * == 1 were never plugged: PROT_NONE from the start, holes in the file.
 */
static int
slot_born_unplugged(uint64_t s)
{
	return s % 3 == 1;
}

static uint64_t
slot_count(void)
{
	return (o.l.size[o.l.n - 1] + o.slot - 1) / o.slot;
}

/* The slot holding page p of the hotplug region, or -1 outside it. */
static int64_t
slot_of_page(uint64_t p)
{
	uint64_t base = o.l.off[o.l.n - 1];

	return p * PAGE < base ? -1 : (int64_t)((p * PAGE - base) / o.slot);
}

/* Page p of the file: a hole, all zero, or data. */
static int
page_kind(uint64_t p)
{
	const struct layout *l = &o.l;
	uint64_t last = (uint64_t)l->n - 1;
	uint64_t hole = l->off[last] + l->size[last] - l->size[last] / 4;

	if (p * PAGE >= hole)
		return 'h';
	if (o.hotplug && slot_of_page(p) >= 0 &&
	    slot_born_unplugged((uint64_t)slot_of_page(p)))
		return 'h';
	if (p % (uint64_t)o.zero_every == 3 % (uint64_t)o.zero_every &&
	    p * PAGE >= DATA_GPA)
		return 'z';
	return 'd';
}

/* Identity-maps the first 4 GiB with 2 MiB pages: PML4, PDPT, four PDs. */
static void
write_guest(int fd)
{
	static uint64_t pt[7][512];

	pt[1][0] = 0x2000 | 3;
	for (uint64_t i = 0; i < 4; i++) {
		pt[2][i] = (0x3000 + i * 0x1000) | 3;
		for (uint64_t j = 0; j < 512; j++)
			pt[3 + i][j] = (i * GIB + j * HUGE) | 0x83;
	}
	if (pwrite(fd, pt, sizeof(pt), 0) != (ssize_t)sizeof(pt) ||
	    pwrite(fd, guest_code_start, (size_t)(guest_code_end - guest_code_start),
	    CODE_GPA) < 0)
		die("writing the guest: %s", strerror(errno));
}

static int
mksnap(const char *path)
{
	static uint64_t page[PAGE / 8];
	uint64_t npages = o.l.total / PAGE, counts[3] = { 0 };
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

	if (fd < 0)
		die("open(%s): %s", path, strerror(errno));
	for (uint64_t p = 0; p < npages; p++) {
		int k = page_kind(p);

		if (k == 'h') {
			counts[2]++;
			continue;
		}
		for (size_t w = 0; w < PAGE / 8; w++)
			page[w] = k == 'z' ? 0 : mix(p * 512 + w);
		counts[k == 'z']++;
		if (pwrite(fd, page, PAGE, (off_t)(p * PAGE)) != (ssize_t)PAGE)
			die("pwrite(%s): %s", path, strerror(errno));
	}
	write_guest(fd);
	if (ftruncate(fd, (off_t)o.l.total) < 0 || close(fd) < 0)
		die("ftruncate(%s): %s", path, strerror(errno));
	printf("snapshot %s: %d regions, %" PRIu64 " MiB: %" PRIu64 " data pages, "
	    "%" PRIu64 " zero pages, %" PRIu64 " pages of sparse hole", path,
	    o.l.n, o.l.total / MIB, counts[0], counts[1], counts[2]);
	if (o.hotplug)
		printf(" (with the never-plugged %" PRIu64 " KiB slots of the last "
		    "region)", o.slot / 1024);
	printf("\n");
	return 0;
}

/*
 * The restore, as Firecracker does it.
 */

static void
map_regions(void)
{
	uint64_t gap = HUGE, span = 0;
	char *area;

	for (int i = 0; i < o.l.n; i++)
		span += o.l.size[i] + gap;
	/* Reserve, then place each region with a hole after it: regions are
	 * separate mappings, never adjacent. */
	area = mmap(NULL, span + HUGE, PROT_NONE,
	    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (area == MAP_FAILED)
		die("mmap(reserve): %s", strerror(errno));
	area = (char *)(((uintptr_t)area + HUGE - 1) & ~(HUGE - 1));
	for (int i = 0; i < o.l.n; i++) {
		int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED;

		if (o.huge)
			flags |= MAP_HUGETLB | (21 << MAP_HUGE_SHIFT);
		host[i] = mmap(area, o.l.size[i], PROT_READ | PROT_WRITE, flags, -1, 0);
		if (host[i] == MAP_FAILED)
			die("mmap(region %d, %" PRIu64 " bytes%s): %s", i, o.l.size[i],
			    o.huge ? ", hugetlb" : "", strerror(errno));
		area += o.l.size[i] + gap;
	}
}

static void
uffd_register(int uffd, void *addr, uint64_t len)
{
	struct uffdio_register reg = {
		.range = { (uintptr_t)addr, len },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};

	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
		die("UFFDIO_REGISTER(%p, %" PRIu64 "): %s", addr, len, strerror(errno));
}

static int
create_uffd(void)
{
	struct uffdio_api api = { .api = UFFD_API,
	    .features = UFFD_FEATURE_EVENT_REMOVE };
	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

	if (uffd < 0)
		die("userfaultfd: %s", strerror(errno));
	if (ioctl(uffd, UFFDIO_API, &api) < 0)
		die("UFFDIO_API: %s", strerror(errno));
	for (int i = 0; i < o.l.n; i++)
		uffd_register(uffd, host[i], o.l.size[i]);
	return uffd;
}

/*
 * Layouts. A region Firecracker maps as one VMA need not stay one: any
 * madvise or mprotect on part of it splits it, and the handler must still
 * serve every piece. --layout split cuts every region into --slot pieces
 * that differ only by MADV_NOHUGEPAGE on every other one (meaningless to
 * hugetlb, yet it splits hugetlb VMAs too); --layout hotplug protects the
 * hotplug region's never-plugged slots PROT_NONE, as Firecracker does.
 * Both after UFFDIO_REGISTER, as Firecracker registers at restore and
 * (un)plugs later; the registration stays on every piece.
 */

static uint64_t
piece_count(int r)
{
	return (o.l.size[r] + o.slot - 1) / o.slot;
}

/* Whether piece i of region r differs from the mapping as created. */
static int
piece_changed(int r, uint64_t i)
{
	if (layout_is("split"))
		return i % 2 == 1;
	if (layout_is("hotplug"))
		return r == o.l.n - 1 && slot_born_unplugged(i);
	return 0;
}

/* The VMAs region r must now be: one per run of alike pieces. */
static uint64_t
expected_vmas(int r)
{
	uint64_t runs = 1;

	for (uint64_t i = 1; i < piece_count(r); i++)
		runs += piece_changed(r, i) != piece_changed(r, i - 1);
	return runs;
}

/* Bytes in piece i of region r: the last one may be short. */
static uint64_t
piece_len(int r, uint64_t i)
{
	uint64_t left = o.l.size[r] - i * o.slot;

	return left < o.slot ? left : o.slot;
}

static void
shape_region(int r)
{
	for (uint64_t i = 0; i < piece_count(r); i++) {
		char *at = host[r] + i * o.slot;
		size_t len = (size_t)piece_len(r, i);

		if (!piece_changed(r, i))
			continue;
		if (layout_is("split") && madvise(at, len, MADV_NOHUGEPAGE) < 0)
			die("madvise(region %d piece %" PRIu64 ", NOHUGEPAGE): %s", r,
			    i, strerror(errno));
		if (layout_is("hotplug") && mprotect(at, len, PROT_NONE) < 0)
			die("mprotect(region %d slot %" PRIu64 ", NONE): %s", r, i,
			    strerror(errno));
	}
}

/* Counts region r's VMAs in smaps, and those whose VmFlags lack "um"
 * (registered for missing faults). */
static uint64_t
count_vmas(int r, uint64_t *unregistered)
{
	uintptr_t lo = (uintptr_t)host[r], hi = lo + o.l.size[r];
	FILE *f = fopen("/proc/self/smaps", "re");
	char line[512];
	int inside = 0;
	uint64_t n = 0;

	if (f == NULL)
		die("/proc/self/smaps: %s", strerror(errno));
	*unregistered = 0;
	while (fgets(line, sizeof(line), f)) {
		unsigned long start, end;

		if (sscanf(line, "%lx-%lx ", &start, &end) == 2) {
			inside = start < hi && end > lo;
			n += (uint64_t)inside;
		} else if (inside && strncmp(line, "VmFlags:", 8) == 0 &&
		    strstr(line, " um") == NULL) {
			(*unregistered)++;
		}
	}
	fclose(f);
	return n;
}

/* The test is only worth its name if the kernel really split the VMAs. */
static void
verify_layout(void)
{
	for (int r = 0; r < o.l.n; r++) {
		uint64_t unregistered, n = count_vmas(r, &unregistered);

		if (layout_is("split") && expected_vmas(r) < 2)
			die("--layout split: region %d (%" PRIu64 " KiB) is not larger "
			    "than a slot (%" PRIu64 " KiB): nothing to split", r,
			    o.l.size[r] / 1024, o.slot / 1024);
		if (n != expected_vmas(r))
			die("--layout %s: region %d is %" PRIu64 " VMAs in /proc/self/smaps, "
			    "expected %" PRIu64 ": the kernel did not split it as asked",
			    o.layout, r, n, expected_vmas(r));
		if (unregistered)
			die("--layout %s: %" PRIu64 " of region %d's VMAs lost their uffd "
			    "registration", o.layout, unregistered, r);
	}
}

/* Never-plugged slots must be holes, or the test would expect data where
 * the guest can only see zeros. */
static void
check_hotplug_snapshot(void)
{
	int r = o.l.n - 1;

	if (slot_count() < 2)
		die("--layout hotplug: the last region (%" PRIu64 " KiB) needs at least "
		    "two slots of %" PRIu64 " KiB", o.l.size[r] / 1024, o.slot / 1024);
	for (uint64_t s = 1; s < slot_count(); s++) {
		const char *at = snap + o.l.off[r] + s * o.slot;

		for (uint64_t b = 0; slot_born_unplugged(s) && b < piece_len(r, s); b++)
			if (at[b] != 0)
				die("%s: never-plugged slot %" PRIu64 " of the hotplug region "
				    "holds data: make it with mksnap --hotplug --slot %" PRIu64,
				    o.file, s, o.slot / 1024);
	}
}

static void
shape_layout(void)
{
	if (layout_is("hotplug"))
		check_hotplug_snapshot();
	for (int r = 0; r < o.l.n; r++)
		shape_region(r);
	verify_layout();
}

/* Unknown fields of every JSON type and blanks, as a future VMM may send. */
static const char pad[] = "\n\t\"gpa_start\" : 1099511627776 ,\r\n"
	"\t\"is_guest_memfd\" : false , \"slot\" : null , \"ratio\" : -1.5e-3 ,"
	" \"name\" : \"dram \\\"0\\\" \\u00e9\" , \"flags\" : [ true , [ ] , { } ] ,"
	" \"nested\" : { \"a\" : { \"b\" : [ 1 , 2.0 , \"3\" ] } } ,  ";

/* The mappings as Firecracker's GuestRegionUffdMapping serializes them. */
static size_t
mappings_json(char *buf, size_t cap)
{
	uint64_t ps = o.huge ? HUGE : PAGE;
	size_t n = 0;

	n += (size_t)snprintf(buf + n, cap - n, "[");
	for (int i = 0; i < o.l.n; i++) {
		if (o.pad)
			n += (size_t)snprintf(buf + n, cap - n, "%s{%s", i ? " ,\n " :
			    "  ", pad);
		n += (size_t)snprintf(buf + n, cap - n, "%s%s\"base_host_virt_addr\":%"
		    PRIu64 ",\"size\":%" PRIu64 ",\"offset\":%" PRIu64,
		    i && !o.pad ? "," : "", o.pad ? "" : "{",
		    (uint64_t)(uintptr_t)host[i], o.l.size[i], o.l.off[i]);
		if (o.gen == 3)
			n += (size_t)snprintf(buf + n, cap - n, ",\"page_size\":%" PRIu64, ps);
		if (o.gen >= 2)
			n += (size_t)snprintf(buf + n, cap - n, ",\"page_size_kib\":%"
			    PRIu64, ps);
		n += (size_t)snprintf(buf + n, cap - n, "}");
	}
	n += (size_t)snprintf(buf + n, cap - n, "]");
	return n;
}

static void
send_part(int sock, const char *data, size_t len, const int *fds, int nfds)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * 4)];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = { (void *)data, len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

	if (nfds > 0) {
		struct cmsghdr *c;

		mh.msg_control = ctl.b;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
	}
	if (sendmsg(sock, &mh, MSG_NOSIGNAL) < 0)
		die("sendmsg: %s", strerror(errno));
}

/*
 * One sendmsg, as Firecracker; --split sends the message in that many
 * pieces 50 ms apart (the fd with the first), as a stream may deliver it.
 */
static int
handshake(int uffd)
{
	static char buf[256 * 1024];
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int fds[4] = { uffd, -1, -1, -1 }, nfds = o.nofd ? 0 : 1 + o.extra_fds;
	size_t len, done = 0, parts = o.split > 1 ? (size_t)o.split : 1;
	int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	for (int i = 1; i < nfds; i++)
		fds[i] = open("/dev/null", O_RDONLY | O_CLOEXEC);
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", o.socket);
	if (connect(sock, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("connect(%s): %s", o.socket, strerror(errno));
	printf("connected\n");
	fflush(stdout);
	len = o.raw ? strlen(o.raw) : mappings_json(buf, sizeof(buf));
	printf("handshake: %zu bytes\n", len);
	if (o.raw)
		memcpy(buf, o.raw, len + 1);
	for (size_t i = 0; i < parts; i++) {
		size_t end = i + 1 == parts ? len : len * (i + 1) / parts;

		send_part(sock, buf + done, end - done, fds, i == 0 ? nfds : 0);
		done = end;
		if (i + 1 < parts)
			usleep(50000);
	}
	for (int i = 1; i < nfds; i++)
		close(fds[i]);
	if (o.keep_open == 0 || (o.keep_open < 0 && o.gen < 3)) {
		close(sock);
		return -1;
	}
	return sock;
}

/*
 * Checking memory. Every page is compared with the file; removed pages
 * must read as zero; pages a thread wrote must hold its write.
 */

static int
page_ballooned(uint64_t p)
{
	/* 64 KiB of every 448 KiB, also across 2 MiB when pages are huge. */
	uint64_t unit = o.huge ? HUGE : 16 * PAGE;

	return o.balloon && (p * PAGE / unit) % 7 == 3;
}

static void
check_page(int r, uint64_t off, int expect_zero)
{
	const uint64_t *got = (const uint64_t *)(host[r] + off);
	const uint64_t *want = (const uint64_t *)(snap + o.l.off[r] + off);
	int zero = 1;

	for (size_t w = 0; w < PAGE / 8; w++) {
		uint64_t exp = expect_zero ? 0 : want[w];

		if (got[w] != exp && atomic_fetch_add(&bad, 1) < 5)
			fprintf(stderr, "vmm: region %d offset 0x%" PRIx64 " word %zu: "
			    "0x%016" PRIx64 ", expected 0x%016" PRIx64 "%s\n", r, off, w,
			    got[w], exp, expect_zero ? " (removed page)" : "");
		zero &= got[w] == 0;
	}
	atomic_fetch_add(&checked, 1);
	if (zero)
		atomic_fetch_add(&zeros_seen, 1);
}

/* Writes through a fault, then checks the page holds file data plus it. */
static void
write_page(int r, uint64_t off)
{
	volatile uint64_t *w = (volatile uint64_t *)(host[r] + off);
	uint64_t want = ((const uint64_t *)(snap + o.l.off[r] + off))[1];

	w[1] = ~want;
	if (w[1] != ~want)
		atomic_fetch_add(&bad, 1);
	w[1] = want;
}

struct worker {
	pthread_t t;
	int id;
	uint64_t limit;			/* pages to touch before a crash */
};

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000 + (uint64_t)ts.tv_nsec;
}

/* The region holding file offset off: regions lie back to back. */
static int
region_of(uint64_t off)
{
	int r = 0;

	while (off >= o.l.off[r] + o.l.size[r])
		r++;
	return r;
}

/* Chunk c of the whole memory: its region and offset in it. */
static void
chunk_at(uint64_t c, int *r, uint64_t *off)
{
	*r = region_of(c * CHUNK);
	*off = c * CHUNK - o.l.off[*r];
}

static void
touch_chunk(int r, uint64_t off, int skip_ballooned, uint64_t *left)
{
	for (uint64_t p = off / PAGE; p < (off + CHUNK) / PAGE; p++) {
		uint64_t gp = o.l.off[r] / PAGE + p;

		if (skip_ballooned && page_ballooned(gp))
			continue;
		if (gp % 11 == 0)
			write_page(r, p * PAGE);
		check_page(r, p * PAGE, 0);
		if (o.crash && --*left == 0)
			kill(getpid(), SIGKILL);
	}
}

static void *
worker_main(void *arg)
{
	struct worker *w = arg;
	uint64_t nchunks = o.l.total / CHUNK, left = w->limit;

	for (uint64_t i = (uint64_t)w->id; i < nchunks; i += (uint64_t)o.threads) {
		uint64_t c = (i * 7919) % nchunks, off;
		int r;

		chunk_at(c, &r, &off);
		touch_chunk(r, off, o.balloon != NULL, &left);
	}
	return NULL;
}

/* Discards the balloon's pages, rounds times, checking each reads zero. */
static void
remove_pages(int rounds)
{
	uint64_t unit = o.huge ? HUGE : 16 * PAGE;

	while (rounds-- > 0) {
		for (int r = 0; r < o.l.n; r++)
			for (uint64_t off = 0; off < o.l.size[r]; off += unit) {
				if (!page_ballooned((o.l.off[r] + off) / PAGE))
					continue;
				if (madvise(host[r] + off, unit, MADV_DONTNEED) < 0)
					die("madvise(DONTNEED): %s", strerror(errno));
				check_page(r, off, 1);
			}
	}
}

static void *
balloon_main(void *arg)
{
	(void)arg;
	remove_pages(20);
	return NULL;
}

static void
check_ballooned(void)
{
	for (int r = 0; r < o.l.n; r++)
		for (uint64_t off = 0; off < o.l.size[r]; off += PAGE)
			if (page_ballooned((o.l.off[r] + off) / PAGE))
				check_page(r, off, 1);
}

static int
run_threads(void)
{
	struct worker w[64];
	pthread_t balloon;
	int n = o.threads;

	if (o.balloon && strcmp(o.balloon, "after") == 0) {
		/* Touch everything (the balloon pages too), then discard. */
		uint64_t left = UINT64_MAX;

		for (uint64_t c = 0; c < o.l.total / CHUNK; c += 2) {
			int r;
			uint64_t off;

			chunk_at(c, &r, &off);
			touch_chunk(r, off, 0, &left);
		}
		remove_pages(1);
	}
	if (o.balloon && strcmp(o.balloon, "during") == 0)
		pthread_create(&balloon, NULL, balloon_main, NULL);
	for (int i = 0; i < n; i++) {
		w[i].id = i;
		w[i].limit = o.crash ? o.l.total / PAGE / 3 / (uint64_t)n + 1 : UINT64_MAX;
		pthread_create(&w[i].t, NULL, worker_main, &w[i]);
	}
	for (int i = 0; i < n; i++)
		pthread_join(w[i].t, NULL);
	if (o.balloon && strcmp(o.balloon, "during") == 0)
		pthread_join(balloon, NULL);
	if (o.balloon)
		check_ballooned();
	return 0;
}

/*
 * KVM mode: vCPUs hash guest memory, so KVM takes the faults from kernel
 * mode (through get_user_pages), as in a real restore.
 */

struct vcpu {
	pthread_t t;
	int id, fd;
	struct kvm_run *run;
	uint64_t jobs, mismatches;
};

static int kvm_fd, vm_fd;

static uint64_t
expected_hash(int r, uint64_t off, uint64_t len)
{
	const uint64_t *q = (const uint64_t *)(snap + o.l.off[r] + off);
	uint64_t h = 0, gpa = o.l.gpa[r] + off;

	for (uint64_t i = 0; i < len / 8; i++, gpa += 8) {
		h = (h << 5) | (h >> 59);
		h ^= q[i];
		h += gpa;
	}
	return h;
}

static void
vcpu_setup(struct vcpu *v)
{
	struct kvm_sregs sr;
	struct kvm_segment cs = { .base = 0, .limit = 0xffffffff, .selector = 8,
	    .type = 11, .present = 1, .s = 1, .l = 1, .g = 1 };
	struct kvm_segment ds = { .base = 0, .limit = 0xffffffff, .selector = 16,
	    .type = 3, .present = 1, .s = 1, .db = 1, .g = 1 };
	struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[128]; } cpuid = {
		.c.nent = 128 };
	int sz = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);

	if ((v->fd = ioctl(vm_fd, KVM_CREATE_VCPU, v->id)) < 0)
		die("KVM_CREATE_VCPU: %s", strerror(errno));
	if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, &cpuid) == 0)
		ioctl(v->fd, KVM_SET_CPUID2, &cpuid);
	v->run = mmap(NULL, (size_t)sz, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED || ioctl(v->fd, KVM_GET_SREGS, &sr) < 0)
		die("vCPU setup: %s", strerror(errno));
	sr.cr3 = 0x1000;
	sr.cr4 = 1 << 5;			/* PAE */
	sr.cr0 = 0x80050033;			/* PG WP NE ET MP PE */
	sr.efer = 0x500;			/* LMA LME */
	sr.cs = cs;
	sr.ds = sr.es = sr.fs = sr.gs = sr.ss = ds;
	if (ioctl(v->fd, KVM_SET_SREGS, &sr) < 0)
		die("KVM_SET_SREGS: %s", strerror(errno));
}

static uint64_t
vcpu_hash(struct vcpu *v, uint64_t gpa, uint64_t len)
{
	struct kvm_regs regs = { .rip = CODE_GPA, .rflags = 2, .rsi = gpa,
	    .rcx = len, .rdx = SLOT_GPA + 8 * (uint64_t)v->id };

	if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS: %s", strerror(errno));
	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0 && errno != EINTR)
			die("KVM_RUN: %s", strerror(errno));
		if (v->run->exit_reason == KVM_EXIT_IO)
			break;
		if (v->run->exit_reason != KVM_EXIT_INTR)
			die("vCPU %d: unexpected exit %u", v->id, v->run->exit_reason);
	}
	if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
		die("KVM_GET_REGS: %s", strerror(errno));
	return regs.rax;
}

static void *
vcpu_main(void *arg)
{
	struct vcpu *v = arg;
	uint64_t nchunks = o.l.total / CHUNK;

	for (uint64_t c = (uint64_t)v->id; c < nchunks; c += (uint64_t)o.threads) {
		uint64_t off, start, got, slot;
		int r;

		chunk_at(c, &r, &off);
		start = r == 0 && off < DATA_GPA ? DATA_GPA : off;
		got = vcpu_hash(v, o.l.gpa[r] + start, off + CHUNK - start);
		memcpy(&slot, host[0] + SLOT_GPA + 8 * (uint64_t)v->id, 8);
		if (got != expected_hash(r, start, off + CHUNK - start) || slot != got) {
			fprintf(stderr, "vmm: vCPU %d: region %d chunk 0x%" PRIx64
			    ": guest hash 0x%" PRIx64 " (stored 0x%" PRIx64 "), "
			    "expected 0x%" PRIx64 "\n", v->id, r, off, got, slot,
			    expected_hash(r, start, off + CHUNK - start));
			v->mismatches++;
		}
		v->jobs++;
		atomic_fetch_add(&checked, (off + CHUNK - start) / PAGE);
		for (uint64_t p = start; p < off + CHUNK; p += PAGE)
			if (page_kind((o.l.off[r] + p) / PAGE) != 'd')
				atomic_fetch_add(&zeros_seen, 1);
	}
	return NULL;
}

static void
kvm_setup_vm(void)
{
	if ((kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)) < 0)
		die("open(/dev/kvm): %s", strerror(errno));
	if ((vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0)) < 0)
		die("KVM_CREATE_VM: %s", strerror(errno));
	for (int i = 0; i < o.l.n; i++) {
		struct kvm_userspace_memory_region m = { .slot = (uint32_t)i,
		    .guest_phys_addr = o.l.gpa[i], .memory_size = o.l.size[i],
		    .userspace_addr = (uintptr_t)host[i] };

		if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &m) < 0)
			die("KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));
	}
}

static int
run_kvm(void)
{
	struct vcpu v[16];
	uint64_t jobs = 0;

	kvm_setup_vm();
	for (int i = 0; i < o.threads; i++) {
		v[i] = (struct vcpu){ .id = i };
		vcpu_setup(&v[i]);
	}
	for (int i = 0; i < o.threads; i++)
		pthread_create(&v[i].t, NULL, vcpu_main, &v[i]);
	for (int i = 0; i < o.threads; i++) {
		pthread_join(v[i].t, NULL);
		jobs += v[i].jobs;
		bad += v[i].mismatches;
	}
	printf("kvm: %d vCPUs hashed %" PRIu64 " chunks of guest memory in long mode\n",
	    o.threads, jobs);
	return 0;
}

/*
 * The exact oracle, shared by --stress and the oracle mode: every 4 KiB
 * page has one expected content, the snapshot or zeros (once removed),
 * plus the last word a thread wrote into it. Locks striped over guest
 * memory keep it exact: whoever changes or checks a page holds its
 * stripe's lock, and a range takes its stripes in ascending order.
 */

struct page_oracle {
	uint8_t removed, written;
	uint64_t value;			/* at written_word() */
};

static struct page_oracle *oracle;
static pthread_mutex_t *stripe_lock;
static uint64_t stripe_pages;		/* pages per lock */
static uint64_t stress_end;		/* now_ns() when it stops */
static atomic_uint_fast64_t removes, writes;
/* Each touch's time: the pause a vCPU sees, as across a handler's restart. */
static atomic_uint_fast64_t touch_max_ns, touch_log2_us[16];

static uint64_t
next_rand(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/* Page p of the whole layout: its region and its address here. */
static char *
page_addr(uint64_t p, int *region)
{
	*region = region_of(p * PAGE);
	return host[*region] + (p * PAGE - o.l.off[*region]);
}

/* A prime, so the written word wanders across the page. */
static size_t
written_word(uint64_t p)
{
	return (size_t)(p % 509);
}

static void
init_oracle(uint64_t stripe_bytes)
{
	uint64_t npages = o.l.total / PAGE;
	uint64_t nstripes = (o.l.total + stripe_bytes - 1) / stripe_bytes;

	oracle = calloc(npages, sizeof(*oracle));
	stripe_lock = calloc(nstripes, sizeof(*stripe_lock));
	if (oracle == NULL || stripe_lock == NULL)
		die("calloc: %s", strerror(ENOMEM));
	stripe_pages = stripe_bytes / PAGE;
	for (uint64_t i = 0; i < nstripes; i++)
		pthread_mutex_init(&stripe_lock[i], NULL);
}

static void
lock_pages(uint64_t p, uint64_t n)
{
	for (uint64_t i = p / stripe_pages; i <= (p + n - 1) / stripe_pages; i++)
		pthread_mutex_lock(&stripe_lock[i]);
}

static void
unlock_pages(uint64_t p, uint64_t n)
{
	for (uint64_t i = p / stripe_pages; i <= (p + n - 1) / stripe_pages; i++)
		pthread_mutex_unlock(&stripe_lock[i]);
}

/* Pages [p, p + n) were given back: they read zero from now on. */
static void
oracle_removed(uint64_t p, uint64_t n)
{
	for (uint64_t i = p; i < p + n; i++)
		oracle[i] = (struct page_oracle){ .removed = 1 };
}

/* What word w of page p must hold, and why. */
static const char *
expected_word(uint64_t p, size_t w, uint64_t *want)
{
	const struct page_oracle *po = &oracle[p];

	if (po->written && w == written_word(p)) {
		*want = po->value;
		return "written";
	}
	*want = po->removed ? 0 : ((const uint64_t *)(snap + p * PAGE))[w];
	return po->removed ? "removed" : "snapshot";
}

/* Compares page p with the oracle; the caller holds its stripe. */
static void
check_oracle(uint64_t p, const char *when)
{
	const uint64_t *got;
	int r, zero = 1;

	got = (const uint64_t *)page_addr(p, &r);
	for (size_t w = 0; w < PAGE / 8; w++) {
		uint64_t want;
		const char *why = expected_word(p, w, &want);

		if (got[w] != want && atomic_fetch_add(&bad, 1) < 5)
			fprintf(stderr, "vmm: region %d offset 0x%" PRIx64 " word %zu: "
			    "0x%016" PRIx64 ", expected 0x%016" PRIx64 " (%s; checked %s)\n",
			    r, p * PAGE - o.l.off[r], w, got[w], want, why, when);
		zero &= got[w] == 0;
	}
	atomic_fetch_add(&checked, 1);
	if (zero)
		atomic_fetch_add(&zeros_seen, 1);
}

/*
 * A handler that strands a fault must fail the test, not hang it. The
 * oracle mode's runs take well under a second; 30 s also stays under
 * test/run's default VMM limit (60 s), so this message is what is seen.
 */
#define WATCHDOG_SECS	30

static void
on_alarm(int sig)
{
	static const char msg[] = "vmm: timed out: a fault was never served\n";

	(void)sig;
	(void)!write(STDERR_FILENO, msg, sizeof(msg) - 1);
	_exit(1);
}

static void
arm_watchdog(unsigned secs)
{
	signal(SIGALRM, on_alarm);
	alarm(secs);
}

/*
 * Stress: vCPU threads fault, read and write random pages while a balloon
 * thread keeps removing random chunks, touched or not: 64 KiB, or whole
 * 2 MiB pages on --huge. A stripe is one chunk.
 */

static uint64_t
stress_chunk(void)
{
	return o.huge ? HUGE : 16 * PAGE;
}

static void
note_touch(uint64_t ns)
{
	uint64_t us = ns / 1000, max = atomic_load(&touch_max_ns);
	int k = 0;

	while (ns > max && !atomic_compare_exchange_weak(&touch_max_ns, &max, ns))
		;
	while (us > 0 && k < 15) {
		us >>= 1;
		k++;
	}
	atomic_fetch_add(&touch_log2_us[k], 1);
}

static void *
stress_vcpu(void *arg)
{
	uint64_t seed = 0x9e3779b97f4a7c15ull * ((uintptr_t)arg + 1);
	uint64_t npages = o.l.total / PAGE, t0;

	while (now_ns() < stress_end) {
		uint64_t p = next_rand(&seed) % npages;
		int r;

		lock_pages(p, 1);
		t0 = now_ns();
		if (next_rand(&seed) % 4 == 0) {
			uint64_t v = next_rand(&seed);

			((volatile uint64_t *)page_addr(p, &r))[written_word(p)] = v;
			oracle[p].written = 1;
			oracle[p].value = v;
			atomic_fetch_add(&writes, 1);
		} else {
			(void)((volatile uint64_t *)page_addr(p, &r))[0];
		}
		note_touch(now_ns() - t0);
		check_oracle(p, "on touch");
		unlock_pages(p, 1);
	}
	return NULL;
}

static void *
stress_balloon(void *arg)
{
	uint64_t seed = 0x2545f4914f6cdd1dull, nchunks = o.l.total / stress_chunk();
	uint64_t n = stress_chunk() / PAGE;

	(void)arg;
	/* A third of the chunks, so the end state mixes snapshot pages,
	 * removed ones and writes to both. */
	while (now_ns() < stress_end) {
		uint64_t p0 = next_rand(&seed) % nchunks / 3 * 3 * n;
		int r;

		lock_pages(p0, n);
		if (madvise(page_addr(p0, &r), n * PAGE, MADV_DONTNEED) < 0)
			die("madvise(DONTNEED): %s", strerror(errno));
		oracle_removed(p0, n);
		unlock_pages(p0, n);
		atomic_fetch_add(&removes, 1);
		usleep(200);
	}
	return NULL;
}

static void
run_stress(void)
{
	uint64_t npages = o.l.total / PAGE, removed = 0, written = 0;
	pthread_t t[17];

	init_oracle(stress_chunk());
	arm_watchdog((unsigned)o.stress + 30);
	stress_end = now_ns() + (uint64_t)o.stress * 1000000000;
	for (int i = 0; i < o.threads; i++)
		pthread_create(&t[i], NULL, stress_vcpu, (void *)(uintptr_t)i);
	pthread_create(&t[o.threads], NULL, stress_balloon, NULL);
	for (int i = 0; i <= o.threads; i++)
		pthread_join(t[i], NULL);

	for (uint64_t p = 0; p < npages; p++) {
		check_oracle(p, "at the end");
		removed += oracle[p].removed;
		written += oracle[p].written;
	}
	printf("stress: %d s, %" PRIu64 " removes of %" PRIu64 " KiB, %" PRIu64
	    " writes; at the end %" PRIu64 " pages removed, %" PRIu64 " written\n",
	    o.stress, (uint64_t)removes, stress_chunk() / 1024, (uint64_t)writes,
	    removed, written);
	printf("touches: max %" PRIu64 " us; by 2^k us:", (uint64_t)touch_max_ns /
	    1000);
	for (int k = 0; k < 16; k++)
		printf(" %" PRIu64, (uint64_t)touch_log2_us[k]);
	printf("\n");
}

/*
 * Oracle mode: threads touch pages in a chosen order (reading, or writing
 * a word as the first access), a balloon removes fixed ranges, hotplug
 * slots are unplugged and plugged again, and every touch and, at the end,
 * every page is compared with the oracle. The touch unit is 4 KiB, also on
 * hugetlb.
 */

/* The pages in touch order: all in address order, all shuffled, or a
 * scattered tenth, shuffled. bench's workloads use the same orders. */
static uint64_t *
touch_order(const char *access, uint64_t *n)
{
	uint64_t total = o.l.total / PAGE, seed = 88172645463325252ull, k = 0;
	uint64_t *p = malloc(total * sizeof(*p));

	if (p == NULL)
		die("malloc: %s", strerror(ENOMEM));
	for (uint64_t i = 0; i < o.limit / PAGE; i++)
		if (strcmp(access, "ws10") != 0 || next_rand(&seed) % 10 == 0)
			p[k++] = i;
	if (strcmp(access, "seq") != 0)
		for (uint64_t i = k; i > 1; i--) {
			uint64_t j = next_rand(&seed) % i, t = p[i - 1];

			p[i - 1] = p[j];
			p[j] = t;
		}
	*n = k;
	return p;
}

static uint8_t *slot_plugged;		/* per hotplug slot; under its stripes */
static atomic_uint_fast64_t touches, skipped, plugs, unplugs;

/* Only a plugged page may be touched: PROT_NONE is SIGSEGV, not a fault. */
static int
page_plugged(uint64_t p)
{
	return !layout_is("hotplug") || slot_of_page(p) < 0 ||
	    slot_plugged[slot_of_page(p)];
}

static uint64_t
written_value(uint64_t p, uint64_t seed)
{
	return mix(p ^ seed);
}

/*
 * After the balloon took its ranges back ("after"), the second pass checks
 * that no removed page came back before the guest touched it: a handler
 * that installs removed pages ahead of a fault hands the guest memory it
 * gave back. Per page-size unit, at its first touch; not in a hotplug
 * region, whose plugging thread touches pages too.
 */
static atomic_uchar *unit_touched;	/* per 4 KiB or 2 MiB page, pass two */
static atomic_uint_fast64_t resident_removed;

static void
check_not_resident(uint64_t p)
{
	uint64_t unit = o.huge ? HUGE / PAGE : 1, u = p / unit;
	unsigned char v[HUGE / PAGE] = { 0 };
	int r;

	if (unit_touched == NULL || !oracle[p].removed ||
	    (layout_is("hotplug") && slot_of_page(p) >= 0) ||
	    atomic_exchange(&unit_touched[u], 1))
		return;
	if (mincore(page_addr(u * unit, &r), unit * PAGE, v) < 0)
		die("mincore: %s", strerror(errno));
	if ((v[0] & 1) && atomic_fetch_add(&resident_removed, 1) < 5)
		fprintf(stderr, "vmm: region %d offset 0x%" PRIx64 ": removed by the "
		    "balloon, yet present before the guest touched it again\n", r,
		    u * unit * PAGE - o.l.off[r]);
}

static void
touch_page(uint64_t p, uint64_t seed)
{
	int r;
	volatile uint64_t *page = (volatile uint64_t *)page_addr(p, &r);

	lock_pages(p, 1);
	check_not_resident(p);
	if (!page_plugged(p)) {
		atomic_fetch_add(&skipped, 1);
	} else {
		if (o.write) {
			page[written_word(p)] = written_value(p, seed);
			oracle[p].written = 1;
			oracle[p].value = written_value(p, seed);
		} else {
			(void)page[written_word(p)];
		}
		atomic_fetch_add(&touches, 1);
		check_oracle(p, "on touch");
	}
	unlock_pages(p, 1);
}

struct guest_thread {
	pthread_t t;
	const uint64_t *pages;
	uint64_t n, seed;
};

static void *
guest_thread_main(void *arg)
{
	struct guest_thread *g = arg;

	for (uint64_t i = 0; i < g->n; i++)
		touch_page(g->pages[i], g->seed);
	return NULL;
}

/* Thread i touches slice i of the order: with seq, one sequential stream. */
static void
touch_pass(const uint64_t *order, uint64_t n, uint64_t seed)
{
	struct guest_thread g[16];

	for (int i = 0; i < o.threads; i++) {
		uint64_t a = n * (uint64_t)i / (uint64_t)o.threads;
		uint64_t b = n * (uint64_t)(i + 1) / (uint64_t)o.threads;

		g[i] = (struct guest_thread){ .pages = order + a, .n = b - a,
		    .seed = seed };
		pthread_create(&g[i].t, NULL, guest_thread_main, &g[i]);
	}
	for (int i = 0; i < o.threads; i++)
		pthread_join(g[i].t, NULL);
}

/*
 * The balloon: fixed ranges of consecutive pages, lengths in turn, each
 * followed by a gap three times its length, a length that no longer fits
 * in the region passed over. That is about a quarter of large regions;
 * small ones give more (600 pages alone are 29% of 8 MiB), as the long
 * ranges, past 2 MiB, are the point. On 4 KiB pages the ranges start off
 * 2 MiB alignment, so they cross 2 MiB boundaries.
 */

struct range {
	uint64_t first, n;		/* pages of the whole layout */
};

static const uint64_t small_lengths[] = { 1, 3, 16, 200, 600 };
static const uint64_t huge_lengths[] = { 1, 2, 3, 5 };	/* 2 MiB pages */
static struct range *balloon;
static size_t nballoon;

static void
plan_balloon(void)
{
	const uint64_t *len = o.huge ? huge_lengths : small_lengths;
	size_t nlen = o.huge ? 4 : 5, k = 0;
	uint64_t unit = o.huge ? HUGE / PAGE : 1;

	/* Every range and its gap take at least 4 pages. */
	balloon = malloc((o.l.total / PAGE / 4 + (uint64_t)o.l.n) * sizeof(*balloon));
	if (balloon == NULL)
		die("malloc: %s", strerror(ENOMEM));
	for (int r = 0; r < o.l.n; r++) {
		uint64_t pages = o.l.size[r] / PAGE, at = o.huge ? 0 : 1 + (uint64_t)r % 5;

		for (;;) {
			size_t t = 0;

			while (t < nlen && at + len[(k + t) % nlen] * unit > pages)
				t++;
			if (t == nlen)
				break;
			k = (k + t) % nlen;
			balloon[nballoon++] = (struct range){ o.l.off[r] / PAGE + at,
			    len[k] * unit };
			at += 4 * len[k] * unit;
			k = (k + 1) % nlen;
		}
	}
}

static void
remove_range(const struct range *g)
{
	int r;

	lock_pages(g->first, g->n);
	if (madvise(page_addr(g->first, &r), g->n * PAGE, MADV_DONTNEED) < 0)
		die("madvise(DONTNEED): %s", strerror(errno));
	oracle_removed(g->first, g->n);
	unlock_pages(g->first, g->n);
	atomic_fetch_add(&removes, 1);
}

#define BALLOON_ROUNDS	3
#define HOTPLUG_ROUNDS	4

static void *
balloon_thread(void *arg)
{
	(void)arg;
	for (int round = 0; round < BALLOON_ROUNDS; round++)
		for (size_t i = 0; i < nballoon; i++) {
			remove_range(&balloon[i]);
			usleep(200);
		}
	return NULL;
}

/*
 * Hotplug, as Firecracker's virtio-mem: unplug is MADV_DONTNEED (a REMOVE)
 * then PROT_NONE, plug is PROT_READ|PROT_WRITE. A slot is only ever
 * changed with all its stripes held, so a toucher holding one sees it
 * stable.
 */

static void
slot_pages(uint64_t s, uint64_t *first, uint64_t *n)
{
	uint64_t size = o.l.size[o.l.n - 1], end = (s + 1) * o.slot;

	*first = (o.l.off[o.l.n - 1] + s * o.slot) / PAGE;
	*n = ((end < size ? end : size) - s * o.slot) / PAGE;
}

static void
unplug_slot(uint64_t s)
{
	uint64_t first, n;
	int r;

	slot_pages(s, &first, &n);
	lock_pages(first, n);
	if (madvise(page_addr(first, &r), n * PAGE, MADV_DONTNEED) < 0 ||
	    mprotect(page_addr(first, &r), n * PAGE, PROT_NONE) < 0)
		die("unplugging slot %" PRIu64 ": %s", s, strerror(errno));
	oracle_removed(first, n);
	slot_plugged[s] = 0;
	unlock_pages(first, n);
	atomic_fetch_add(&unplugs, 1);
}

/* Plugs slot s and touches all of it. Nothing writes an unplugged slot,
 * so the oracle expects zeros: removed, or a hole in the file. */
static void
plug_slot(uint64_t s, const char *when)
{
	uint64_t first, n;
	int r;

	slot_pages(s, &first, &n);
	lock_pages(first, n);
	if (mprotect(page_addr(first, &r), n * PAGE, PROT_READ | PROT_WRITE) < 0)
		die("plugging slot %" PRIu64 ": %s", s, strerror(errno));
	slot_plugged[s] = 1;
	for (uint64_t p = first; p < first + n; p++)
		check_oracle(p, when);
	unlock_pages(first, n);
	atomic_fetch_add(&plugs, 1);
}

/*
 * Whether slot s is plugged after hotplug round k (0..3). By slot % 3:
 * 0 is unplugged in round 1 and plugged again in round 3; 1 (never
 * plugged) is plugged in round 0, and every other one of those unplugged
 * again in round 2, to be plugged at the end; 2 stays plugged, so some of
 * the region keeps its snapshot data between slots that come and go.
 */
static int
slot_plugged_after(uint64_t s, int k)
{
	switch (s % 3) {
	case 0:
		return k != 1 && k != 2;
	case 1:
		return s / 3 % 2 == 0 || k < 2;
	default:
		return 1;
	}
}

static void *
hotplug_thread(void *arg)
{
	(void)arg;
	for (int round = 0; round < HOTPLUG_ROUNDS; round++)
		for (uint64_t s = 0; s < slot_count(); s++) {
			if (slot_plugged_after(s, round) == slot_plugged[s])
				continue;
			if (slot_plugged[s])
				unplug_slot(s);
			else
				plug_slot(s, "on replug");
			usleep(200);
		}
	return NULL;
}

/* As shape_layout left them. */
static void
init_slots(void)
{
	slot_plugged = calloc(slot_count(), 1);
	if (slot_plugged == NULL)
		die("calloc: %s", strerror(ENOMEM));
	for (uint64_t s = 0; s < slot_count(); s++)
		slot_plugged[s] = !slot_born_unplugged(s);
}

static int
balloon_is(const char *mode)
{
	return strcmp(o.balloon ? o.balloon : "none", mode) == 0;
}

static uint64_t
balloon_pages(void)
{
	uint64_t n = 0;

	for (size_t i = 0; i < nballoon; i++)
		n += balloon[i].n;
	return n;
}

static void
report_oracle(void)
{
	printf("oracle: access %s, %s, %" PRIu64 " touches (%" PRIu64 " skipped on "
	    "unplugged slots)", o.access, o.write ? "writes" : "reads",
	    (uint64_t)touches, (uint64_t)skipped);
	if (!balloon_is("none"))
		printf("; balloon %s: %zu ranges, %" PRIu64 " pages (%" PRIu64 "%%), "
		    "%" PRIu64 " removes", o.balloon, nballoon, balloon_pages(),
		    balloon_pages() * PAGE * 100 / o.l.total, (uint64_t)removes);
	printf("; layout %s", o.layout ? o.layout : "one");
	if (!layout_is("one"))
		printf(", %" PRIu64 " KiB slots", o.slot / 1024);
	if (layout_is("hotplug"))
		printf(", %" PRIu64 " unplugs, %" PRIu64 " plugs", (uint64_t)unplugs,
		    (uint64_t)plugs);
	printf("\n");
}

/* Touches (and removes and hotplugs) concurrently, then, all plugged,
 * checks every page of every region. */
static void
run_oracle(void)
{
	uint64_t n, *order = touch_order(o.access, &n);
	pthread_t balloon_t, hotplug_t;

	init_oracle(HUGE);
	if (layout_is("hotplug"))
		init_slots();
	if (!balloon_is("none"))
		plan_balloon();
	if (layout_is("hotplug"))
		pthread_create(&hotplug_t, NULL, hotplug_thread, NULL);
	if (balloon_is("during"))
		pthread_create(&balloon_t, NULL, balloon_thread, NULL);
	touch_pass(order, n, mix(1));
	if (balloon_is("after")) {
		for (size_t i = 0; i < nballoon; i++)
			remove_range(&balloon[i]);
		unit_touched = calloc(o.l.total / PAGE, 1);
		if (unit_touched == NULL)
			die("calloc: %s", strerror(ENOMEM));
		touch_pass(order, n, mix(2));
		bad += resident_removed;
	}
	if (balloon_is("during"))
		pthread_join(balloon_t, NULL);
	if (layout_is("hotplug")) {
		pthread_join(hotplug_t, NULL);
		for (uint64_t s = 0; s < slot_count(); s++)
			if (!slot_plugged[s])
				plug_slot(s, "when plugged at the end");
	}
	report_oracle();
	atomic_store(&checked, 0);
	atomic_store(&zeros_seen, 0);
	/* --end-check touched: only the pages touched, so that a working
	 * set's restore reads no more of the file than it needs. */
	for (uint64_t i = 0; o.touched_only && i < n; i++)
		check_oracle(order[i], "at the end");
	for (uint64_t p = 0; !o.touched_only && p < o.limit / PAGE; p++)
		check_oracle(p, "at the end");
	free(order);
}

/*
 * Bench mode: the same restore, timed, one JSON line out. --backend file
 * maps each region MAP_PRIVATE from the file (Firecracker's File backend),
 * copy memcpys the whole file into anonymous memory first (the copy limit),
 * uffd restores through the handler. No oracle here: the tests check the
 * bytes, the benchmark the time and the memory.
 */

static void
map_file_private(int fd)
{
	for (int i = 0; i < o.l.n; i++) {
		host[i] = mmap(NULL, o.l.size[i], PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_NORESERVE, fd, (off_t)o.l.off[i]);
		if (host[i] == MAP_FAILED)
			die("mmap(%s, region %d): %s", o.file, i, strerror(errno));
	}
}

static void
copy_all(int fd)
{
	const char *src = mmap(NULL, o.l.total, PROT_READ, MAP_SHARED, fd, 0);

	if (src == MAP_FAILED)
		die("mmap(%s): %s", o.file, strerror(errno));
	for (int i = 0; i < o.l.n; i++)
		memcpy(host[i], src + o.l.off[i], o.l.size[i]);
	munmap((void *)src, o.l.total);
}

static long
status_kb(const char *key)
{
	char buf[4096], *at;
	int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof(buf) - 1);

	if (fd >= 0)
		close(fd);
	if (n <= 0)
		return -1;
	buf[n] = '\0';
	return (at = strstr(buf, key)) ? atol(at + strlen(key)) : -1;
}

struct toucher {
	pthread_t t;
	char **pages;
	uint64_t n;
	uint32_t *lat;			/* ns per first touch */
	int write;
};

static void *
touch_timed(void *arg)
{
	struct toucher *t = arg;

	for (uint64_t i = 0; i < t->n; i++) {
		uint64_t t0 = now_ns(), dt;

		if (t->write)
			*(volatile uint64_t *)t->pages[i] = i;
		else
			(void)*(volatile uint64_t *)t->pages[i];
		dt = now_ns() - t0;
		t->lat[i] = dt > UINT32_MAX ? UINT32_MAX : (uint32_t)dt;
	}
	return NULL;
}

/* The pages a workload touches, in its order: all in order, all shuffled
 * (rand2), a scattered tenth, shuffled (ws10), or a random twentieth
 * (ws5: the first 5% of all pages shuffled, the slow-storage runs'
 * working set). */
static char **
page_list(const char *w, uint64_t *n)
{
	const char *access = strcmp(w, "rand2") == 0 || strcmp(w, "ws5") == 0 ?
	    "rand" : strcmp(w, "ws10") == 0 ? "ws10" : "seq";
	uint64_t *order = touch_order(access, n);
	char **p;
	int r;

	if (strcmp(w, "ws5") == 0)
		*n /= 20;
	if ((p = malloc(*n * sizeof(*p))) == NULL)
		die("malloc: %s", strerror(ENOMEM));
	for (uint64_t i = 0; i < *n; i++)
		p[i] = page_addr(order[i], &r);
	free(order);
	return p;
}

static int
cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* Returns the ns the touching took; lat gets every touch's latency. */
static uint64_t
touch_all(char **pages, uint64_t n, uint32_t *lat, int threads, int write)
{
	struct toucher t[16];
	uint64_t t0 = now_ns();

	for (int i = 0; i < threads; i++) {
		uint64_t a = n * (uint64_t)i / (uint64_t)threads;
		uint64_t b = n * (uint64_t)(i + 1) / (uint64_t)threads;

		t[i] = (struct toucher){ .pages = pages + a, .n = b - a,
		    .lat = lat + a, .write = write };
		pthread_create(&t[i].t, NULL, touch_timed, &t[i]);
	}
	for (int i = 0; i < threads; i++)
		pthread_join(t[i].t, NULL);
	return now_ns() - t0;
}

/* The KVM pass: one vCPU hashes the first 4 MiB of guest data (this
 * machine's kvm_pvm spends ~2.5 ms of shadow paging per page). */
static uint64_t
bench_kvm(uint64_t *pages)
{
	uint64_t t0, end = 4 * MIB < o.l.size[0] ? 4 * MIB : o.l.size[0];
	struct vcpu v = { .id = 0 };

	o.threads = 1;
	o.l.n = 1;
	o.l.size[0] = end;
	snap = NULL;
	kvm_setup_vm();
	vcpu_setup(&v);
	t0 = now_ns();
	for (uint64_t off = DATA_GPA, next; off < end; off = next) {
		next = (off / CHUNK + 1) * CHUNK < end ? (off / CHUNK + 1) * CHUNK : end;
		vcpu_hash(&v, off, next - off);
	}
	*pages = (end - DATA_GPA) / PAGE;
	return now_ns() - t0;
}

static int
bench(void)
{
	const char *w = o.workload;
	uint64_t n = 0, ns;
	uint32_t *lat = NULL;
	char **pages = NULL;
	long anon0;
	int fd, sock = -1;

	if ((fd = open(o.file, O_RDONLY | O_CLOEXEC)) < 0)
		die("open(%s): %s", o.file, strerror(errno));
	if (strcmp(o.backend, "file") == 0)
		map_file_private(fd);
	else
		map_regions();
	if (strcmp(w, "kvm") != 0) {
		pages = page_list(w, &n);
		if ((lat = calloc(n, sizeof(*lat))) == NULL)
			die("calloc: %s", strerror(ENOMEM));
	}
	/* The pages are chosen first: the guest runs the moment the handler
	 * has the uffd, as a restore with resume_vm does, and population
	 * gets no head start. */
	if (strcmp(o.backend, "uffd") == 0)
		sock = handshake(create_uffd());
	anon0 = status_kb("RssAnon:");
	ns = now_ns();
	if (strcmp(o.backend, "copy") == 0)
		copy_all(fd);
	ns = now_ns() - ns;
	if (strcmp(w, "kvm") == 0) {
		ns += bench_kvm(&n);
	} else if (strcmp(w, "balloon") == 0) {
		/* Touched, given back to the host, faulted again. */
		touch_all(pages, n, lat, 1, 0);
		for (int i = 0; i < o.l.n; i++)
			madvise(host[i], o.l.size[i], MADV_DONTNEED);
		anon0 = status_kb("RssAnon:");
		ns += touch_all(pages, n, lat, 1, 0);
	} else {
		ns += touch_all(pages, n, lat, o.threads, strcmp(w, "seqwrite") == 0);
	}
	if (lat != NULL)
		qsort(lat, n, sizeof(*lat), cmp_u32);
	printf("{\"backend\":\"%s\",\"workload\":\"%s\",\"pages\":%" PRIu64
	    ",\"total_ms\":%.3f,\"us_per_page\":%.3f,\"p50_us\":%.2f,\"p99_us\":%.2f"
	    ",\"max_us\":%.2f"
	    ",\"rss_anon_mb\":%.1f,\"rss_file_mb\":%.1f,\"touched_mb\":%.1f}\n",
	    o.backend, w, n, (double)ns / 1e6, (double)ns / 1e3 / (double)n,
	    lat ? lat[n / 2] / 1e3 : -1.0, lat ? lat[n * 99 / 100] / 1e3 : -1.0,
	    lat ? lat[n - 1] / 1e3 : -1.0, (double)(status_kb("RssAnon:") - anon0) / 1024.0,
	    (double)status_kb("RssFile:") / 1024.0, (double)(n * PAGE) / MIB);
	if (sock >= 0)
		close(sock);
	return 0;
}

/* A fault in memory registered with the uffd but absent from the handshake. */
static void
stray_fault(int uffd)
{
	char *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	uffd_register(uffd, p, PAGE);
	printf("vmm: touching %p, outside every mapping sent\n", (void *)p);
	fflush(stdout);
	*(volatile char *)p = 1;
}

/* What the snapshot held, copied up front: the file may change later. */
static const char *
read_oracle(int fd)
{
	char *buf = malloc(o.l.total);
	uint64_t done = 0;

	while (buf != NULL && done < o.l.total) {
		ssize_t n = pread(fd, buf + done, o.l.total - done, (off_t)done);

		if (n <= 0)
			die("read(%s): %s", o.file, n ? strerror(errno) : "short file");
		done += (uint64_t)n;
	}
	if (buf == NULL)
		die("malloc(%" PRIu64 "): %s", o.l.total, strerror(errno));
	return buf;
}

static int
run(void)
{
	struct stat st;
	int fd, uffd, sock;

	if ((fd = open(o.file, O_RDONLY | O_CLOEXEC)) < 0 || fstat(fd, &st) < 0)
		die("open(%s): %s", o.file, strerror(errno));
	if ((uint64_t)st.st_size < o.l.total)
		die("%s: %" PRIu64 " bytes, the layout needs %" PRIu64, o.file,
		    (uint64_t)st.st_size, o.l.total);
	snap = read_oracle(fd);
	map_regions();
	uffd = create_uffd();
	if (o.layout)
		shape_layout();
	if (o.oracle)
		arm_watchdog(WATCHDOG_SECS + (unsigned)o.delay / 1000);
	/* Creating a uffd that sees kernel faults takes privilege; a jailed
	 * VMM then runs as the jail's ids, which the handler must match. */
	if (o.uid >= 0 && (setgroups(0, NULL) < 0 ||
	    setresgid((gid_t)o.uid, (gid_t)o.uid, (gid_t)o.uid) < 0 ||
	    setresuid((uid_t)o.uid, (uid_t)o.uid, (uid_t)o.uid) < 0))
		die("dropping to uid %ld: %s", o.uid, strerror(errno));
	sock = handshake(uffd);
	if (o.raw || o.nofd) {
		/* Whatever the handler makes of it, it must not leave us here. */
		sleep(30);
		return 3;
	}
	if (o.delay)
		usleep((useconds_t)o.delay * 1000);
	if (o.stray)
		stray_fault(uffd);
	if (o.kvm)
		run_kvm();
	else if (o.stress)
		run_stress();
	else if (o.oracle)
		run_oracle();
	else
		run_threads();
	printf("verified %" PRIu64 " pages (%" PRIu64 " of them zero) across %d "
	    "regions with %d %s%s%s%s", (uint64_t)checked, (uint64_t)zeros_seen,
	    o.l.n, o.threads, o.kvm ? "vCPUs" : "threads",
	    o.huge ? ", 2 MiB pages" : "", o.balloon ? ", balloon " : "",
	    o.balloon ? o.balloon : "");
	if (o.oracle && !o.stress)
		printf(", access %s, %s, layout %s", o.access, o.write ? "writes" :
		    "reads", o.layout ? o.layout : "one");
	printf(": %" PRIu64 " wrong\n", (uint64_t)bad);
	fflush(stdout);
	if (o.linger)
		sleep((unsigned)o.linger);
	if (sock >= 0)
		close(sock);
	return bad ? 1 : 0;
}

/*
 * Diff snapshots. mkdiff writes what Firecracker's Diff snapshot type
 * writes: a sparse file of the base's size holding only the pages dirtied
 * since, here runs of 1 to 16 pages covering about PCT percent of the
 * guest, one page in eight of them written all zero (data, not a hole).
 * merge applies a chain the way snapshot-editor's rebase does, oldest
 * first, copying each layer's data extents (SEEK_DATA/SEEK_HOLE) over a
 * copy of the base: the reference a chain served directly must match.
 */
static void
copy_extents(int from, int to, const char *name)
{
	static char buf[1 << 20];
	off_t end = lseek(from, 0, SEEK_END), at = 0, hole;

	while (at < end && (at = lseek(from, at, SEEK_DATA)) >= 0 && at < end) {
		if ((hole = lseek(from, at, SEEK_HOLE)) < 0)
			die("lseek(%s): %s", name, strerror(errno));
		while (at < hole) {
			size_t n = (size_t)(hole - at) < sizeof(buf) ?
			    (size_t)(hole - at) : sizeof(buf);

			if (pread(from, buf, n, at) != (ssize_t)n ||
			    pwrite(to, buf, n, at) != (ssize_t)n)
				die("copying %s: %s", name, strerror(errno));
			at += (off_t)n;
		}
	}
}

static int
mkdiff(const char *base, const char *path)
{
	static uint64_t page[PAGE / 8];
	uint64_t seed = 0x51ed2701ull + (uint64_t)o.seed, npages, dirty = 0, zeros = 0;
	int in = open(base, O_RDONLY | O_CLOEXEC);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	off_t size;

	if (in < 0 || fd < 0 || (size = lseek(in, 0, SEEK_END)) < 0)
		die("mkdiff %s %s: %s", base, path, strerror(errno));
	npages = (uint64_t)size / PAGE;
	while (dirty * 100 < npages * (uint64_t)o.dirty) {
		uint64_t p = next_rand(&seed) % npages, n = 1 + next_rand(&seed) % 16;

		for (uint64_t q = p; q < p + n && q < npages; q++, dirty++) {
			int zero = next_rand(&seed) % 8 == 0;

			for (size_t w = 0; w < PAGE / 8; w++)
				page[w] = zero ? 0 : mix(q * 512 + w + seed);
			zeros += zero;
			if (pwrite(fd, page, PAGE, (off_t)(q * PAGE)) != (ssize_t)PAGE)
				die("pwrite(%s): %s", path, strerror(errno));
		}
	}
	if (ftruncate(fd, size) < 0 || close(fd) < 0)
		die("ftruncate(%s): %s", path, strerror(errno));
	close(in);
	printf("diff %s: %" PRIu64 " page writes over %" PRIu64 " pages, %" PRIu64
	    " of them all zero\n", path, dirty, npages, zeros);
	return 0;
}

static int
merge(int n, char **files)
{
	int out = open(files[0], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	off_t size = -1;

	if (out < 0)
		die("open(%s): %s", files[0], strerror(errno));
	for (int i = 1; i < n; i++) {
		int fd = open(files[i], O_RDONLY | O_CLOEXEC);

		if (fd < 0)
			die("open(%s): %s", files[i], strerror(errno));
		if (size < 0 && (size = lseek(fd, 0, SEEK_END)) < 0)
			die("lseek(%s): %s", files[i], strerror(errno));
		copy_extents(fd, out, files[i]);
		close(fd);
	}
	if (ftruncate(out, size) < 0 || close(out) < 0)
		die("ftruncate(%s): %s", files[0], strerror(errno));
	return 0;
}

static void
usage(void)
{
	fprintf(stderr,
"usage: vmm mksnap FILE [--regions MIB,...] [--hotplug [--slot KIB]]\n"
"       vmm run SOCKET FILE [--regions MIB,...] [--gen 1|2|3] [--keep-open|--close]\n"
"           [--threads N] [--huge] [--kvm] [--balloon none|after|during] [--crash]\n"
"           [--stray-fault] [--raw JSON] [--no-fd] [--extra-fds N] [--split N]\n"
"           [--linger SEC] [--delay MS] [--uid UID] [--pad] [--stress SEC]\n"
"           [--access seq|rand|ws10] [--write] [--limit-mib MIB]\n"
"           [--end-check all|touched]\n"
"           [--layout one|split|hotplug]\n"
"           [--slot KIB]\n"
"       vmm bench SOCKET FILE [--regions MIB,...] [--backend file|copy|uffd]\n"
"           [--workload seqread|seqwrite|rand2|ws10|ws5|balloon|kvm]\n"
"           [--threads N]\n"
"       vmm mkdiff BASE OUT [--dirty PCT] [--seed N]\n"
"       vmm merge OUT BASE [DIFF...]\n"
"       (mksnap also takes --zero-every N)\n");
	exit(2);
}

static int
one_of(const char *v, const char *a, const char *b, const char *c)
{
	return v == NULL || strcmp(v, a) == 0 || strcmp(v, b) == 0 ||
	    strcmp(v, c) == 0;
}

/* --balloon after|during alone keep their old meaning; any new option
 * (--balloon none among them) selects the oracle mode. --stress has its
 * own oracle and takes only the layouts that need no coordination. */
static void
check_options(void)
{
	if (o.balloon && strcmp(o.balloon, "none") == 0)
		o.oracle = 1;
	if (o.gen < 1 || o.gen > 3 || o.threads < 1 || o.threads > 16 ||
	    o.extra_fds < 0 || o.extra_fds > 3 || (o.huge && o.gen == 1) ||
	    (o.kvm && o.l.n > KVM_REGIONS) || (o.stress && o.kvm) ||
	    !one_of(o.balloon, "none", "after", "during") ||
	    !one_of(o.access, "seq", "rand", "ws10") ||
	    !one_of(o.layout, "one", "split", "hotplug") ||
	    (o.oracle && (o.kvm || o.crash)) || (o.stress && (o.access ||
	    o.write || o.balloon || layout_is("hotplug"))))
		usage();
	for (int i = 0; o.huge && i < o.l.n; i++)
		if (o.l.size[i] % HUGE)
			die("--huge: region sizes must be multiples of 2 MiB");
	if (o.slot == 0 || o.slot % (o.huge ? HUGE : PAGE))
		die("--slot: a multiple of the page size (%" PRIu64 " KiB)",
		    (o.huge ? HUGE : PAGE) / 1024);
	if (o.oracle && o.access == NULL)
		o.access = "seq";
	if (o.limit == 0 || o.limit > o.l.total)
		o.limit = o.l.total;
	if (o.limit < o.l.total && ((o.balloon && strcmp(o.balloon, "none")) ||
	    !layout_is("one")))
		die("--limit-mib: only without a balloon, on --layout one");
}

int
main(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "regions", 1, 0, 'r' }, { "gen", 1, 0, 'g' },
		{ "keep-open", 0, 0, 'k' }, { "close", 0, 0, 'c' },
		{ "threads", 1, 0, 't' }, { "huge", 0, 0, 'H' }, { "kvm", 0, 0, 'K' },
		{ "balloon", 1, 0, 'b' }, { "crash", 0, 0, 'X' },
		{ "stray-fault", 0, 0, 'S' }, { "raw", 1, 0, 'R' },
		{ "no-fd", 0, 0, 'N' }, { "extra-fds", 1, 0, 'E' },
		{ "split", 1, 0, 'P' }, { "linger", 1, 0, 'L' },
		{ "delay", 1, 0, 'D' }, { "uid", 1, 0, 'U' }, { "pad", 0, 0, 'p' },
		{ "stress", 1, 0, 's' }, { "backend", 1, 0, 'B' },
		{ "workload", 1, 0, 'W' }, { "zero-every", 1, 0, 'Z' },
		{ "access", 1, 0, 'a' }, { "write", 0, 0, 'w' },
		{ "layout", 1, 0, 'Y' }, { "slot", 1, 0, 'O' },
		{ "limit-mib", 1, 0, 'M' }, { "end-check", 1, 0, 'q' },
		{ "hotplug", 0, 0, 'h' }, { "dirty", 1, 0, 'd' },
		{ "seed", 1, 0, 'e' }, { 0, 0, 0, 0 },
	};
	const char *cmd = argc > 1 ? argv[1] : "";
	int c;

	parse_regions("8,4,4");
	optind = 2;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 'r': parse_regions(optarg); break;
		case 'g': o.gen = atoi(optarg); break;
		case 'k': o.keep_open = 1; break;
		case 'c': o.keep_open = 0; break;
		case 't': o.threads = atoi(optarg); break;
		case 'H': o.huge = 1; break;
		case 'K': o.kvm = 1; break;
		case 'b': o.balloon = optarg; break;
		case 'X': o.crash = 1; break;
		case 'S': o.stray = 1; break;
		case 'R': o.raw = optarg; break;
		case 'N': o.nofd = 1; break;
		case 'E': o.extra_fds = atoi(optarg); break;
		case 'P': o.split = atoi(optarg); break;
		case 'L': o.linger = atoi(optarg); break;
		case 'D': o.delay = atoi(optarg); break;
		case 'U': o.uid = atol(optarg); break;
		case 'p': o.pad = 1; break;
		case 's': o.stress = atoi(optarg); break;
		case 'B': o.backend = optarg; break;
		case 'W': o.workload = optarg; break;
		case 'Z': o.zero_every = atoi(optarg); break;
		case 'a': o.access = optarg; o.oracle = 1; break;
		case 'w': o.write = 1; o.oracle = 1; break;
		case 'Y': o.layout = optarg; o.oracle = 1; break;
		case 'O': o.slot = strtoull(optarg, NULL, 10) * 1024; o.oracle = 1; break;
		case 'M': o.limit = strtoull(optarg, NULL, 10) * MIB; o.oracle = 1; break;
		case 'q': o.touched_only = strcmp(optarg, "touched") == 0; o.oracle = 1;
			break;
		case 'h': o.hotplug = 1; break;
		case 'd': o.dirty = atoi(optarg); break;
		case 'e': o.seed = atoi(optarg); break;
		default: usage();
		}
	}
	check_options();
	if (strcmp(cmd, "mksnap") == 0 && argc - optind == 1)
		return mksnap(argv[optind]);
	if (strcmp(cmd, "mkdiff") == 0 && argc - optind == 2)
		return mkdiff(argv[optind], argv[optind + 1]);
	if (strcmp(cmd, "merge") == 0 && argc - optind >= 2)
		return merge(argc - optind, argv + optind);
	if (strcmp(cmd, "bench") == 0 && argc - optind == 2) {
		o.socket = argv[optind];
		o.file = argv[optind + 1];
		return bench();
	}
	if (strcmp(cmd, "run") == 0 && argc - optind == 2) {
		o.socket = argv[optind];
		o.file = argv[optind + 1];
		return run();
	}
	usage();
}
