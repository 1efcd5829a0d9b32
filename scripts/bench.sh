#!/usr/bin/env bash
# bench.sh runs edgewire's benchmark suite: e2e/bench_test.go (build tag bench) builds network
# namespaces, runs the agents, iperf3, e2e/benchtool and a reference wireguard-go in them, prints a
# table and writes the JSON report to bench/results/<UTC time>.json and bench/results/latest.json.
#
# usage: scripts/bench.sh [go test flags...]   (e.g. -run 'TestBench/singlenode')
#
# environment: BENCH_OVERLAY_MTU=N runs the cross-node agents (and the reference wireguard-go) with
# MTU N instead of the product's default; the report records it.
#
# Needs root and the tools of `scripts/install-deps.sh --bench`; `make bench` installs them and
# builds first (scripts/go-tools.sh coredns builds the reference CoreDNS). A full run takes about 15
# minutes. The numbers are measurements, not pass/fail
# thresholds: the run fails only when a transfer fails.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
if ! command -v go >/dev/null; then
	export PATH="$PATH:/usr/local/go/bin"
fi
if [[ $(id -u) -ne 0 ]]; then
	echo "bench.sh: must run as root (it creates network namespaces and TUN devices)" >&2
	exit 1
fi
for tool in ip iperf3 wg dnsperf taskset; do
	if ! command -v "$tool" >/dev/null; then
		echo "bench.sh: $tool not found: run \`scripts/install-deps.sh --bench\`" >&2
		exit 1
	fi
done

export BENCH_RESULTS_DIR="${BENCH_RESULTS_DIR:-$repo_root/bench/results}"
mkdir -p "$BENCH_RESULTS_DIR"
exec go test -tags bench -run '^TestBench' -v -count=1 -timeout 30m "$@" ./e2e/
