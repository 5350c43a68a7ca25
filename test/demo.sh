#!/bin/sh
# demo.sh - restores a sample snapshot through uffd-handler; run it as
# ./build.sh demo. A KVM guest reads the memory where /dev/kvm works, so the
# kernel takes the faults as in a Firecracker restore; then threads read it
# while a balloon discards pages; then a chain of three diff snapshots over
# it is restored as it is, checked against the chain merged into one file.
set -eu
dir=build/demo
regions=8,4,4
mkdir -p "$dir"
rm -f "$dir"/*.mem "$dir/mem" "$dir/uffd.sock"

build/test/vmm mksnap "$dir/mem" --regions "$regions"

# restore CHECK-AGAINST [DIFF...] -- [VMM OPTIONS...]
restore() {
	check=$1
	shift
	layers=
	while [ "$1" != -- ]; do
		layers="$layers $1"
		shift
	done
	shift
	# shellcheck disable=SC2086
	build/uffd-handler "$dir/uffd.sock" "$dir/mem" $layers \
		>"$dir/counters.json" 2>"$dir/handler.log" &
	hpid=$!
	n=0
	until grep -q 'listening on' "$dir/handler.log" 2>/dev/null; do
		n=$((n + 1))
		[ "$n" -lt 200 ] || { cat "$dir/handler.log"; exit 1; }
		sleep 0.01
	done
	build/test/vmm run "$dir/uffd.sock" "$check" --regions "$regions" "$@"
	wait "$hpid"
	sed 's/^/  /' "$dir/handler.log"
	echo "  counters: $(cat "$dir/counters.json")"
}

if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
	echo "== restore read by a long-mode KVM guest on 2 vCPUs"
	restore "$dir/mem" -- --kvm --threads 2
else
	echo "== no usable /dev/kvm: restore read by 4 threads instead"
	restore "$dir/mem" -- --threads 4
fi
echo "== restore read by 4 threads while a balloon discards pages"
restore "$dir/mem" -- --threads 4 --balloon during
echo "== a diff-snapshot chain: the base and three diffs, served unmerged"
for i in 1 2 3; do
	build/test/vmm mkdiff "$dir/mem" "$dir/diff$i.mem" --seed "$i"
done
build/test/vmm merge "$dir/merged.mem" "$dir/mem" "$dir/diff1.mem" \
	"$dir/diff2.mem" "$dir/diff3.mem"
echo "  every page checked against the chain merged as snapshot-editor's rebase would:"
restore "$dir/merged.mem" "$dir/diff1.mem" "$dir/diff2.mem" "$dir/diff3.mem" -- \
	--threads 4
