#!/usr/bin/env bash
# bench-tools.sh builds the reference programs of the benchmark suite that come from the Go module
# proxy rather than from edgewire's own go.mod — CoreDNS, from the separate module tools/coredns —
# and caches them in a directory that survives between runs on one machine. A cold build takes 2-5
# minutes on 2 cores; later runs take milliseconds. The cache key is a hash of the tools module
# (go.mod, go.sum, sources) and the Go version, so bumping a version rebuilds.
#
# usage: scripts/bench-tools.sh [--print-dir]
#   --print-dir  print only the directory holding coredns (after building if needed)
#
# Environment: EDGEWIRE_TOOLS_CACHE overrides the cache root (default /var/cache/edgewire).
set -euo pipefail

print_dir=0
for arg in "$@"; do
	case "$arg" in
	--print-dir) print_dir=1 ;;
	-h | --help)
		sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "bench-tools.sh: unknown argument: $arg (want --print-dir)" >&2
		exit 2
		;;
	esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mod="$root/tools/coredns"
if ! command -v go >/dev/null; then
	export PATH="$PATH:/usr/local/go/bin"
fi

key=$( (
	cd "$mod"
	go version
	find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) | LC_ALL=C sort | xargs sha256sum
) | sha256sum | cut -c1-16)
cache_root=${EDGEWIRE_TOOLS_CACHE:-/var/cache/edgewire}
dir="$cache_root/bench-tools/$key"

log() { if ((!print_dir)); then echo "bench-tools: $*"; else echo "bench-tools: $*" >&2; fi; }

mkdir -p "$cache_root/bench-tools"
# One build at a time per machine: a second caller waits for the first and then finds the cache.
exec 9>"$cache_root/bench-tools/.lock"
flock 9

if [[ -x "$dir/coredns" ]]; then
	log "cached in $dir"
else
	log "building coredns into $dir (cold build: 2-5 minutes)"
	start=$(date +%s)
	tmp="$dir.tmp.$$"
	rm -rf "$tmp"
	mkdir -p "$tmp"
	(
		cd "$mod"
		go mod download
		# The module's `tool` directive: CoreDNS's own main package with its default plugins.
		CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$tmp/coredns" github.com/coredns/coredns
	) >&2
	rm -rf "$dir"
	mv "$tmp" "$dir"
	log "built in $(($(date +%s) - start)) s"
fi
if ((print_dir)); then
	echo "$dir"
fi
