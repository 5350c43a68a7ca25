/*
 * fuzz_handshake - libFuzzer target over the handshake parser and the
 * mapping checks. Besides crashes and sanitizer findings it traps on any
 * accepted message that breaks what serving relies on: every region page
 * aligned, inside the memory file, overflow-free and disjoint from the rest;
 * and on any error that points outside the input.
 *
 *   ./build.sh fuzz && build/fuzz/handshake -max_total_time=3600 CORPUS_DIR
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../uffd.h"

#define MAXMAP 64

static void
check_accepted(const struct uffd_mapping *m, size_t n, uint64_t file_size)
{
	for (size_t i = 0; i < n; i++) {
		uint64_t ps = m[i].page_size;

		if ((ps != PAGE_4K && ps != PAGE_2M) || m[i].size == 0 ||
		    m[i].base % ps || m[i].size % ps || m[i].offset % PAGE_4K ||
		    m[i].base + m[i].size < m[i].base ||
		    m[i].offset + m[i].size < m[i].offset ||
		    m[i].offset + m[i].size > file_size)
			__builtin_trap();
		for (size_t j = 0; j < i; j++)
			if (m[i].base < m[j].base + m[j].size &&
			    m[j].base < m[i].base + m[i].size)
				__builtin_trap();
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const uint64_t file_sizes[] = { 0, 1ull << 30, UINT64_MAX };
	struct uffd_mapping m[MAXMAP], copy[MAXMAP];
	struct json_error je = { 0, NULL };
	char why[256];
	int n = json_parse_mappings((const char *)data, size, m, MAXMAP, &je);

	if (n < 0) {
		if (je.reason == NULL || je.offset > size)
			__builtin_trap();
		return 0;
	}
	for (size_t i = 0; i < sizeof(file_sizes) / sizeof(file_sizes[0]); i++) {
		memcpy(copy, m, sizeof(m[0]) * (size_t)n);
		why[0] = '\0';
		if (mappings_validate(copy, (size_t)n, file_sizes[i], PAGE_4K, why,
		    sizeof(why)) == 0)
			check_accepted(copy, (size_t)n, file_sizes[i]);
		else if (why[0] == '\0' || memchr(why, '\0', sizeof(why)) == NULL)
			__builtin_trap();
	}
	return 0;
}
