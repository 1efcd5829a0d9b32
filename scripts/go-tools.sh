#!/usr/bin/env bash
# go-tools.sh builds programs that the tests and benchmarks run but that edgewire's own go.mod must
# never hold, each from a separate Go module under tools/, and caches the binaries in a directory
# that survives between runs on one machine:
#
#   k8s      kube-apiserver and etcd (tools/k8s) for the Kubernetes e2e test; a cold build takes
#            10-20 minutes and ~2.5 GB of RAM on 2 cores
#   coredns  the reference CoreDNS (tools/coredns) for `make bench`; a cold build takes 2-5 minutes
#
# Later runs take milliseconds. The cache key is a hash of the tools module (go.mod, go.sum, sources)
# and the Go version, so bumping a version rebuilds.
#
# usage: scripts/go-tools.sh k8s|coredns [--print-dir]
#   --print-dir  print only the directory holding the binaries (after building if needed)
#
# Environment: EDGEWIRE_TOOLS_CACHE overrides the cache root (default /var/cache/edgewire).
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

name="" print_dir=0
for arg in "$@"; do
	case "$arg" in
	--print-dir) print_dir=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	k8s | coredns) name=$arg ;;
	*)
		echo "go-tools.sh: unknown argument: $arg (want k8s or coredns, and optionally --print-dir)" >&2
		exit 2
		;;
	esac
done
if [[ -z $name ]]; then
	echo "go-tools.sh: which tools? (want k8s or coredns)" >&2
	exit 2
fi

# binaries maps each output name to the package built from the tools module.
declare -A binaries
case $name in
k8s)
	binaries=([kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver [etcd]=./cmd/etcd)
	cold="10-20 minutes"
	;;
coredns)
	# The module's `tool` directive: CoreDNS's own main package with its default plugins.
	binaries=([coredns]=github.com/coredns/coredns)
	cold="2-5 minutes"
	;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mod="$root/tools/$name"
if ! command -v go >/dev/null; then
	export PATH="$PATH:/usr/local/go/bin"
fi

key=$( (
	cd "$mod"
	go version
	find . -type f \( -name '*.go' -o -name 'go.mod' -o -name 'go.sum' \) | LC_ALL=C sort | xargs sha256sum
) | sha256sum | cut -c1-16)
cache_root=${EDGEWIRE_TOOLS_CACHE:-/var/cache/edgewire}
dir="$cache_root/$name-tools/$key"

log() { if ((!print_dir)); then echo "go-tools $name: $*"; else echo "go-tools $name: $*" >&2; fi; }

mkdir -p "$cache_root/$name-tools"
# One build at a time per machine: a second caller waits for the first and then finds the cache.
exec 9>"$cache_root/$name-tools/.lock"
flock 9

cached=1
for bin in "${!binaries[@]}"; do
	[[ -x "$dir/$bin" ]] || cached=0
done
if ((cached)); then
	log "cached in $dir"
else
	log "building ${!binaries[*]} into $dir (cold build: $cold)"
	start=$(date +%s)
	tmp="$dir.tmp.$$"
	rm -rf "$tmp"
	mkdir -p "$tmp"
	(
		cd "$mod"
		go mod download
		for bin in "${!binaries[@]}"; do
			CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$tmp/$bin" "${binaries[$bin]}"
		done
	) >&2
	rm -rf "$dir"
	mv "$tmp" "$dir"
	log "built in $(($(date +%s) - start)) s"
fi
if ((print_dir)); then
	echo "$dir"
fi
