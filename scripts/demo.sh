#!/usr/bin/env bash
# demo.sh builds a small edgewire mesh in network namespaces and shows it working:
#
#   lan     a bridge in its own namespace (10.77.1.0/24)
#   client  10.77.1.10, runs `meshctl up`; its resolv.conf points at the mesh DNS (169.254.96.16)
#   b1, b2  10.77.1.11-12, each runs `testserver http` on :8080
#
# It curls http://web.default.svc.cluster.local/ a few times (showing which backend answered), runs
# dig and `meshctl services`, and removes everything it created on exit, even on failure.
# Needs root and the tools of `make deps`. Run it with `make demo`.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
if ! command -v go >/dev/null; then
	export PATH="$PATH:/usr/local/go/bin"
fi

if [[ $(id -u) -ne 0 ]]; then
	echo "demo.sh: must run as root (it creates network namespaces and a TUN device)" >&2
	exit 1
fi
for tool in ip curl dig; do
	if ! command -v "$tool" >/dev/null; then
		echo "demo.sh: $tool not found: run \`make deps\` (scripts/install-deps.sh)" >&2
		exit 1
	fi
done

bold=$'\e[1m'
reset=$'\e[0m'
if [[ ! -t 1 ]]; then bold="" reset=""; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$reset"; }
show() {
	printf '$ %s\n' "$*"
	"$@"
}

id="ewd$(printf '%04x' $((RANDOM % 65536)))"
ns_lan="$id-lan" ns_client="$id-client" ns_b1="$id-b1" ns_b2="$id-b2"
namespaces=("$ns_lan" "$ns_client" "$ns_b1" "$ns_b2")
work=$(mktemp -d /tmp/edgewire-demo.XXXXXX)
pids=()

cleanup() {
	local rc=$?
	step "tearing down"
	# The agent first: it removes mesh0 and its routes on SIGTERM.
	for pid in "${pids[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${pids[@]}"; do
		for _ in $(seq 50); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	for ns in "${namespaces[@]}"; do
		ip netns del "$ns" 2>/dev/null || true
		rm -rf "/etc/netns/$ns"
	done
	if ((rc != 0)) && [[ -f $work/agent.log ]]; then
		echo "demo failed; last lines of the agent log:"
		tail -n 30 "$work/agent.log"
	fi
	rm -rf "$work"
	echo "removed namespaces ${namespaces[*]}"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "building meshctl and testserver"
mkdir -p bin
show go build -o bin/meshctl ./cmd/meshctl
show go build -o bin/testserver ./e2e/testserver
meshctl="$repo_root/bin/meshctl"
testserver="$repo_root/bin/testserver"

step "creating namespaces ${namespaces[*]} and the LAN bridge"
for ns in "${namespaces[@]}"; do
	ip netns add "$ns"
	ip -n "$ns" link set lo up
done
ip -n "$ns_lan" link add br0 type bridge
ip -n "$ns_lan" link set br0 up
attach() { # attach NS PORT ADDR
	ip -n "$ns_lan" link add "$2" type veth peer name eth0 netns "$1"
	ip -n "$ns_lan" link set "$2" master br0 up
	ip -n "$1" addr add "$3/24" dev eth0
	ip -n "$1" link set eth0 up
	echo "  $1: eth0 $3"
}
attach "$ns_client" p0 10.77.1.10
attach "$ns_b1" p1 10.77.1.11
attach "$ns_b2" p2 10.77.1.12

step "starting backends (testserver http on :8080)"
for b in b1 b2; do
	ns="$id-$b"
	ip netns exec "$ns" "$testserver" http --listen :8080 --name "$b" >"$work/$b.log" 2>&1 &
	pids+=($!)
done

step "writing the services file"
cat >"$work/services.yaml" <<'YAML'
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: 9.251.0.10
  ports:
  - name: http
    protocol: TCP
    port: 80
    targetPort: 8080
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: http
  protocol: TCP
  port: 8080
endpoints:
- addresses: ["10.77.1.11"]
  conditions: {ready: true}
  nodeName: client
- addresses: ["10.77.1.12"]
  conditions: {ready: true}
  nodeName: client
YAML
sed 's/^/  /' "$work/services.yaml"

step "starting the agent in $ns_client"
mkdir -p "/etc/netns/$ns_client"
echo "nameserver 169.254.96.16" >"/etc/netns/$ns_client/resolv.conf"
sock="$work/meshctl.sock"
ip netns exec "$ns_client" "$meshctl" up --node-name client \
	--services-file "$work/services.yaml" --state-dir "$work/state" \
	--control-socket "$sock" --resolv-conf /etc/resolv.conf >"$work/agent.log" 2>&1 &
pids=("$!" "${pids[@]}")
in_client() { ip netns exec "$ns_client" "$@"; }
# on_client shows a command, then runs it in the client namespace.
on_client() {
	printf '[%s]$ %s\n' "$ns_client" "$*"
	in_client "$@"
}

ready=0
for _ in $(seq 200); do
	if in_client "$meshctl" status --json --control-socket "$sock" >/dev/null 2>&1; then
		ready=1
		break
	fi
	if ! kill -0 "${pids[0]}" 2>/dev/null; then
		echo "demo.sh: the agent exited" >&2
		exit 1
	fi
	sleep 0.1
done
if ((!ready)); then
	echo "demo.sh: the agent was not ready after 20 s" >&2
	exit 1
fi
on_client "$meshctl" status --control-socket "$sock"
on_client ip route show dev mesh0

step "curling http://web.default.svc.cluster.local/ from $ns_client (round-robin over b1 and b2)"
for i in 1 2 3 4 5 6; do
	printf 'request %d: ' "$i"
	in_client curl -sS -m 5 -D - -o /dev/null http://web.default.svc.cluster.local/ | grep -i '^x-backend' | tr -d '\r'
done

step "DNS from $ns_client"
on_client dig +short web.default.svc.cluster.local
on_client dig +short _http._tcp.web.default.svc.cluster.local SRV
on_client dig +short -x 9.251.0.10

step "meshctl services"
on_client "$meshctl" services --control-socket "$sock"

step "demo done"
