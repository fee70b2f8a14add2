# Every target creates the environment in .venv when it is missing (or out of date).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt

# Fashion-MNIST (the full 70k images, standard IDX files) comes from a Debian package.
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
# The test suite compiles the kernel sources for ARM64 too (tests/kernels/test_isa.py).
CROSS  := /usr/bin/aarch64-linux-gnu-g++

# Benchmarks: PyTorch's OpenMP spin-wait makes small ops very slow on a 2-core VM.
BENCH_ENV := OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)}

.PHONY: all venv data demo test lint format bench bench-peers study results study-gpt \
	results-gpt study-paper results-paper study-structure results-structure study-same-cost \
	results-same-cost clean

all: test

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) "setuptools"
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev,huggingface,lightning,tensorboard,safetensors,compressed-tensors]"
	touch $(STAMP)

venv: $(STAMP)

data: $(FMNIST)

$(FMNIST):
	$(APT) install -y -q dataset-fashion-mnist || \
	  ($(APT) update -q && $(APT) install -y -q dataset-fashion-mnist)

$(CROSS):
	$(APT) install -y -q g++-aarch64-linux-gnu || \
	  ($(APT) update -q && $(APT) install -y -q g++-aarch64-linux-gnu)

demo: $(STAMP) $(FMNIST)
	$(BIN)/sparselearn demo

test: $(STAMP) $(CROSS)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) $(FMNIST)
	$(BENCH_ENV) $(BIN)/python benchmarks/mask_update.py --out docs/performance.md
	$(BENCH_ENV) $(BIN)/python benchmarks/fsdp_update.py --out docs/performance.md
	$(BENCH_ENV) $(BIN)/python benchmarks/memory.py --out docs/performance.md
	$(BENCH_ENV) $(BIN)/python benchmarks/speed.py --out docs/performance.md
	if grep -qw avx512f /proc/cpuinfo; then \
	  SPARSELEARN_MARCH=x86-64-v3 $(BENCH_ENV) $(BIN)/python benchmarks/speed.py \
	    --out docs/performance.md; fi
	$(BENCH_ENV) $(BIN)/python benchmarks/structure.py --out docs/performance.md
	if grep -qw avx512f /proc/cpuinfo; then \
	  SPARSELEARN_MARCH=x86-64-v3 $(BENCH_ENV) $(BIN)/python benchmarks/structure.py \
	    --out docs/performance.md; fi
	$(BENCH_ENV) $(BIN)/python benchmarks/autocast.py --out docs/performance.md
	$(BENCH_ENV) $(BIN)/python benchmarks/compiled.py --out docs/performance.md
	$(BENCH_ENV) $(BIN)/python benchmarks/op_profile.py --out docs/performance.md
	$(BENCH_ENV) $(BIN)/python benchmarks/end_to_end.py --out docs/performance.md

# sparselearn's Linear layer against PyTorch's CSR product, SparseProp and SparseLab, each
# checked against a float64 reference first (docs/performance.md, "Against the peers"). The
# peers live in an environment of their own, never the project's.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP): pyproject.toml $(CONSTRAINTS) requirements/peers.txt
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet -c $(CONSTRAINTS) "setuptools"
	$(PEERS)/bin/python -m pip install --quiet -c $(CONSTRAINTS) -e . -r requirements/peers.txt
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(BENCH_ENV) $(PEERS)/bin/python benchmarks/peers.py --out docs/performance.md
	if grep -qw avx512f /proc/cpuinfo; then \
	  SPARSELEARN_MARCH=x86-64-v3 $(BENCH_ENV) $(PEERS)/bin/python benchmarks/peers.py \
	    --out docs/performance.md; fi

# The reproduction study of docs/results.md: the paper's protocol, then the same with the
# gradient norm clipped at 5 (about two hours each on 2 cores; finished runs are skipped,
# interrupted ones resumed), sparse momentum with momentum windows (2 minutes), then the
# tables, plots and analysis.
study: $(STAMP) $(FMNIST)
	$(BIN)/sparselearn study studies/fashion_mnist.yaml
	$(BIN)/sparselearn study studies/fashion_mnist_clip.yaml
	$(BIN)/sparselearn study studies/momentum_window.yaml
	$(MAKE) results

results: $(STAMP) $(FMNIST)
	$(BIN)/sparselearn report runs/fashion-mnist --markdown docs/results.md --plots docs/figures
	$(BIN)/sparselearn report runs/fashion-mnist-clip --markdown docs/results.md \
	  --plots docs/figures/clip --section report-clip
	$(BIN)/sparselearn report runs/momentum-window --markdown docs/results.md \
	  --plots docs/figures/window --section report-window
	$(BIN)/sparselearn analyze runs/fashion-mnist-clip/lenet5/dense \
	  runs/fashion-mnist-clip/lenet5/sparse_momentum/density-0.05 --out docs/figures \
	  --markdown docs/results.md

# The transformer study of docs/results.md: tiny-gpt on stdlib-text, dense against four sparse
# methods at three densities, three seeds (about two hours on 2 cores; finished runs are
# skipped), then its tables (perplexity, and training wall time).
study-gpt: $(STAMP)
	$(BIN)/sparselearn study studies/tiny_gpt.yaml
	$(MAKE) results-gpt

results-gpt: $(STAMP)
	$(BIN)/sparselearn report runs/tiny-gpt --markdown docs/results.md --plots docs/figures/gpt \
	  --section report-gpt --wall-time

# The paper's budget (docs/results.md, "The paper's budget"): LeNet-300-100 for 100 epochs (75
# runs) and LeNet-5 for 30 epochs with clipping (27 runs), hours on 2 cores (finished runs are
# skipped, interrupted ones resumed), then their tables, the verdict on each of the paper's
# claims, learning curves and the class-selectivity analysis. Their run records (summaries,
# metrics, configs, logs, the analysis; no checkpoints) are kept in results/, so that
# results-paper regenerates docs/results.md on a clean clone, and a study resumes where the
# records end.
study-paper: $(STAMP) $(FMNIST)
	$(BIN)/sparselearn study studies/paper_lenet300.yaml
	$(BIN)/sparselearn study studies/paper_lenet5.yaml
	$(BIN)/sparselearn study studies/window_lenet300.yaml
	$(MAKE) results-paper

CURVES := --curves dense sparse_momentum@0.05 sparse_momentum@0.2

results-paper: $(STAMP) $(FMNIST)
	$(BIN)/sparselearn report results/paper-lenet5 --markdown docs/results.md \
	  --plots docs/figures/paper --section report-paper-lenet5 --claims $(CURVES)
	$(BIN)/sparselearn analyze results/paper-lenet5/lenet5/dense \
	  results/paper-lenet5/lenet5/sparse_momentum/density-0.05 --out docs/figures/paper \
	  --markdown docs/results.md --section analysis-paper
	$(BIN)/sparselearn report results/paper-lenet300 --markdown docs/results.md \
	  --plots docs/figures/paper --section report-paper-lenet300 --claims $(CURVES)
	$(BIN)/sparselearn report results/window-lenet300 \
	  results/paper-lenet300/lenet300-100/sparse_momentum/density-0.05 \
	  --markdown docs/results.md --section report-paper-window

# Structured sparsity (docs/results.md, "Structured sparsity"): RigL and sparse momentum with and
# without constant fan-in at 95% and 90% sparsity, and 2:4 at 50%, on Fashion-MNIST
# LeNet-300-100 (a few minutes) and tiny-gpt (about an hour on 2 cores), 3 seeds; records kept
# in results/ (finished runs are skipped), then the tables and what structure costs.
study-structure: $(STAMP) $(FMNIST)
	$(BIN)/sparselearn study studies/structure_lenet300.yaml
	$(BIN)/sparselearn study studies/structure_lenet300_24.yaml
	$(BIN)/sparselearn study studies/structure_gpt.yaml
	$(BIN)/sparselearn study studies/structure_gpt_24.yaml
	$(MAKE) results-structure

results-structure: $(STAMP)
	$(BIN)/sparselearn report results/structure-lenet300 --markdown docs/results.md \
	  --section report-structure-lenet300 --structure-costs
	$(BIN)/sparselearn report results/structure-gpt --markdown docs/results.md \
	  --section report-structure-gpt --structure-costs

# Bigger and sparse at the same cost (docs/results.md): tiny-gpt made 2x and 4x wider and
# trained sparse at the dense model's non-zeros or training FLOPs against dense tiny-gpt trained
# for one to three epochs (hours on 2 cores), then LeNet-300-100 made 2x and 4x wider at its
# non-zeros against dense LeNet-300-100 over 6 to 24 epochs (half an hour), 3 seeds; records
# kept in results/ (finished runs are skipped, interrupted ones resumed), then the comparisons
# at the same steps and the same wall time and the figures of quality against wall time. Wall
# times are compared per machine: on a machine new to the study two dense tiny-gpt runs time
# the dense step there first (results/same-cost-gpt/timing/<machine>).
study-same-cost: $(STAMP) $(FMNIST)
	$(BIN)/sparselearn study studies/same_cost_gpt_dense.yaml
	$(BIN)/sparselearn study studies/same_cost_gpt_timing.yaml
	$(BIN)/sparselearn study studies/same_cost_gpt_256.yaml
	$(BIN)/sparselearn study studies/same_cost_lenet300_dense.yaml
	$(BIN)/sparselearn study studies/same_cost_lenet300.yaml
	$(BIN)/sparselearn study studies/same_cost_gpt_512.yaml
	$(MAKE) results-same-cost

results-same-cost: $(STAMP)
	$(BIN)/sparselearn report results/same-cost-gpt --same-cost tiny-gpt --markdown docs/results.md \
	  --plots docs/figures/same-cost --section report-same-cost-gpt
	$(BIN)/sparselearn report results/same-cost-lenet300 --same-cost lenet300-100 \
	  --markdown docs/results.md --plots docs/figures/same-cost --section report-same-cost-lenet300

clean:
	rm -rf $(VENV) $(PEERS) .pytest_cache .mypy_cache .ruff_cache .hypothesis
