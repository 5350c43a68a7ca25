/* The ABI facts as the kernel's own header states them. */
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>
#include "abi.h"

const struct abi_fact abi_kernel[] = { ABI_FACTS };
