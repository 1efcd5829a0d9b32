# edgewire — build, check and test entry points. `make test` is what CI runs (.ci/run).

SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c

# Go may live outside PATH on a fresh machine.
ifeq ($(shell command -v go 2>/dev/null),)
export PATH := $(PATH):/usr/local/go/bin
endif

GO       ?= go
BIN      := bin
# Every main package under cmd/ that has Go files (cmd/meshctl now, cmd/mesh-relay later).
CMDS     := $(patsubst cmd/%/,%,$(sort $(dir $(wildcard cmd/*/*.go))))
E2E_PKGS := ./e2e/...

.PHONY: all deps build vet test unit e2e k8s-tools demo bench clean

all: build

deps:
	scripts/install-deps.sh

build:
	@mkdir -p $(BIN)
	@if [[ -z "$(CMDS)" ]]; then echo "build: no commands under cmd/ yet"; fi
	@for c in $(CMDS); do \
		echo "go build -o $(BIN)/$$c ./cmd/$$c"; \
		$(GO) build -o $(BIN)/$$c ./cmd/$$c; \
	done

vet:
	@unformatted=$$(gofmt -l .); \
	if [[ -n "$$unformatted" ]]; then \
		echo "gofmt: these files need formatting (run gofmt -w):"; echo "$$unformatted"; exit 1; \
	fi
	$(GO) vet ./...

# unit: every package except the e2e suite, with the race detector.
unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v '/e2e\(/\|$$\)')

# k8s-tools: kube-apiserver and etcd for the Kubernetes e2e test, built from the separate module in
# tools/k8s and cached in /var/cache/edgewire (a cold build takes 10-20 minutes; then it is instant).
k8s-tools:
	scripts/go-tools.sh k8s

# e2e: the network-namespace scenario tests (root; tools from `make deps` and `make k8s-tools`).
e2e: k8s-tools
	$(GO) test -count=1 -v -timeout 20m $(E2E_PKGS)

# test runs the e2e suite even when unit tests fail, so that one CI run shows every failure.
test: deps build vet
	@status=0; \
	$(MAKE) unit || status=1; \
	$(MAKE) e2e || status=1; \
	if ((status)); then echo "make test: FAILED (see unit and e2e output above)"; fi; \
	exit $$status

demo: deps build
	scripts/demo.sh

# bench: the benchmarks (scripts/bench.sh); also installs the benchmark tools (dnsperf) and builds the
# reference CoreDNS from the separate module in tools/coredns, cached in /var/cache/edgewire
# (scripts/go-tools.sh coredns: a cold build takes a few minutes; then it is instant).
bench:
	scripts/install-deps.sh --bench
	scripts/go-tools.sh coredns
	$(MAKE) build
	scripts/bench.sh

clean:
	rm -rf $(BIN)
	$(GO) clean -testcache
