/*
 * unit - the handler's fault path, called directly against a real
 * userfaultfd that this process creates and registers itself. For what an
 * integration test cannot set up on demand: a REMOVE held pending while a
 * fault is retried, a source that fails part way through a window.
 *
 *   unit NAME     runs one case: exit 0 pass, 1 fail (the reason on stderr)
 *   unit -l       lists the cases
 *
 * uffd.c is compiled in whole, its main renamed, so every static function
 * is reachable. Pages are only ever inspected with mincore() or after they
 * are known present: reading a missing registered page would wait for a
 * handler, which is this process.
 */
#define main handler_main
#include "../uffd.c"
#undef main

#include <pthread.h>

#define NPAGES		64

static struct {
	int uffd;
	char *mem;			/* NPAGES registered anonymous pages */
	char *src;			/* the "memory file": NPAGES of 0xab */
	struct chain c;			/* of that one layer, all data */
	struct region r;
	struct session s;
	struct lane l;			/* the session's one */
} U;

static int __attribute__((format(printf, 1, 2)))
fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	return 1;
}

/* A uffd as Firecracker makes it, one region registered, one session. */
static int
setup(void)
{
	struct uffdio_api api = { .api = UFFD_API,
	    .features = UFFD_FEATURE_EVENT_REMOVE };
	struct uffdio_register reg = { .mode = UFFDIO_REGISTER_MODE_MISSING };
	uint64_t words = (NPAGES + 63) / 64;
	struct vm_state *st;

	U.uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (U.uffd < 0 || ioctl(U.uffd, UFFDIO_API, &api) < 0)
		return fail("userfaultfd: %s", strerror(errno));
	U.mem = mmap(NULL, NPAGES * PAGE_4K, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	U.src = mmap(NULL, NPAGES * PAGE_4K, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (U.mem == MAP_FAILED || U.src == MAP_FAILED)
		return fail("mmap: %s", strerror(errno));
	memset(U.src, 0xab, NPAGES * PAGE_4K);
	reg.range = (struct uffdio_range){ (uintptr_t)U.mem, NPAGES * PAGE_4K };
	if (ioctl(U.uffd, UFFDIO_REGISTER, &reg) < 0)
		return fail("UFFDIO_REGISTER: %s", strerror(errno));
	U.r = (struct region){ .base = (uintptr_t)U.mem, .size = NPAGES * PAGE_4K,
	    .page_size = PAGE_4K, .removed = calloc(words, 8),
	    .zero = calloc(words, 8), .hole = calloc(words, 8),
	    .present = calloc(words, 8) };
	U.c.n = 1;
	U.c.size = NPAGES * PAGE_4K;
	U.c.layer[0] = (struct layer){ .path = "src", .fd = -1, .mem = U.src };
	U.c.map = malloc(NPAGES);
	memset(U.c.map, 1, NPAGES);
	st = calloc(1, sizeof(*st) + sizeof(st->regions[0]));
	U.s = (struct session){ .vm = { .conn = -1, .uffd = U.uffd, .pidfd = -1,
	    .statefd = -1, .st = st }, .n = &st->n,
	    .chain = &U.c, .record_fd = -1, .regions = &U.r,
	    .nregions = 1, .lanes = &U.l, .nlanes = 1 };
	U.l = (struct lane){ .s = &U.s, .populates = 1, .step = UINT64_MAX,
	    .faults_cap = FAULT_QUEUE,
	    .faults = calloc(FAULT_QUEUE, sizeof(struct fault)) };
	pthread_mutex_init(&U.s.turn, NULL);
	pthread_rwlock_init(&U.s.rw, NULL);
	pthread_mutex_init(&U.s.mu, NULL);
	U.s.zeros = mmap(NULL, ZERO_SRC, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS,
	    -1, 0);
	return U.s.zeros == MAP_FAILED ? fail("mmap(zeros)") : 0;
}

static int
present(uint64_t page)
{
	unsigned char v = 0;

	mincore(U.mem + page * PAGE_4K, PAGE_4K, &v);
	return v & 1;
}

static int
fault_at(uint64_t page, uint64_t flags, struct fault *f)
{
	*f = (struct fault){ .addr = (uintptr_t)U.mem + page * PAGE_4K,
	    .flags = flags };
	return serve_fault(&U.l, f);
}

/* A thread whose madvise stays blocked until the handler reads its REMOVE. */
static void *
remove_page(void *arg)
{
	madvise(arg, PAGE_4K, MADV_DONTNEED);
	return NULL;
}

/* Holds a REMOVE of the last page pending; every copy then gets EAGAIN. */
static int
hold_remove(pthread_t *t)
{
	struct pollfd p = { U.uffd, POLLIN, 0 };

	pthread_create(t, NULL, remove_page, U.mem + (NPAGES - 1) * PAGE_4K);
	return poll(&p, 1, 5000) == 1 ? 0 : fail("the REMOVE never arrived");
}

/* Reads the pending REMOVE, so the madvise caller resumes. */
static int
release_remove(pthread_t t)
{
	int rc = read_events(&U.l);

	pthread_join(t, NULL);
	return rc < 0 ? fail("read_events: %d", rc) : 0;
}

/*
 * A fault that continues a stream, deferred by EAGAIN five times, is then
 * served with the window it was given at first (2 pages), not one grown by
 * each retry.
 */
static int
retried_fault_keeps_window(void)
{
	struct fault f0, f1;
	pthread_t t;
	int rc;

	if (fault_at(0, 0, &f0) != IO_DONE || f0.window != 1)
		return fail("first fault: window %llu", (unsigned long long)f0.window);
	if (hold_remove(&t))
		return 1;
	f1 = (struct fault){ .addr = (uintptr_t)U.mem + PAGE_4K };
	for (int i = 0; i < 5; i++)
		if ((rc = serve_fault(&U.l, &f1)) != IO_RETRY)
			return fail("retry %d: %d, expected IO_RETRY", i, rc);
	if (f1.window != 2 || f1.stream->window != 2)
		return fail("after 5 retries the window is %llu (stream %llu), "
		    "expected 2", (unsigned long long)f1.window,
		    (unsigned long long)f1.stream->window);
	if (release_remove(t))
		return 1;
	while ((rc = serve_fault(&U.l, &f1)) == IO_RETRY)
		usleep(100);
	if (rc != IO_DONE || U.s.n->prefetched != 1 || present(3))
		return fail("served %d with %llu prefetched, page 3 %s", rc,
		    (unsigned long long)U.s.n->prefetched,
		    present(3) ? "present" : "absent");
	return 0;
}

/*
 * A fault that starts a stream takes the place of the least recently used
 * one, and starts clean: deferred, it does not lend the evicted stream's
 * next page to another fault.
 */
static int
new_stream_starts_clean(void)
{
	struct fault f[STREAMS], stray, heir;
	pthread_t t;

	for (uint64_t i = 0; i < STREAMS; i++)
		if (fault_at(4 * i, 0, &f[i]) != IO_DONE)
			return fail("fault %llu not served", (unsigned long long)i);
	/* Stream 0 (page 0, next 1) is the least recently used. */
	if (hold_remove(&t))
		return 1;
	if (fault_at(50, 0, &stray) != IO_RETRY)
		return fail("the stray fault was not deferred");
	if (fault_at(1, 0, &heir) != IO_RETRY || heir.window != 1)
		return fail("a fault at the evicted stream's next page got window "
		    "%llu, expected 1", (unsigned long long)heir.window);
	return release_remove(t);
}

/*
 * A window that crosses a VMA boundary (the region cut in two by
 * MADV_NOHUGEPAGE, as memory hotplug's mprotect cuts it) is installed on
 * both sides; the faulting page is never dropped as unregistered.
 */
static int
enoent_window_split(void)
{
	struct fault f;

	if (madvise(U.mem + 4 * PAGE_4K, 60 * PAGE_4K, MADV_NOHUGEPAGE) < 0)
		return fail("madvise(NOHUGEPAGE): %s", strerror(errno));
	if (fault_at(0, 0, &f) != IO_DONE || fault_at(1, 0, &f) != IO_DONE ||
	    fault_at(3, 0, &f) != IO_DONE || f.window != 4)
		return fail("setting up a window of 4 at page 3 (got %llu)",
		    (unsigned long long)f.window);
	for (uint64_t p = 0; p < 7; p++)
		if (!present(p))
			return fail("page %llu not installed", (unsigned long long)p);
	if (U.s.n->unregistered != 0)
		return fail("%llu faults dropped as unregistered",
		    (unsigned long long)U.s.n->unregistered);
	return 0;
}

/* Only ENOENT on the faulting page alone drops the fault. */
static int
enoent_page_dropped(void)
{
	struct uffdio_range r = { (uintptr_t)U.mem + 8 * PAGE_4K, PAGE_4K };
	struct fault f;

	if (ioctl(U.uffd, UFFDIO_UNREGISTER, &r) < 0)
		return fail("UFFDIO_UNREGISTER: %s", strerror(errno));
	if (fault_at(8, 0, &f) != IO_DONE || U.s.n->unregistered != 1)
		return fail("the fault on an unregistered page was not dropped");
	return 0;
}

static void *
read_page(void *arg)
{
	return (void *)(uintptr_t)*(volatile char *)arg;
}

/*
 * A vCPU waits on a page whose range the VMM then replaces (munmap, or a
 * new mapping over it): the page alone answers ENOENT, and the fault is
 * dropped. Unmapping wakes no one, so the handler must, or the vCPU waits
 * forever; woken, it faults again on the new mapping and goes on.
 */
static int
enoent_wakes_waiter(void)
{
	struct pollfd p = { U.uffd, POLLIN, 0 };
	struct timespec by;
	pthread_t t;

	pthread_create(&t, NULL, read_page, U.mem + 10 * PAGE_4K);
	if (poll(&p, 1, 5000) != 1 || read_events(&U.l) < 0 || U.l.nfaults != 1)
		return fail("the fault never arrived");
	if (mmap(U.mem + 8 * PAGE_4K, 8 * PAGE_4K, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
		return fail("mmap(MAP_FIXED): %s", strerror(errno));
	if (serve_pending(&U.l) != IO_DONE || U.s.n->unregistered != 1)
		return fail("the fault was not dropped as unregistered");
	clock_gettime(CLOCK_REALTIME, &by);
	by.tv_sec += 2;
	return pthread_timedjoin_np(t, NULL, &by) == 0 ? 0 :
	    fail("the waiting thread was never woken");
}

/*
 * A write stream through a hole copies zeros ahead, but not past the
 * faulting page's VMA: the next one, here PROT_NONE, may be an unplugged
 * hotplug slot, where zeros would only take memory.
 */
static int
zeros_stop_at_vma(void)
{
	struct fault f;

	if (mprotect(U.mem + 4 * PAGE_4K, 4 * PAGE_4K, PROT_NONE) < 0)
		return fail("mprotect: %s", strerror(errno));
	for (uint64_t p = 0; p < 8; p++)
		bit_set(U.r.hole, p);
	if (fault_at(0, UFFD_PAGEFAULT_FLAG_WRITE, &f) != IO_DONE ||
	    fault_at(1, UFFD_PAGEFAULT_FLAG_WRITE, &f) != IO_DONE ||
	    fault_at(3, UFFD_PAGEFAULT_FLAG_WRITE, &f) != IO_DONE || f.window != 4)
		return fail("setting up a window of 4 at page 3");
	if (!present(3) || present(4) || present(5) || present(6))
		return fail("pages 3..6: %d %d %d %d: zeros went into the PROT_NONE "
		    "VMA", present(3), present(4), present(5), present(6));
	return 0;
}

/*
 * The faulting page is in; a page ahead fails (its source is unreadable:
 * EFAULT, as ENOMEM from an exhausted hugetlb pool would): the window
 * ends there, the fault is served, nothing is fatal.
 */
static int
error_ahead_ends_window(void)
{
	struct fault f;
	int rc;

	if (mprotect(U.src + 6 * PAGE_4K, PAGE_4K, PROT_NONE) < 0)
		return fail("mprotect: %s", strerror(errno));
	if (fault_at(0, UFFD_PAGEFAULT_FLAG_WRITE, &f) != IO_DONE ||
	    fault_at(1, UFFD_PAGEFAULT_FLAG_WRITE, &f) != IO_DONE ||
	    fault_at(3, UFFD_PAGEFAULT_FLAG_WRITE, &f) != IO_DONE)
		return fail("setting up a window of 4 at page 3");
	if ((rc = fault_at(3, UFFD_PAGEFAULT_FLAG_WRITE, &f)) != IO_DONE)
		return fail("a present page: %d", rc);
	if (!present(3) || !present(5) || present(6))
		return fail("pages 3..6: %d %d %d %d", present(3), present(4),
		    present(5), present(6));
	rc = fault_at(6, UFFD_PAGEFAULT_FLAG_WRITE, &f);
	return rc == -EFAULT ? 0 : fail("the faulting page's own failure: %d, "
	    "expected -EFAULT", rc);
}

/* Zeros copied for a run longer than the zero source are zeros, every byte:
 * the run is cut to the source, never copied from past its end. */
static int
zero_source_covers_run(void)
{
	const uint64_t len = ZERO_SRC + PAGE_2M, n = len / PAGE_4K;
	char *big = mmap(NULL, len, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	struct uffdio_register reg = { { (uintptr_t)big, len },
	    UFFDIO_REGISTER_MODE_MISSING, 0 };
	struct region r = { .base = (uintptr_t)big, .size = len,
	    .page_size = PAGE_4K, .present = calloc((n + 63) / 64, 8) };
	uint64_t got;
	int rc;

	if (big == MAP_FAILED || ioctl(U.uffd, UFFDIO_REGISTER, &reg) < 0)
		return fail("UFFDIO_REGISTER: %s", strerror(errno));
	U.l.writing = 1;
	rc = install_run(&U.l, &r, 0, n, KIND_REMOVED, &got);
	if (rc != IO_DONE || got == 0)
		return fail("install_run: %d, %llu pages", rc, (unsigned long long)got);
	for (uint64_t i = 0; i < got * PAGE_4K; i++)
		if (big[i] != 0)
			return fail("byte %llu of the run is 0x%02x",
			    (unsigned long long)i, (unsigned char)big[i]);
	return 0;
}

/*
 * The kernel facts the fault path is built on, checked on the machine that
 * runs the suite: a copy across a VMA boundary fails whole with ENOENT,
 * also between two writable registered VMAs; a copy wholly inside a
 * PROT_NONE VMA succeeds, and shows once the range is writable again.
 */
static int
kernel_copy_across_vma(void)
{
	struct uffdio_copy c = { (uintptr_t)U.mem + 2 * PAGE_4K,
	    (uintptr_t)U.src, 4 * PAGE_4K, 0, 0 };
	struct uffdio_zeropage z = { { (uintptr_t)U.mem + 2 * PAGE_4K,
	    4 * PAGE_4K }, 0, 0 };

	madvise(U.mem + 4 * PAGE_4K, 4 * PAGE_4K, MADV_NOHUGEPAGE);
	if (ioctl(U.uffd, (int)UFFDIO_COPY, &c) == 0 || errno != ENOENT ||
	    c.copy != -ENOENT)
		return fail("UFFDIO_COPY across two writable VMAs: copy %lld, "
		    "errno %s", (long long)c.copy, strerror(errno));
	if (ioctl(U.uffd, (int)UFFDIO_ZEROPAGE, &z) == 0 || errno != ENOENT)
		return fail("UFFDIO_ZEROPAGE across two VMAs: %s", strerror(errno));
	mprotect(U.mem + 4 * PAGE_4K, 4 * PAGE_4K, PROT_NONE);
	if (ioctl(U.uffd, (int)UFFDIO_COPY, &c) == 0 || errno != ENOENT)
		return fail("UFFDIO_COPY into a PROT_NONE VMA: %s", strerror(errno));
	return present(2) || present(4) ? fail("a failed copy installed pages") : 0;
}

static int
kernel_copy_into_prot_none(void)
{
	struct uffdio_copy c = { (uintptr_t)U.mem + 4 * PAGE_4K,
	    (uintptr_t)U.src, 2 * PAGE_4K, 0, 0 };

	mprotect(U.mem + 4 * PAGE_4K, 4 * PAGE_4K, PROT_NONE);
	if (ioctl(U.uffd, (int)UFFDIO_COPY, &c) < 0)
		return fail("UFFDIO_COPY inside PROT_NONE: %s", strerror(errno));
	mprotect(U.mem + 4 * PAGE_4K, 4 * PAGE_4K, PROT_READ | PROT_WRITE);
	return (unsigned char)U.mem[5 * PAGE_4K] == 0xab ? 0 :
	    fail("the copied page does not show after PROT_READ|PROT_WRITE");
}

/*
 * A hugetlb copy that finds the pool exhausted answers EEXIST and installs
 * nothing: one more 2 MiB page than the pool has free, the last refused.
 * The source is mapped first: a copy whose source must be faulted in takes
 * a second, temporary page from the pool (ENOMEM when none is left).
 * Exit 3 (skip) where hugetlb pages cannot be had at all.
 */
static int
kernel_hugetlb_exhausted_is_eexist(void)
{
	char mi[8192] = "", *at, *src = aligned_alloc(PAGE_4K, PAGE_2M);
	FILE *f = fopen("/proc/meminfo", "re");
	uint64_t n, i;
	char *m;

	if (f != NULL) {
		mi[fread(mi, 1, sizeof(mi) - 1, f)] = '\0';
		fclose(f);
	}
	if ((at = strstr(mi, "HugePages_Free:")) == NULL || (n = strtoull(at + 15,
	    NULL, 10) + 1) > 64)
		return fprintf(stderr, "no hugetlb pool, or more than 63 pages free\n"), 3;
	m = mmap(NULL, n * PAGE_2M, PROT_READ | PROT_WRITE, MAP_PRIVATE |
	    MAP_ANONYMOUS | MAP_NORESERVE | MAP_HUGETLB | (21 << 26), -1, 0);
	struct uffdio_register reg = { { (uintptr_t)m, n * PAGE_2M },
	    UFFDIO_REGISTER_MODE_MISSING, 0 };
	if (m == MAP_FAILED || ioctl(U.uffd, UFFDIO_REGISTER, &reg) < 0)
		return fprintf(stderr, "hugetlb mapping: %s\n", strerror(errno)), 3;
	for (i = 0; i < n; i++) {
		struct uffdio_copy c = { (uintptr_t)m + i * PAGE_2M,
		    (uintptr_t)memset(src, 1, PAGE_2M), PAGE_2M, 0, 0 };
		unsigned char v = 0;
		int rc = ioctl(U.uffd, (int)UFFDIO_COPY, &c);

		mincore(m + i * PAGE_2M, PAGE_4K, &v);
		if (i + 1 < n && rc < 0)
			return fail("page %llu of %llu free: %s", (unsigned long long)i,
			    (unsigned long long)n - 1, strerror(errno));
		if (i + 1 == n && (rc == 0 || errno != EEXIST || (v & 1)))
			return fail("the page past the pool: rc %d, %s, %s", rc,
			    rc ? strerror(errno) : "installed",
			    (v & 1) ? "present" : "absent");
	}
	return 0;
}

/*
 * A fault read before a REMOVE of its page, served after it: another
 * install (a second vCPU's fault, population) had let its vCPU go, then
 * the guest gave the page back. Zeros now would fill a page the guest no
 * longer has; the fault gets a wake only.
 */
static int
stale_fault_after_remove(void)
{
	struct fault f = { .addr = (uintptr_t)U.mem + 5 * PAGE_4K,
	    .removes = U.s.vm.st->removes };
	uint64_t done = 0;
	pthread_t t;

	if (uffdio_copy(&U.l, (uintptr_t)U.mem + 5 * PAGE_4K, U.src, PAGE_4K,
	    &done) != IO_DONE || !present(5))
		return fail("the other install failed");
	pthread_create(&t, NULL, remove_page, U.mem + 5 * PAGE_4K);
	usleep(50000);
	if (read_events(&U.l) < 0)
		return fail("read_events failed");
	pthread_join(t, NULL);
	if (present(5) || !bit_test(U.r.removed, 5))
		return fail("the REMOVE did not take the page");
	if (serve_fault(&U.l, &f) != IO_DONE)
		return fail("the stale fault was not done with");
	return present(5) ? fail("the stale fault filled the removed page") : 0;
}

/*
 * Threads: reading the uffd waits for every install under way. A REMOVE
 * read during another thread's copy would let its madvise zap the page
 * before that copy lands: snapshot data in a page the guest gave back. So
 * while a lane installs, the madvise caller stays blocked.
 */
static void *
read_uffd(void *arg)
{
	(void)arg;
	read_events(&U.l);
	return NULL;
}

static int
remove_read_waits_for_installs(void)
{
	struct lane other = { .s = &U.s };
	pthread_t t, r;
	int early;

	install_lock(&other);
	if (hold_remove(&t))
		return 1;
	pthread_create(&r, NULL, read_uffd, NULL);
	usleep(100000);
	early = pthread_tryjoin_np(t, NULL) == 0;
	install_unlock(&other);
	pthread_join(r, NULL);
	if (!early)
		pthread_join(t, NULL);
	if (early)
		return fail("the REMOVE was read while another thread installed");
	if (!bit_test(U.r.removed, NPAGES - 1))
		return fail("the REMOVE was not applied");
	return 0;
}

/* A reader waiting holds off new installs (musl's rwlock would let a
 * stream of them starve it), and lets them go once it has read. */
static void *
install_once(void *arg)
{
	struct lane l = { .s = &U.s };

	install_lock(&l);
	*(int *)arg = 1;
	install_unlock(&l);
	return NULL;
}

static int
reader_holds_off_installs(void)
{
	struct lane first = { .s = &U.s };
	pthread_t r, i;
	int in = 0, early;

	install_lock(&first);
	pthread_create(&r, NULL, read_uffd, NULL);
	usleep(50000);
	pthread_create(&i, NULL, install_once, &in);
	usleep(50000);
	early = __atomic_load_n(&in, __ATOMIC_SEQ_CST);
	install_unlock(&first);
	pthread_join(r, NULL);
	pthread_join(i, NULL);
	if (early)
		return fail("an install went ahead of a waiting reader");
	return in ? 0 : fail("the install never went ahead");
}

static const struct {
	const char *name;
	int (*fn)(void);
} cases[] = {
	{ "kernel_hugetlb_exhausted_is_eexist", kernel_hugetlb_exhausted_is_eexist },
	{ "kernel_copy_across_vma", kernel_copy_across_vma },
	{ "kernel_copy_into_prot_none", kernel_copy_into_prot_none },
	{ "retried_fault_keeps_window", retried_fault_keeps_window },
	{ "new_stream_starts_clean", new_stream_starts_clean },
	{ "enoent_window_split", enoent_window_split },
	{ "enoent_page_dropped", enoent_page_dropped },
	{ "enoent_wakes_waiter", enoent_wakes_waiter },
	{ "zeros_stop_at_vma", zeros_stop_at_vma },
	{ "error_ahead_ends_window", error_ahead_ends_window },
	{ "zero_source_covers_run", zero_source_covers_run },
	{ "stale_fault_after_remove", stale_fault_after_remove },
	{ "remove_read_waits_for_installs", remove_read_waits_for_installs },
	{ "reader_holds_off_installs", reader_holds_off_installs },
};

int
main(int argc, char **argv)
{
	opt.log_level = LOG_WARN;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		if (argc == 2 && strcmp(argv[1], "-l") == 0)
			printf("%s\n", cases[i].name);
		else if (argc == 2 && strcmp(argv[1], cases[i].name) == 0)
			/* No exit-time leak check: it would stop every thread,
			 * and one may be waiting in madvise for its REMOVE. */
			_exit(setup() ? 1 : cases[i].fn());
	}
	if (argc == 2 && strcmp(argv[1], "-l") == 0)
		return 0;
	fprintf(stderr, "usage: unit -l | unit NAME\n");
	return 2;
}
