#!/bin/sh
# gen-join-token.sh writes a new random join token (32 bytes from /dev/urandom, base64) to
# deploy/join-token, readable by its owner only, for the Secret that kustomization.yaml generates:
#   deploy/gen-join-token.sh && kubectl apply -k deploy/
# It never overwrites an existing token: every node and relay of a mesh must share the same one.
# To rotate, delete deploy/join-token, run this again, apply, and restart the agents and the relay.
# The token is never printed.
set -eu

dir=$(cd "$(dirname "$0")" && pwd)
file="$dir/join-token"

if [ -e "$file" ]; then
	echo "gen-join-token.sh: $file exists; not overwriting it (delete it first to make a new token)" >&2
	exit 1
fi

umask 077
token=$(head -c 32 /dev/urandom | base64 | tr -d '\n')
if [ -z "$token" ]; then
	echo "gen-join-token.sh: could not read /dev/urandom" >&2
	exit 1
fi
# noclobber: fail rather than overwrite a file created since the check above.
set -C
printf '%s\n' "$token" >"$file"
echo "wrote $file (mode 0600)"
