#!/usr/bin/env bash
# k8s-tools.sh builds the kube-apiserver and etcd binaries the Kubernetes e2e tests run against, from
# the separate Go module in tools/k8s, and caches them in a directory that survives between runs on
# one machine. A cold build takes 10-20 minutes and ~2.5 GB of RAM on 2 cores; later runs take
# milliseconds. The cache key is a hash of the tools module (go.mod, go.sum, sources) and the Go
# version, so bumping a version rebuilds.
#
# usage: scripts/k8s-tools.sh [--print-dir]
#   --print-dir  print only the directory holding kube-apiserver and etcd (after building if needed)
#
# Environment: EDGEWIRE_TOOLS_CACHE overrides the cache root (default /var/cache/edgewire).
set -euo pipefail

print_dir=0
for arg in "$@"; do
	case "$arg" in
	--print-dir) print_dir=1 ;;
	-h | --help)
		sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "k8s-tools.sh: unknown argument: $arg (want --print-dir)" >&2
		exit 2
		;;
	esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mod="$root/tools/k8s"
if ! command -v go >/dev/null; then
	export PATH="$PATH:/usr/local/go/bin"
fi

key=$( (
	cd "$mod"
	go version
	find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) | LC_ALL=C sort | xargs sha256sum
) | sha256sum | cut -c1-16)
cache_root=${EDGEWIRE_TOOLS_CACHE:-/var/cache/edgewire}
dir="$cache_root/k8s-tools/$key"

log() { if ((!print_dir)); then echo "k8s-tools: $*"; else echo "k8s-tools: $*" >&2; fi; }

mkdir -p "$cache_root/k8s-tools"
# One build at a time per machine: a second caller waits for the first and then finds the cache.
exec 9>"$cache_root/k8s-tools/.lock"
flock 9

if [[ -x "$dir/kube-apiserver" && -x "$dir/etcd" ]]; then
	log "cached in $dir"
else
	log "building kube-apiserver and etcd into $dir (cold build: 10-20 minutes)"
	start=$(date +%s)
	tmp="$dir.tmp.$$"
	rm -rf "$tmp"
	mkdir -p "$tmp"
	(
		cd "$mod"
		go mod download
		CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
		CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$tmp/etcd" ./cmd/etcd
	) >&2
	rm -rf "$dir"
	mv "$tmp" "$dir"
	log "built in $(($(date +%s) - start)) s"
fi
if ((print_dir)); then
	echo "$dir"
fi
