# stele: the commands the README names.
GO       ?= go
SERVICES ?= postgres rabbitmq nats redis
BENCH    ?= .

.PHONY: help test test-short lint bench services fmt

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

services: ## start PostgreSQL, RabbitMQ, NATS and Redis when not listening (choose with SERVICES="postgres nats")
	@scripts/services.sh $(SERVICES)

test: services ## the whole suite, race detector on, against real PostgreSQL
	$(GO) vet ./...
	@test -z "$$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
	$(GO) test -race -count=1 -timeout 12m ./...

test-short: services ## a quicker pass (fewer rounds in the concurrency tests)
	$(GO) test -race -short -count=1 ./...

lint: ## gofmt and go vet
	@test -z "$$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
	$(GO) vet ./...

bench: services ## Go benchmarks of the hot paths, then stele bench on all workloads
	$(GO) test -run '^$$' -bench '$(BENCH)' -benchmem ./eventstore/...
	$(GO) run ./cmd/stele bench --workload all

fmt: ## format the code
	gofmt -w .
