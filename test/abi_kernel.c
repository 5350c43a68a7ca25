/* The ABI facts as the kernel's own header states them. */
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/audit.h>
#include <linux/prctl.h>

/* Spelled out in uffd.h; the kernel composes them. */
#define BPF_LD_W_ABS	(BPF_LD | BPF_W | BPF_ABS)
#define BPF_JEQ_K	(BPF_JMP | BPF_JEQ | BPF_K)
#define BPF_RET_K	(BPF_RET | BPF_K)
#include "abi.h"

const struct abi_fact abi_kernel[] = { ABI_FACTS };
