#!/bin/sh
# build.sh - builds uffd-handler and runs its tests and demo.
#
#   ./build.sh [release]  build/uffd-handler: static musl binary, stripped
#   ./build.sh test       also the sanitizer builds (ASan+UBSan, TSan), a
#                         broken build (one wrong byte served), one that
#                         stops in the REMOVE window, and
#                         the test programs, then the whole suite (test/run;
#                         extra args pick cases)
#   ./build.sh aarch64    build/aarch64/uffd-handler, the same for Graviton
#   ./build.sh fuzz       build/fuzz/handshake, the libFuzzer target
#   ./build.sh demo       restore a sample snapshot through the handler
#   ./build.sh bench      the benchmark (bench/bench.c): table, JSON, SVG
#   ./build.sh clean
set -eu
cd "$(dirname "$0")"

SRC="uffd.c json_min.c"
WARN="-std=c11 -Wall -Wextra -Werror -pedantic -Wshadow -Wformat=2"

# The commit a build comes from, in its --version and its upgrade lines.
if BUILD_ID=$(git rev-parse --short HEAD 2>/dev/null); then
	git diff --quiet HEAD -- $SRC uffd.h || BUILD_ID="$BUILD_ID+"
else
	BUILD_ID=unknown
fi
WARN="$WARN -DBUILD_ID=\"$BUILD_ID\""

need_musl() {
	command -v musl-gcc >/dev/null 2>&1 && return 0
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "build.sh: installing musl-tools" >&2
		apt-get update -qq >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null
		return 0
	fi
	echo "build.sh: musl-gcc not found: run 'apt-get install musl-tools' as root" >&2
	exit 1
}

# Debian package $2 for command $1, installed when missing and root.
need() {
	command -v "$1" >/dev/null 2>&1 && return 0
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "build.sh: installing $2" >&2
		apt-get update -qq >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
		return 0
	fi
	echo "build.sh: $1 not found: run 'apt-get install $2' as root" >&2
	exit 1
}

# libfuse3's headers and library and the fuse3 mount helper, for
# test/slowfs. Only the slow-storage bench needs it, so without them and
# without root it says what to install and the rest goes on.
need_fuse() {
	[ -f /usr/include/fuse3/fuse.h ] && command -v fusermount3 >/dev/null 2>&1 &&
		return 0
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "build.sh: installing libfuse3-dev fuse3" >&2
		apt-get update -qq >/dev/null
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfuse3-dev \
			fuse3 >/dev/null
		return 0
	fi
	echo "build.sh: libfuse3 not found, build/test/slowfs not built: run" \
		"'apt-get install libfuse3-dev fuse3' as root" >&2
	return 1
}

# The shipped binary: musl, static, no PT_INTERP, no DT_NEEDED. Code and
# read-only data share one segment (-z noseparate-code): separate, each is
# padded to a page of its own, 8 KiB of the file. No build id, no .comment.
LAYOUT="-Wl,-z,noseparate-code -Wl,--build-id=none"
release() {
	need_musl
	mkdir -p build
	musl-gcc $WARN -Os -static -fno-asynchronous-unwind-tables \
		-Wl,--gc-sections -ffunction-sections -fdata-sections $LAYOUT \
		-o build/uffd-handler $SRC
	strip -R .comment build/uffd-handler
}

# The release build with one wrong byte served (file offset 4120, a data
# page of the self-test's snapshot): the suite shows --self-test failing.
# And build/window, whose server stops itself inside the REMOVE window,
# for the suite to kill it there.
broken() {
	mkdir -p build/broken build/window
	musl-gcc $WARN -Os -static -DBREAK_SERVED_BYTE=4120 \
		-o build/broken/uffd-handler $SRC
	musl-gcc $WARN -Os -static -DSTOP_IN_REMOVE_WINDOW \
		-o build/window/uffd-handler $SRC
}

# The same static build for Graviton hosts (aarch64), with Debian's cross
# gcc and musl-dev:arm64. Only when the toolchain is there, unless asked for.
SPECS=/usr/lib/aarch64-linux-musl/musl-gcc.specs
aarch64() {
	if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || [ ! -f "$SPECS" ]; then
		[ "${1:-}" = optional ] && return 0
		echo "build.sh: no aarch64 toolchain: run 'dpkg --add-architecture arm64;" \
			"apt-get update; apt-get install gcc-aarch64-linux-gnu musl-dev:arm64'" >&2
		exit 1
	fi
	mkdir -p build/aarch64
	aarch64-linux-gnu-gcc -specs "$SPECS" $WARN -Os -static \
		-fno-asynchronous-unwind-tables -Wl,--gc-sections \
		-ffunction-sections -fdata-sections $LAYOUT \
		-o build/aarch64/uffd-handler $SRC
	aarch64-linux-gnu-strip -R .comment build/aarch64/uffd-handler
}

# The same sources with address and undefined-behaviour sanitizers, which
# the integration tests run.
sanitized() {
	mkdir -p build/san
	cc $WARN -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
		-fno-sanitize-recover=all -o build/san/uffd-handler $SRC
}

# The same sources with ThreadSanitizer: the suite runs its threaded cases
# against it too (the "tsan/" pass), and a data race fails them.
tsan() {
	mkdir -p build/tsan
	cc $WARN -O1 -g -fno-omit-frame-pointer -fsanitize=thread \
		-o build/tsan/uffd-handler $SRC
}

# The test VMM (KVM, threads, linux headers) and the runner, with glibc.
test_programs() {
	mkdir -p build/test
	cc -std=c11 -Wall -Wextra -Werror -O2 -g -pthread \
		-o build/test/vmm test/vmm.c test/guest.S
	cc $WARN -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
		-o build/test/run test/run.c test/abi_ours.c test/abi_kernel.c json_min.c
	cc $WARN -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
		-pthread -o build/test/unit test/unit.c json_min.c
}

# The FUSE filesystem that delays reads (bench's slow-storage runs).
slowfs() {
	need_fuse || return 0
	cc -std=c11 -Wall -Wextra -Werror -pedantic -Wshadow -Wformat=2 -O2 -g \
		-I/usr/include/fuse3 -pthread -o build/test/slowfs test/slowfs.c \
		-lfuse3
}

# libFuzzer over the parser and the region checks.
fuzz() {
	need clang clang
	mkdir -p build/fuzz
	clang -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined \
		-fno-sanitize-recover=all \
		-o build/fuzz/handshake test/fuzz_handshake.c json_min.c
}

# The benchmark: File backend, copy limit and the handler side by side.
bench() {
	release
	test_programs
	slowfs
	cc -std=c11 -Wall -Wextra -Werror -O2 -o build/test/bench bench/bench.c -lm
	build/test/bench "$@"
}

demo() {
	release
	test_programs
	sh test/demo.sh
}

case "${1:-release}" in
release)	release ;;
test)		release; broken; aarch64 optional; sanitized; tsan; test_programs
		slowfs; fuzz
		# promtool reads the --metrics files, as Prometheus would.
		need promtool prometheus
		shift
		build/test/run "$@" ;;
aarch64)	aarch64 ;;
fuzz)		fuzz ;;
demo)		demo ;;
bench)		shift; bench "$@" ;;
clean)		rm -rf build ;;
*)		echo "usage: ./build.sh [release|test|aarch64|fuzz|demo|bench|clean]" >&2
		exit 2 ;;
esac
