/*
 * uffd.h - the kernel's userfaultfd ABI as uffd-handler uses it, and the
 * handshake parser's interface.
 *
 * musl-gcc does not see <linux/userfaultfd.h>, so the structs and ioctl
 * numbers are spelled out here. test/abi_ours.c and test/abi_kernel.c compare
 * every one of them with the kernel's own header, so a wrong value fails the
 * test suite rather than a restore.
 */
#ifndef UFFD_H
#define UFFD_H

#include <stddef.h>
#include <stdint.h>

/* include/uapi/linux/userfaultfd.h */
#define UFFD_API			((uint64_t)0xAA)
#define UFFD_EVENT_PAGEFAULT		0x12
#define UFFD_EVENT_REMOVE		0x15
#define UFFD_PAGEFAULT_FLAG_WRITE	((uint64_t)1 << 0)
#define UFFD_FEATURE_EVENT_REMOVE	((uint64_t)1 << 3)
#define UFFDIO_COPY_MODE_DONTWAKE	((uint64_t)1 << 0)
#define UFFDIO_ZEROPAGE_MODE_DONTWAKE	((uint64_t)1 << 0)
#define UFFDIO_REGISTER_MODE_MISSING	((uint64_t)1 << 0)

/* _IOR/_IOWR(0xAA, nr, struct): identical on x86_64 and arm64. */
#define UFFDIO_UNREGISTER		0x8010aa01u
#define UFFDIO_WAKE			0x8010aa02u
#define UFFDIO_COPY			0xc028aa03u
#define UFFDIO_ZEROPAGE			0xc020aa04u
/* What a VMM calls, as the self-test and --check play one. */
#define UFFDIO_REGISTER			0xc020aa00u
#define UFFDIO_API			0xc018aa3fu
#define USERFAULTFD_IOC_NEW		0x0000aa00u	/* /dev/userfaultfd */

struct uffd_msg {
	uint8_t		event;
	uint8_t		reserved1;
	uint16_t	reserved2;
	uint32_t	reserved3;
	union {
		struct {
			uint64_t flags;
			uint64_t address;
			union {
				uint32_t ptid;
			} feat;
		} pagefault;
		struct {
			uint64_t start;
			uint64_t end;
		} remove;
		struct {
			uint64_t reserved1;
			uint64_t reserved2;
			uint64_t reserved3;
		} reserved;
	} arg;
} __attribute__((packed));

struct uffdio_range {
	uint64_t start;
	uint64_t len;
};

struct uffdio_api {
	uint64_t api;
	uint64_t features;
	uint64_t ioctls;
};

struct uffdio_register {
	struct uffdio_range range;
	uint64_t mode;
	uint64_t ioctls;
};

struct uffdio_copy {
	uint64_t dst;
	uint64_t src;
	uint64_t len;
	uint64_t mode;
	int64_t  copy;
};

struct uffdio_zeropage {
	struct uffdio_range range;
	uint64_t mode;
	int64_t  zeropage;
};

/* include/uapi/linux/filter.h, seccomp.h, audit.h, prctl.h */
struct sock_filter {
	uint16_t code;
	uint8_t  jt;
	uint8_t  jf;
	uint32_t k;
};

struct sock_fprog {
	unsigned short len;
	struct sock_filter *filter;
};

struct seccomp_data {
	int32_t  nr;
	uint32_t arch;
	uint64_t instruction_pointer;
	uint64_t args[6];
};

#define BPF_LD_W_ABS			0x20	/* BPF_LD | BPF_W | BPF_ABS */
#define BPF_JEQ_K			0x15	/* BPF_JMP | BPF_JEQ | BPF_K */
#define BPF_RET_K			0x06	/* BPF_RET | BPF_K */
#define SECCOMP_MODE_FILTER		2
#define SECCOMP_SET_MODE_FILTER		1
#define SECCOMP_RET_KILL_PROCESS	0x80000000u
#define SECCOMP_RET_ERRNO		0x00050000u
#define SECCOMP_RET_ALLOW		0x7fff0000u
#define AUDIT_ARCH_X86_64		0xc000003eu
#define AUDIT_ARCH_AARCH64		0xc00000b7u
#define PR_SET_NO_NEW_PRIVS		38
#define PR_SET_SECCOMP			22

/*
 * One entry of Firecracker's handshake (GuestRegionUffdMapping). The parser
 * fills these from the caller's array; mappings_validate() checks them
 * against the memory file.
 */
#define MAP_HAS_BASE		(1u << 0)
#define MAP_HAS_SIZE		(1u << 1)
#define MAP_HAS_OFFSET		(1u << 2)
#define MAP_HAS_PAGE_SIZE	(1u << 3)
#define MAP_HAS_PAGE_SIZE_KIB	(1u << 4)

struct uffd_mapping {
	uint64_t base;			/* base_host_virt_addr */
	uint64_t size;
	uint64_t offset;		/* into the memory file */
	uint64_t page_size;		/* "page_size" (bytes) */
	uint64_t page_size_kib;		/* "page_size_kib": also bytes */
	unsigned fields;		/* MAP_HAS_*: which keys were sent */
};

/* Parser results: >= 0 is the number of mappings of a complete message. */
#define JSON_PARTIAL	(-1)	/* well-formed so far, more bytes needed */
#define JSON_INVALID	(-2)	/* not JSON, or not the handshake's shape */
#define JSON_RANGE	(-3)	/* an integer field out of range or not integral */
#define JSON_TOO_DEEP	(-4)	/* nesting beyond JSON_MAX_DEPTH */
#define JSON_TOO_MANY	(-5)	/* more mappings than the caller has room for */

#define JSON_MAX_DEPTH	32

struct json_error {
	size_t offset;			/* byte where the input went wrong */
	const char *reason;		/* static string */
};

int json_parse_mappings(const char *buf, size_t len, struct uffd_mapping *out,
    size_t max, struct json_error *err);

#define PAGE_4K		4096ull
#define PAGE_2M		(2ull << 20)

/*
 * Fills in each mapping's effective page_size (host_page when the message
 * carried none) and checks alignment, overflow, overlap and that every
 * region lies inside a file of file_size bytes. On failure returns -EINVAL
 * and writes a one-line reason to why.
 */
int mappings_validate(struct uffd_mapping *m, size_t n, uint64_t file_size,
    uint64_t host_page, char *why, size_t whylen);

#endif
