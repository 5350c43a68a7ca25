/*
 * slowfs - a read-only FUSE 3 filesystem that serves one directory and
 * delays every read, so a restore can be measured against storage that
 * answers as an EBS volume, NFS or an object store behind FUSE would.
 *
 *   slowfs [-d DELAY_US] [-b] [-o FUSEOPTS] SRCDIR MOUNTPOINT
 *
 * -d   microseconds every read request of file data waits before it is
 *      served (default 0). Lookups, getattr and readdir are not delayed:
 *      the cost modelled is that of fetching data.
 * -b   background: return (exit 0) only once the mount is up, then serve
 *      as a daemon; stop it with "umount MOUNTPOINT". Without -b it stays
 *      in the foreground and prints "slowfs: mounted SRCDIR on MOUNTPOINT
 *      (pid N)" on standard output once the mount is up: a harness waits
 *      for that line.
 * -o   more options for libfuse, comma-separated: mount options, and the
 *      connection's max_readahead=BYTES (the kernel's 128 KiB unless
 *      given), max_background=N, congestion_threshold=N.
 *
 * SIGTERM, SIGINT and SIGHUP end the loop and unmount cleanly; the last
 * line then gives the counters.
 *
 * Counters. The file ".slowfs" at the mount root (not in SRCDIR, listed
 * by readdir) reads as
 *
 *     reads N          read requests of file data served
 *     bytes N          bytes those requests returned
 *     max_inflight N   most read requests being served at once
 *     delay_us N
 *
 * It is never delayed nor counted, and it is served direct_io so every
 * read of it reaches this process: a harness reads it before and after
 * a run and takes the difference.
 *
 * What the kernel sees is an ordinary file: no direct_io on data files,
 * so they can be mapped (MAP_SHARED or MAP_PRIVATE) and the page cache
 * and readahead apply as they do on a disk. The page cache is kept across
 * opens (keep_cache): like a disk, the file goes cold only when asked
 * (posix_fadvise POSIX_FADV_DONTNEED, or /proc/sys/vm/drop_caches), not
 * because a second process opened it. One read request is one delay, up
 * to 128 KiB by default, as one I/O of a block device costs one latency.
 *
 * Requests are served by a pool of up to MAX_THREADS threads, so reads
 * that arrive together wait out their delays together, as network storage
 * serves several requests at once. The kernel sends readahead reads as
 * "background" requests and holds at most max_background of them in
 * flight (12 unless the filesystem asks for more); slowfs asks for
 * MAX_BACKGROUND unless -o max_background says otherwise.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION FUSE_MAKE_VERSION(3, 12)
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <inttypes.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>

#define STATS_NAME	".slowfs"
#define MAX_THREADS	64
#define MAX_BACKGROUND	64
/* The tree never changes under the mount: the kernel may cache its names
 * and attributes for an hour instead of asking again every second. */
#define ATTR_SECONDS	3600.0

static struct {
	int src;			/* SRCDIR, opened once */
	long delay_us;
	struct fuse_conn_info_opts *conn;	/* -o max_readahead= and the like */
	atomic_uint_fast64_t reads, bytes, inflight, max_inflight;
} fs = { .src = -1 };

/* Paths arrive as "/a/b"; under SRCDIR they are "a/b", the root ".". */
static const char *
rel(const char *path)
{
	return path[1] == '\0' ? "." : path + 1;
}

static int
is_stats(const char *path)
{
	return strcmp(path, "/" STATS_NAME) == 0;
}

static int
sfs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	(void)fi;
	if (is_stats(path)) {
		/* Size 0: with direct_io the kernel asks anyway and takes
		 * what the read returns. */
		memset(st, 0, sizeof(*st));
		st->st_mode = S_IFREG | 0444;
		st->st_nlink = 1;
		return 0;
	}
	if (fstatat(fs.src, rel(path), st, 0) != 0)
		return -errno;
	st->st_mode &= ~(mode_t)0222;	/* read-only, whatever SRCDIR allows */
	return 0;
}

static int
sfs_open(const char *path, struct fuse_file_info *fi)
{
	int fd;

	if ((fi->flags & O_ACCMODE) != O_RDONLY)
		return -EROFS;
	if (is_stats(path)) {
		fi->direct_io = 1;
		fi->fh = (uint64_t)-1;
		return 0;
	}
	if ((fd = openat(fs.src, rel(path), O_RDONLY | O_CLOEXEC)) < 0)
		return -errno;
	fi->fh = (uint64_t)fd;
	fi->keep_cache = 1;
	return 0;
}

static int
sfs_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	if (fi->fh != (uint64_t)-1)
		close((int)fi->fh);
	return 0;
}

static int
stats_read(char *buf, size_t size, off_t off)
{
	char text[256];
	int n = snprintf(text, sizeof(text), "reads %" PRIuFAST64 "\nbytes %"
	    PRIuFAST64 "\nmax_inflight %" PRIuFAST64 "\ndelay_us %ld\n",
	    atomic_load(&fs.reads), atomic_load(&fs.bytes),
	    atomic_load(&fs.max_inflight), fs.delay_us);

	if (off >= n)
		return 0;
	if (size > (size_t)(n - off))
		size = (size_t)(n - off);
	memcpy(buf, text + off, size);
	return (int)size;
}

/* The storage's latency. A signal cutting the sleep short must not make
 * a read fast, so the rest is slept. */
static void
delay(void)
{
	struct timespec t = { .tv_sec = fs.delay_us / 1000000,
		.tv_nsec = fs.delay_us % 1000000 * 1000 };

	while (fs.delay_us > 0 && nanosleep(&t, &t) != 0 && errno == EINTR)
		;
}

static void
note_inflight(void)
{
	uint_fast64_t now = atomic_fetch_add(&fs.inflight, 1) + 1;
	uint_fast64_t max = atomic_load(&fs.max_inflight);

	while (now > max && !atomic_compare_exchange_weak(&fs.max_inflight, &max, now))
		;
}

/* A short pread is retried: the kernel takes a short read for EOF. */
static ssize_t
read_full(int fd, char *buf, size_t size, off_t off)
{
	size_t got = 0;

	while (got < size) {
		ssize_t n = pread(fd, buf + got, size - got, off + (off_t)got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			break;
		got += (size_t)n;
	}
	return (ssize_t)got;
}

static int
sfs_read(const char *path, char *buf, size_t size, off_t off,
    struct fuse_file_info *fi)
{
	ssize_t n;

	if (is_stats(path))
		return stats_read(buf, size, off);
	note_inflight();
	delay();
	n = read_full((int)fi->fh, buf, size, off);
	atomic_fetch_sub(&fs.inflight, 1);
	if (n >= 0) {
		atomic_fetch_add(&fs.reads, 1);
		atomic_fetch_add(&fs.bytes, (uint_fast64_t)n);
	}
	return (int)n;
}

static int
sfs_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
    struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	int fd = openat(fs.src, rel(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	struct dirent *e;
	DIR *d;

	(void)off, (void)fi, (void)flags;
	if (fd < 0 || (d = fdopendir(fd)) == NULL) {
		int err = errno;

		if (fd >= 0)
			close(fd);
		return -err;
	}
	while ((e = readdir(d)) != NULL)
		fill(buf, e->d_name, NULL, 0, 0);
	if (strcmp(path, "/") == 0)
		fill(buf, STATS_NAME, NULL, 0, 0);
	closedir(d);
	return 0;
}

static void *
sfs_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
	fuse_apply_conn_info_opts(fs.conn, conn);
	/* 0 means nobody gave -o max_background, and the kernel's 12. */
	if (conn->max_background == 0) {
		conn->max_background = MAX_BACKGROUND;
		conn->congestion_threshold = MAX_BACKGROUND * 3 / 4;
	}
	cfg->entry_timeout = cfg->attr_timeout = ATTR_SECONDS;
	cfg->negative_timeout = ATTR_SECONDS;
	return NULL;
}

static const struct fuse_operations ops = {
	.init = sfs_init,
	.getattr = sfs_getattr,
	.open = sfs_open,
	.read = sfs_read,
	.release = sfs_release,
	.readdir = sfs_readdir,
};

static void __attribute__((noreturn))
usage(void)
{
	fprintf(stderr, "usage: slowfs [-d DELAY_US] [-b] [-o FUSEOPTS] SRCDIR "
	    "MOUNTPOINT\n");
	exit(2);
}

/* libfuse's own arguments: read-only always; allow_other as root, so a
 * handler that dropped to another uid can still open the memory file. */
static void
fuse_args_for(struct fuse_args *a, const char *extra)
{
	char opts[1024];

	snprintf(opts, sizeof(opts), "ro,fsname=slowfs,subtype=slowfs%s%s%s",
	    geteuid() == 0 ? ",allow_other" : "", extra ? "," : "",
	    extra ? extra : "");
	if (fuse_opt_add_arg(a, "slowfs") != 0 || fuse_opt_add_arg(a, "-o") != 0 ||
	    fuse_opt_add_arg(a, opts) != 0) {
		fprintf(stderr, "slowfs: out of memory\n");
		exit(1);
	}
}

/* Serves until a signal or an unmount ends the loop; then unmounts. */
static int
serve(struct fuse *f, const char *src, const char *mnt, int background)
{
	struct fuse_session *se = fuse_get_session(f);
	struct fuse_loop_config *cfg;
	int rc;

	/* A shell starts a background job with SIGINT ignored, and libfuse
	 * leaves an ignored signal alone: slowfs would not stop on it. */
	signal(SIGINT, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	signal(SIGHUP, SIG_DFL);
	if (fuse_daemonize(!background) != 0 || fuse_set_signal_handlers(se) != 0)
		return 1;
	printf("slowfs: mounted %s on %s (pid %d, delay %ld us)\n", src, mnt,
	    (int)getpid(), fs.delay_us);
	fflush(stdout);
	cfg = fuse_loop_cfg_create();
	fuse_loop_cfg_set_max_threads(cfg, MAX_THREADS);
	fuse_loop_cfg_set_idle_threads(cfg, MAX_THREADS);
	rc = fuse_loop_mt(f, cfg);
	fuse_loop_cfg_destroy(cfg);
	fuse_remove_signal_handlers(se);
	fuse_unmount(f);
	printf("slowfs: unmounted %s; reads %" PRIuFAST64 ", bytes %" PRIuFAST64
	    ", max_inflight %" PRIuFAST64 "\n", mnt, atomic_load(&fs.reads),
	    atomic_load(&fs.bytes), atomic_load(&fs.max_inflight));
	return rc < 0 ? 1 : 0;
}

int
main(int argc, char **argv)
{
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	const char *extra = NULL;
	struct fuse *f;
	char *end, *mnt;
	int c, background = 0, rc;

	while ((c = getopt(argc, argv, "d:bo:")) != -1) {
		if (c == 'd') {
			fs.delay_us = strtol(optarg, &end, 10);
			if (*optarg == '\0' || *end != '\0' || fs.delay_us < 0)
				usage();
		} else if (c == 'b') {
			background = 1;
		} else if (c == 'o') {
			extra = optarg;
		} else {
			usage();
		}
	}
	if (argc - optind != 2)
		usage();
	if ((fs.src = open(argv[optind], O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
		fprintf(stderr, "slowfs: %s: %s\n", argv[optind], strerror(errno));
		return 1;
	}
	/* Absolute: the unmount comes after the daemon's chdir("/"). */
	if ((mnt = realpath(argv[optind + 1], NULL)) == NULL) {
		fprintf(stderr, "slowfs: %s: %s\n", argv[optind + 1], strerror(errno));
		return 1;
	}
	fuse_args_for(&args, extra);
	/* The high-level fuse_new refuses the connection's options: they
	 * are taken out here and applied in init. */
	if ((fs.conn = fuse_parse_conn_info_opts(&args)) == NULL ||
	    (f = fuse_new(&args, &ops, sizeof(ops), NULL)) == NULL)
		return 1;
	if (fuse_mount(f, mnt) != 0) {
		fuse_destroy(f);
		return 1;
	}
	rc = serve(f, argv[optind], mnt, background);
	fuse_destroy(f);
	fuse_opt_free_args(&args);
	free(fs.conn);
	free(mnt);
	return rc;
}
