# rota — see README.md. `make demo` and `make test` are all a fresh machine needs.

GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)
# Well under CI's limit; the whole suite takes a few minutes on two cores.
TEST_TIMEOUT ?= 15m

.PHONY: all build test demo deps tools vet lint cross fuzz bench cover e2e compose-test compose-images compose-tests-if-docker clean FORCE

all: build

build: bin/rota

bin/rota: FORCE
	$(GO) build -ldflags '$(LDFLAGS)' -o $@ ./cmd/rota

# Go modules; the Consul binary the Consul tests run (built once into
# ~/.cache/rota by scripts/consul-bin).
deps:
	$(GO) mod download
	@for m in $(NESTED); do (cd $$m && $(GO) mod download) || exit 1; done

tools: deps
	@[ "$$ROTA_SKIP_CONSUL" = 1 ] || { echo "make: the Consul binary the tests run (scripts/consul-bin)"; scripts/consul-bin >/dev/null; }
	@[ "$$ROTA_SKIP_BROWSER" = 1 ] || { echo "make: Chromium for the status-page test (scripts/chromium-bin)"; scripts/chromium-bin >/dev/null; }
	@[ "$$ROTA_SKIP_KUBE" = 1 ] || { echo "make: kube-apiserver for the Kubernetes discovery tests (scripts/kube-apiserver-bin; about 15 minutes the first time)"; scripts/kube-apiserver-bin >/dev/null; }
	@echo "make: redis-server for the send_expect recipe's test (scripts/redis-bin)"; scripts/redis-bin >/dev/null
	@echo "make: Patroni and PostgreSQL 15 for the Patroni recipe's test (scripts/patroni-bin)"; scripts/patroni-bin >/dev/null
	@scripts/staticcheck-bin >/dev/null

# The main module, and the two nested ones that keep their dependencies
# out of it (the browser test's driver, the bench reports' charts).
NESTED := admin/browser bench

# A nested module replaces rota with ../..: a new dependency of rota is one of
# theirs too, and an untidy go.sum there fails only on a clean clone.
vet:
	$(GO) vet ./...
	@$(GO) mod tidy -diff >/dev/null || { echo "make: go.mod is not tidy (go mod tidy)"; exit 1; }
	@for m in $(NESTED); do (cd $$m && { $(GO) mod tidy -diff >/dev/null || { echo "make: $$m/go.mod is not tidy (cd $$m && go mod tidy)"; exit 1; }; } && $(GO) vet ./...) || exit 1; done

# staticcheck at a pinned version (scripts/staticcheck-bin installs it once
# into ~/.cache/rota).
lint:
	@echo "make: staticcheck ./..."
	@"$$(scripts/staticcheck-bin)" ./...

# rota builds and vets off Linux too (macOS, Windows: goroutine relays).
cross:
	GOOS=darwin GOARCH=arm64 $(GO) vet ./cmd/rota ./proxy/... ./internal/... ./pool/ ./health/ ./server/
	GOOS=windows GOARCH=amd64 $(GO) build -o /dev/null ./cmd/rota
	GOOS=freebsd GOARCH=amd64 $(GO) build -o /dev/null ./cmd/rota

test: tools vet lint cross
	@echo "make: go test -race ./... (a few minutes)"
	$(GO) test -race -timeout $(TEST_TIMEOUT) ./...
	cd admin/browser && $(GO) test -race -timeout $(TEST_TIMEOUT) ./...
	cd bench && $(GO) test ./...
	@$(MAKE) --no-print-directory compose-tests-if-docker

# Runs rota on its embedded etcd with three self-registering demo backends:
# proxy on :8080, admin on http://127.0.0.1:9090/. Ctrl-C stops it.
# (DEMO_FLAGS: other ports, e.g. --listen :18080 --admin 127.0.0.1:19090.)
# bin/rota, not go run: Ctrl-C ends the demo with exit 0, and so make.
demo: build
	@bin/rota demo $(DEMO_FLAGS)

# Side by side with HAProxy and nginx (installed by bench/setup.sh if
# missing), then the registry convergence run. QUICK=1: about six minutes (10,000 targets included).
bench: build
	bench/setup.sh
ifeq ($(ONLY),upgrade)
	bench/isolated bench/upgrade bin/rota | tee bench/results/$$(date +%F)-upgrade.md
else
	cd bench && $(GO) build -o ../bin/benchrun ./run
	bench/isolated bin/benchrun -rota bin/rota $(if $(QUICK),-quick) $(if $(BASELINE),-baseline $(BASELINE)) $(if $(ONLY),-only $(ONLY))
endif
ifeq ($(ONLY),)
	bench/isolated bench/upgrade bin/rota | tee bench/results/$$(date +%F)$(if $(QUICK),-quick)-upgrade.md
	$(GO) test -run '^$$' -bench 'PickPolicies' -benchtime $(if $(QUICK),20000x,200000x) ./balancer/ \
	  | tee bench/results/$$(date +%F)$(if $(QUICK),-quick)-pick.txt
	cd bench && $(GO) build -o ../bin/convergence ./convergence
	bench/isolated sh -c '\
	  bin/convergence $(if $(QUICK),-changes 50) && \
	  bin/convergence -registry consul -goal 250ms $(if $(QUICK),-changes 50) && \
	  bin/convergence -registry etcd-cluster $(if $(QUICK),-changes 50) && \
	  bin/convergence -registry consul-cluster -goal 250ms $(if $(QUICK),-changes 50) && \
	  bin/convergence -registry kubernetes -goal 50ms $(if $(QUICK),-changes 50) && \
	  bin/convergence -scale 10000 -rate 1000 -churn $(if $(QUICK),3s,10s) && \
	  bin/convergence -registry dns -goal 1100ms -changes $(if $(QUICK),10,40) && \
	  bin/convergence -registry dns -scale 1000 -churn $(if $(QUICK),5s,20s) && \
	  bin/convergence -registry dns-srv -scale 1000 -churn $(if $(QUICK),5s,20s)' \
	  | tee bench/results/$$(date +%F)$(if $(QUICK),-quick)-convergence.md
	@# Docker discovery needs the engine's bridge network: not in bench/isolated.
	@if docker info >/dev/null 2>&1; then \
	  bin/convergence -registry docker -scale $(if $(QUICK),10,40) | tee -a bench/results/$$(date +%F)$(if $(QUICK),-quick)-convergence.md; \
	else echo "make bench: no Docker engine answers; the Docker discovery figure is skipped"; fi
endif

# Coverage of cmd/rota counting the rota binaries its tests run as users do
# (go test's own figure counts only the in-process tests).
cover:
	rm -rf bin/cover && mkdir -p bin/cover
	$(GO) test -cover -count=1 ./cmd/rota -args -test.gocoverdir=$(CURDIR)/bin/cover
	$(GO) tool covdata percent -i=bin/cover -pkg=github.com/rota-proxy/rota/cmd/rota

# The docker-compose topology as native processes: real Consul and etcd,
# self-registering backends, two rota instances; prints what it checked.
e2e: build tools
	$(GO) run ./e2e

# docker-compose.yml on this machine's Docker engine, from images built here
# FROM scratch (deployments/compose/local.yml; nothing is pulled), checked end
# to end and taken down again. CLUSTER=1 adds deployments/compose/cluster.yml:
# 3-member etcd and Consul clusters, a member cut off and a leader killed.
# Cached: a second run builds no binary and no image.
compose-test: deps
	$(GO) run ./deployments/compose/check $(if $(CLUSTER),-cluster)

# The FROM-scratch images only, for docker compose -f docker-compose.yml
# -f deployments/compose/local.yml up --build.
compose-images: deps
	$(GO) run ./deployments/compose/check -images

# `make test`'s last step: both compose checks when a Docker engine and the
# Compose tool answer; otherwise one line saying why they are skipped.
compose-tests-if-docker:
	@if ! err=$$(docker info 2>&1 >/dev/null); then \
		echo "compose tests skipped: docker info does not answer ($$(echo "$$err" | grep -v '^$$' | tail -1))"; \
	elif ! docker compose version >/dev/null 2>&1 && ! docker-compose version >/dev/null 2>&1; then \
		echo "compose tests skipped: no Compose tool (neither docker compose nor docker-compose)"; \
	else \
		$(MAKE) --no-print-directory compose-test && $(MAKE) --no-print-directory compose-test CLUSTER=1; \
	fi

# Short fuzzing passes of the config loader, the PROXY header path and the
# ClientHello reader (checked against crypto/tls's own).
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime 30s ./config/
	$(GO) test -run '^$$' -fuzz '^FuzzProxyHeader$$' -fuzztime 30s ./proxy/internal/relay/
	$(GO) test -run '^$$' -fuzz '^FuzzClientHello$$' -fuzztime 30s ./proxy/internal/sni/

clean:
	rm -rf bin

FORCE:
