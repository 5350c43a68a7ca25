/* The ABI facts as uffd.h states them. */
#include "../uffd.h"
#include "abi.h"

const struct abi_fact abi_ours[] = { ABI_FACTS };
const size_t abi_count = sizeof(abi_ours) / sizeof(abi_ours[0]);
