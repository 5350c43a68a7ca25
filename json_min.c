/*
 * json_min.c - the strict parser for Firecracker's handshake message, and the
 * checks of the mappings it describes.
 *
 * The message is a JSON array of objects. Known keys must hold unsigned
 * integers, which are converted exactly to 64 bits (no doubles anywhere);
 * every other key may hold any JSON value and is skipped after being checked
 * for well-formedness. The parser owns no memory: the caller passes the array
 * to fill. A stream socket may deliver the message in pieces, so input that is
 * a valid prefix yields JSON_PARTIAL and the caller parses again with more.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "uffd.h"

struct cursor {
	const char *s;
	size_t len;
	size_t pos;
	int depth;
	struct json_error *err;
};

static int
fail(struct cursor *c, int code, const char *reason)
{
	c->err->offset = c->pos;
	c->err->reason = reason;
	return code;
}

static int
partial(struct cursor *c)
{
	return fail(c, JSON_PARTIAL, "message ends before the array is closed");
}

static void
skip_ws(struct cursor *c)
{
	while (c->pos < c->len && (c->s[c->pos] == ' ' || c->s[c->pos] == '\t' ||
	    c->s[c->pos] == '\n' || c->s[c->pos] == '\r'))
		c->pos++;
}

/* Returns the next non-blank byte without consuming it, or -1 at the end. */
static int
peek(struct cursor *c)
{
	skip_ws(c);
	return c->pos < c->len ? (unsigned char)c->s[c->pos] : -1;
}

static int
expect(struct cursor *c, char ch, const char *reason)
{
	int p = peek(c);

	if (p < 0)
		return partial(c);
	if (p != ch)
		return fail(c, JSON_INVALID, reason);
	c->pos++;
	return 0;
}

static int
hexval(int ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	return -1;
}

/*
 * Scans a string whose opening quote is at c->pos; on success *start and
 * *slen delimit its raw contents (escapes left as written).
 */
static int
scan_string(struct cursor *c, size_t *start, size_t *slen)
{
	c->pos++;
	*start = c->pos;
	while (c->pos < c->len) {
		unsigned char ch = (unsigned char)c->s[c->pos];

		if (ch == '"') {
			*slen = c->pos - *start;
			c->pos++;
			return 0;
		}
		if (ch < 0x20)
			return fail(c, JSON_INVALID, "control character in string");
		if (ch != '\\') {
			c->pos++;
			continue;
		}
		if (c->pos + 1 >= c->len)
			return partial(c);
		ch = (unsigned char)c->s[c->pos + 1];
		if (ch == 'u') {
			for (int i = 2; i < 6; i++) {
				if (c->pos + i >= c->len)
					return partial(c);
				if (hexval(c->s[c->pos + i]) < 0) {
					c->pos += i;
					return fail(c, JSON_INVALID, "bad \\u escape in string");
				}
			}
			c->pos += 6;
		} else if (strchr("\"\\/bfnrt", ch) != NULL && ch != '\0') {
			c->pos += 2;
		} else {
			return fail(c, JSON_INVALID, "bad escape in string");
		}
	}
	return partial(c);
}

static int
is_digit(struct cursor *c)
{
	return c->pos < c->len && c->s[c->pos] >= '0' && c->s[c->pos] <= '9';
}

/* The digits a fraction or an exponent needs: at least one. */
static int
skip_digits(struct cursor *c, const char *reason)
{
	if (c->pos >= c->len)
		return partial(c);
	if (!is_digit(c))
		return fail(c, JSON_INVALID, reason);
	while (is_digit(c))
		c->pos++;
	return 0;
}

/* Any JSON number, for keys whose value is skipped. */
static int
skip_number(struct cursor *c)
{
	int rc;

	if (c->s[c->pos] == '-')
		c->pos++;
	if (c->pos < c->len && c->s[c->pos] == '0')
		c->pos++;
	else if ((rc = skip_digits(c, "bad number")) < 0)
		return rc;
	if (c->pos < c->len && c->s[c->pos] == '.') {
		c->pos++;
		if ((rc = skip_digits(c, "bad fraction in number")) < 0)
			return rc;
	}
	if (c->pos < c->len && (c->s[c->pos] == 'e' || c->s[c->pos] == 'E')) {
		c->pos++;
		if (c->pos < c->len && (c->s[c->pos] == '+' || c->s[c->pos] == '-'))
			c->pos++;
		if ((rc = skip_digits(c, "bad exponent in number")) < 0)
			return rc;
	}
	return c->pos >= c->len ? partial(c) : 0;
}

/*
 * An integer field: digits only, converted exactly. A number cut off by the
 * end of the input is partial, since more digits may follow.
 */
static int
parse_u64(struct cursor *c, uint64_t *out)
{
	uint64_t v = 0;
	size_t start;
	int p = peek(c);

	if (p < 0)
		return partial(c);
	if (p == '-')
		return fail(c, JSON_RANGE, "negative number in an integer field");
	if (p < '0' || p > '9')
		return fail(c, JSON_INVALID, "integer field is not a number");
	start = c->pos;
	while (is_digit(c)) {
		unsigned d = (unsigned)(c->s[c->pos] - '0');

		if (v > (UINT64_MAX - d) / 10)
			return fail(c, JSON_RANGE, "integer exceeds 2^64-1");
		v = v * 10 + d;
		c->pos++;
	}
	if (c->pos >= c->len)
		return partial(c);
	if (c->s[c->pos] == '.')
		return fail(c, JSON_RANGE, "fraction in an integer field");
	if (c->s[c->pos] == 'e' || c->s[c->pos] == 'E')
		return fail(c, JSON_RANGE, "exponent in an integer field");
	if (c->pos - start > 1 && c->s[start] == '0') {
		c->pos = start;
		return fail(c, JSON_INVALID, "leading zero in number");
	}
	*out = v;
	return 0;
}

static int
skip_literal(struct cursor *c, const char *word)
{
	size_t n = strlen(word);

	for (size_t i = 0; i < n; i++) {
		if (c->pos + i >= c->len)
			return partial(c);
		if (c->s[c->pos + i] != word[i])
			return fail(c, JSON_INVALID, "unexpected character");
	}
	c->pos += n;
	return 0;
}

static int skip_value(struct cursor *);

/* Skips an array or object whose opening bracket is at c->pos. */
static int
skip_container(struct cursor *c, char close)
{
	size_t ks, kl;
	int rc, p;

	if (++c->depth > JSON_MAX_DEPTH)
		return fail(c, JSON_TOO_DEEP, "nesting deeper than 32 levels");
	c->pos++;
	if (peek(c) == close) {
		c->pos++;
		c->depth--;
		return 0;
	}
	for (;;) {
		if (close == '}') {
			if ((p = peek(c)) != '"')
				return p < 0 ? partial(c) :
				    fail(c, JSON_INVALID, "expected a string key");
			if ((rc = scan_string(c, &ks, &kl)) < 0 ||
			    (rc = expect(c, ':', "expected ':' after key")) < 0)
				return rc;
		}
		if ((rc = skip_value(c)) < 0)
			return rc;
		if ((p = peek(c)) < 0)
			return partial(c);
		if (p != ',' && p != close)
			return fail(c, JSON_INVALID, "expected ',' or closing bracket");
		c->pos++;
		if (p == close)
			break;
	}
	c->depth--;
	return 0;
}

static int
skip_value(struct cursor *c)
{
	size_t s, l;
	int p = peek(c);

	switch (p) {
	case -1:
		return partial(c);
	case '{':
		return skip_container(c, '}');
	case '[':
		return skip_container(c, ']');
	case '"':
		return scan_string(c, &s, &l);
	case 't':
		return skip_literal(c, "true");
	case 'f':
		return skip_literal(c, "false");
	case 'n':
		return skip_literal(c, "null");
	default:
		if (p == '-' || (p >= '0' && p <= '9'))
			return skip_number(c);
		return fail(c, JSON_INVALID, "unexpected character");
	}
}

static const struct {
	const char *key;
	unsigned bit;
	size_t field;
} known_keys[] = {
	{ "base_host_virt_addr", MAP_HAS_BASE, offsetof(struct uffd_mapping, base) },
	{ "size", MAP_HAS_SIZE, offsetof(struct uffd_mapping, size) },
	{ "offset", MAP_HAS_OFFSET, offsetof(struct uffd_mapping, offset) },
	{ "page_size", MAP_HAS_PAGE_SIZE, offsetof(struct uffd_mapping, page_size) },
	{ "page_size_kib", MAP_HAS_PAGE_SIZE_KIB,
	    offsetof(struct uffd_mapping, page_size_kib) },
};

static int
parse_member(struct cursor *c, struct uffd_mapping *m)
{
	size_t ks, kl, i;
	int rc;

	if (peek(c) != '"')
		return peek(c) < 0 ? partial(c) :
		    fail(c, JSON_INVALID, "expected a string key");
	if ((rc = scan_string(c, &ks, &kl)) < 0 ||
	    (rc = expect(c, ':', "expected ':' after key")) < 0)
		return rc;
	for (i = 0; i < sizeof(known_keys) / sizeof(known_keys[0]); i++)
		if (strlen(known_keys[i].key) == kl &&
		    memcmp(known_keys[i].key, c->s + ks, kl) == 0)
			break;
	if (i == sizeof(known_keys) / sizeof(known_keys[0]))
		return skip_value(c);
	if (m->fields & known_keys[i].bit) {
		c->pos = ks;
		return fail(c, JSON_INVALID, "duplicate key");
	}
	m->fields |= known_keys[i].bit;
	return parse_u64(c, (uint64_t *)(void *)((char *)m + known_keys[i].field));
}

static int
parse_mapping(struct cursor *c, struct uffd_mapping *m)
{
	int rc, p;

	memset(m, 0, sizeof(*m));
	if ((rc = expect(c, '{', "expected an object in the array")) < 0)
		return rc;
	if ((p = peek(c)) == '}') {
		c->pos++;
		return fail(c, JSON_INVALID, "mapping lacks base_host_virt_addr, size, offset");
	}
	for (;;) {
		if ((rc = parse_member(c, m)) < 0)
			return rc;
		if ((p = peek(c)) < 0)
			return partial(c);
		c->pos++;
		if (p == '}')
			break;
		if (p != ',') {
			c->pos--;
			return fail(c, JSON_INVALID, "expected ',' or '}' in object");
		}
	}
	if (!(m->fields & MAP_HAS_BASE))
		return fail(c, JSON_INVALID, "mapping lacks base_host_virt_addr");
	if (!(m->fields & MAP_HAS_SIZE))
		return fail(c, JSON_INVALID, "mapping lacks size");
	if (!(m->fields & MAP_HAS_OFFSET))
		return fail(c, JSON_INVALID, "mapping lacks offset");
	return 0;
}

int
json_parse_mappings(const char *buf, size_t len, struct uffd_mapping *out,
    size_t max, struct json_error *err)
{
	struct cursor c = { buf, len, 0, 1, err };
	size_t n = 0;
	int rc, p;

	if ((rc = expect(&c, '[', "message is not a JSON array")) < 0)
		return rc;
	if ((p = peek(&c)) == ']') {
		c.pos++;
	} else {
		for (;;) {
			if (n == max)
				return fail(&c, JSON_TOO_MANY, "too many mappings");
			if ((rc = parse_mapping(&c, &out[n])) < 0)
				return rc;
			n++;
			if ((p = peek(&c)) < 0)
				return partial(&c);
			c.pos++;
			if (p == ']')
				break;
			if (p != ',') {
				c.pos--;
				return fail(&c, JSON_INVALID, "expected ',' or ']' in array");
			}
		}
	}
	if (peek(&c) >= 0)
		return fail(&c, JSON_INVALID, "data after the array");
	return (int)n;
}

/*
 * Mapping checks. Errors name the mapping by its position in the message.
 */

static int __attribute__((format(printf, 3, 4)))
invalid(char *why, size_t whylen, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(why, whylen, fmt, ap);
	va_end(ap);
	return -EINVAL;
}

static int
page_size_of(struct uffd_mapping *m, size_t i, uint64_t host_page, char *why,
    size_t whylen)
{
	uint64_t ps = host_page;

	if ((m->fields & MAP_HAS_PAGE_SIZE) && (m->fields & MAP_HAS_PAGE_SIZE_KIB) &&
	    m->page_size != m->page_size_kib)
		return invalid(why, whylen, "mapping %zu: page_size %llu and "
		    "page_size_kib %llu disagree", i,
		    (unsigned long long)m->page_size,
		    (unsigned long long)m->page_size_kib);
	if (m->fields & MAP_HAS_PAGE_SIZE)
		ps = m->page_size;
	else if (m->fields & MAP_HAS_PAGE_SIZE_KIB)
		ps = m->page_size_kib;
	if (ps != PAGE_4K && ps != PAGE_2M)
		return invalid(why, whylen, "mapping %zu: page size %llu is neither "
		    "4096 nor 2097152", i, (unsigned long long)ps);
	m->page_size = ps;
	return 0;
}

static int
check_one(struct uffd_mapping *m, size_t i, uint64_t file_size, char *why,
    size_t whylen)
{
	uint64_t ps = m->page_size;

	if (m->size == 0)
		return invalid(why, whylen, "mapping %zu: size is zero", i);
	if (m->base % ps != 0)
		return invalid(why, whylen, "mapping %zu: base_host_virt_addr 0x%llx "
		    "is not aligned to page size %llu", i,
		    (unsigned long long)m->base, (unsigned long long)ps);
	if (m->size % ps != 0)
		return invalid(why, whylen, "mapping %zu: size %llu is not a "
		    "multiple of page size %llu", i,
		    (unsigned long long)m->size, (unsigned long long)ps);
	if (m->offset % PAGE_4K != 0)
		return invalid(why, whylen, "mapping %zu: offset %llu is not a "
		    "multiple of 4096", i, (unsigned long long)m->offset);
	if (m->base > UINT64_MAX - m->size)
		return invalid(why, whylen, "mapping %zu: base 0x%llx + size %llu "
		    "overflows", i, (unsigned long long)m->base,
		    (unsigned long long)m->size);
	if (m->offset > UINT64_MAX - m->size || m->offset + m->size > file_size)
		return invalid(why, whylen, "mapping %zu: offset %llu + size %llu "
		    "lies beyond the end of the memory file", i,
		    (unsigned long long)m->offset, (unsigned long long)m->size);
	return 0;
}

int
mappings_validate(struct uffd_mapping *m, size_t n, uint64_t file_size,
    uint64_t host_page, char *why, size_t whylen)
{
	size_t i, j;
	int rc;

	if (n == 0)
		return invalid(why, whylen, "no mappings in the message");
	for (i = 0; i < n; i++)
		if ((rc = page_size_of(&m[i], i, host_page, why, whylen)) < 0 ||
		    (rc = check_one(&m[i], i, file_size, why, whylen)) < 0)
			return rc;
	for (i = 0; i < n; i++)
		for (j = i + 1; j < n; j++)
			if (m[i].base < m[j].base + m[j].size &&
			    m[j].base < m[i].base + m[i].size) {
				snprintf(why, whylen, "mappings %zu and %zu overlap "
				    "in the VMM's address space", i, j);
				return -EINVAL;
			}
	return 0;
}
