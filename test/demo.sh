#!/bin/sh
# demo.sh - restores a sample snapshot through uffd-handler; run it as
# ./build.sh demo. A KVM guest reads the memory where /dev/kvm works, so the
# kernel takes the faults as in a Firecracker restore; then threads read it
# while a balloon discards pages.
set -eu
dir=build/demo
regions=8,4,4
mkdir -p "$dir"
rm -f "$dir/mem" "$dir/uffd.sock"

build/test/vmm mksnap "$dir/mem" --regions "$regions"

restore() {
	build/uffd-handler "$dir/uffd.sock" "$dir/mem" \
		>"$dir/counters.json" 2>"$dir/handler.log" &
	hpid=$!
	n=0
	until grep -q 'listening on' "$dir/handler.log" 2>/dev/null; do
		n=$((n + 1))
		[ "$n" -lt 200 ] || { cat "$dir/handler.log"; exit 1; }
		sleep 0.01
	done
	build/test/vmm run "$dir/uffd.sock" "$dir/mem" --regions "$regions" "$@"
	wait "$hpid"
	sed 's/^/  /' "$dir/handler.log"
	echo "  counters: $(cat "$dir/counters.json")"
}

if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
	echo "== restore read by a long-mode KVM guest on 2 vCPUs"
	restore --kvm --threads 2
else
	echo "== no usable /dev/kvm: restore read by 4 threads instead"
	restore --threads 4
fi
echo "== restore read by 4 threads while a balloon discards pages"
restore --threads 4 --balloon during
