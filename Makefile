# glmtopo — build, test and run. CGO is off everywhere: CUDA is loaded at run time through purego.
export CGO_ENABLED := 0
GO       ?= go
BIN      := bin/glmtopo
CACHE    ?= $(CURDIR)/.cache
FUZZTIME ?= 20000x

.PHONY: all build test vet run fuzz bench gpu-test clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/glmtopo

vet:
	$(GO) vet ./...

# The whole suite (CI runs this): vet, unit and integration tests, then short fuzz runs.
# -p 1: one package at a time. The load tests (3000-connection floods, three daemons in network
# namespaces) would otherwise share the two cores with bench/serving's millisecond-timing checks;
# serial, the suite takes as long (measured: 1m23s serial on the 2-vCPU VM, 1m19s parallel).
test: vet
	$(GO) test -count=1 -p 1 -timeout 15m ./...
	@$(MAKE) --no-print-directory fuzz

# Each fuzz target runs for FUZZTIME (go test allows one -fuzz target per run).
fuzz:
	@bash scripts/fuzz.sh $(FUZZTIME)

bench:
	$(GO) test -run '^$$' -bench . -benchtime 3x ./...

# The main job on the embedded default model.
run: build
	@bash scripts/run.sh $(BIN) $(CACHE)

# GPU tests: build test binaries here, run them on a GPU machine (see scripts/gpu-test.sh).
gpu-test:
	@bash scripts/gpu-test.sh

clean:
	rm -rf bin .cache
