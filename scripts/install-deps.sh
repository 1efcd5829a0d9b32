#!/usr/bin/env bash
# install-deps.sh installs the system tools that edgewire's build, e2e tests and demo need, then
# downloads the Go modules. It is a fast no-op when everything is already present.
#
# usage: scripts/install-deps.sh [--bench]
#   --bench  also install the benchmark tools (dnsperf)
#
# Must run as root (it calls apt-get). Debian/Ubuntu only.
set -euo pipefail

bench=0
for arg in "$@"; do
	case "$arg" in
	--bench) bench=1 ;;
	-h | --help)
		sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "install-deps.sh: unknown argument: $arg (want --bench)" >&2
		exit 2
		;;
	esac
done

packages=(
	iproute2        # ip, bridge: network namespaces, veth, routes
	iptables        # NAT routers in the e2e lab
	curl            # HTTP client in e2e tests and the demo
	dnsutils        # dig
	iperf3          # throughput tests
	socat           # ad-hoc TCP/UDP clients
	wireguard-tools # wg
	tcpdump         # packet captures when debugging e2e tests
	procps          # ps, pgrep, sysctl
	psmisc          # killall, fuser
	ca-certificates # go mod download over TLS
)
if ((bench)); then
	packages+=(dnsperf)
fi

if [[ $(id -u) -ne 0 ]]; then
	echo "install-deps.sh: must run as root (it installs packages with apt-get); try: sudo $0 $*" >&2
	exit 1
fi
if ! command -v dpkg >/dev/null || ! command -v apt-get >/dev/null; then
	echo "install-deps.sh: needs a Debian-based system (dpkg and apt-get not found)" >&2
	exit 1
fi

missing=()
for p in "${packages[@]}"; do
	# dpkg -s exits 0 for removed-but-configured packages too; check the status line.
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
		missing+=("$p")
	fi
done

if ((${#missing[@]} > 0)); then
	echo "install-deps.sh: installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq || {
		echo "install-deps.sh: apt-get update failed" >&2
		exit 1
	}
	apt-get install -y -qq --no-install-recommends "${missing[@]}" || {
		echo "install-deps.sh: apt-get install failed for: ${missing[*]}" >&2
		exit 1
	}
else
	echo "install-deps.sh: system packages already installed"
fi

# Go modules: the module proxy is reachable; go is found on PATH or in /usr/local/go.
if ! command -v go >/dev/null; then
	export PATH="$PATH:/usr/local/go/bin"
fi
if ! command -v go >/dev/null; then
	echo "install-deps.sh: go not found (looked on PATH and in /usr/local/go/bin); install Go 1.26" >&2
	exit 1
fi
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
(cd "$repo_root" && go mod download) || {
	echo "install-deps.sh: go mod download failed" >&2
	exit 1
}
