/*
 * Every constant, struct size and field offset of uffd.h, as a list that
 * abi_ours.c expands against uffd.h and abi_kernel.c against
 * <linux/userfaultfd.h>; the abi_matches_kernel test compares the two.
 */
#include <stddef.h>
#include <stdint.h>

#define ABI_FACTS \
	C(UFFD_API) \
	C(UFFD_EVENT_PAGEFAULT) \
	C(UFFD_EVENT_REMOVE) \
	C(UFFD_PAGEFAULT_FLAG_WRITE) \
	C(UFFD_FEATURE_EVENT_REMOVE) \
	C(UFFDIO_COPY_MODE_DONTWAKE) \
	C(UFFDIO_ZEROPAGE_MODE_DONTWAKE) \
	C(UFFDIO_UNREGISTER) \
	C(UFFDIO_WAKE) \
	C(UFFDIO_COPY) \
	C(UFFDIO_ZEROPAGE) \
	C(UFFDIO_REGISTER_MODE_MISSING) \
	C(UFFDIO_REGISTER) \
	C(UFFDIO_API) \
	C(USERFAULTFD_IOC_NEW) \
	S(uffdio_api) \
	S(uffdio_register) \
	F(uffdio_api, features) \
	F(uffdio_api, ioctls) \
	F(uffdio_register, mode) \
	F(uffdio_register, ioctls) \
	S(uffd_msg) \
	S(uffdio_range) \
	S(uffdio_copy) \
	S(uffdio_zeropage) \
	F(uffd_msg, event) \
	F(uffd_msg, arg) \
	F(uffd_msg, arg.pagefault.flags) \
	F(uffd_msg, arg.pagefault.address) \
	F(uffd_msg, arg.pagefault.feat.ptid) \
	F(uffd_msg, arg.remove.start) \
	F(uffd_msg, arg.remove.end) \
	F(uffdio_range, start) \
	F(uffdio_range, len) \
	F(uffdio_copy, dst) \
	F(uffdio_copy, src) \
	F(uffdio_copy, len) \
	F(uffdio_copy, mode) \
	F(uffdio_copy, copy) \
	F(uffdio_zeropage, range) \
	F(uffdio_zeropage, mode) \
	F(uffdio_zeropage, zeropage) \
	C(BPF_LD_W_ABS) \
	C(BPF_JEQ_K) \
	C(BPF_RET_K) \
	C(SECCOMP_MODE_FILTER) \
	C(SECCOMP_SET_MODE_FILTER) \
	C(SECCOMP_RET_KILL_PROCESS) \
	C(SECCOMP_RET_ERRNO) \
	C(SECCOMP_RET_ALLOW) \
	C(AUDIT_ARCH_X86_64) \
	C(AUDIT_ARCH_AARCH64) \
	C(PR_SET_NO_NEW_PRIVS) \
	C(PR_SET_SECCOMP) \
	S(sock_filter) \
	S(sock_fprog) \
	S(seccomp_data) \
	F(sock_filter, k) \
	F(sock_fprog, filter) \
	F(seccomp_data, arch) \
	F(seccomp_data, args)

struct abi_fact {
	const char *name;
	uint64_t value;
};

#define C(x)	{ #x, (uint64_t)(x) },
#define S(t)	{ "sizeof(struct " #t ")", sizeof(struct t) },
#define F(t, f)	{ "offsetof(struct " #t ", " #f ")", offsetof(struct t, f) },

extern const struct abi_fact abi_ours[], abi_kernel[];
extern const size_t abi_count;
