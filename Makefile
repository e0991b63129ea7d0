# Quick start: `make demo` (tiny random-weight checkpoint, or CHECKPOINT=/path/to/stable-diffusion-v1-4)
# and `make test`. Both create the virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TYPINGS := $(VENV)/typings
OUT ?= out
CHECKPOINT ?=
PROMPT ?= a photo of an astronaut riding a horse on mars
STEPS ?= 20
PYTEST_ARGS ?=

.PHONY: venv demo test lint clean deploy-tools

$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch comes from the constraints file, never from the package metadata.
	$(BIN)/pip install --quiet -c constraints/cpu.txt -e ".[dev]"
	# Only for the CLIP vocabulary file of sd-tiny-checkpoint; its dependencies would pull torchvision.
	$(BIN)/pip install --quiet --no-deps "open-clip-torch==3.3.0"
	touch $@

venv: $(VENV)/.installed

demo: venv
	PATH="$(abspath $(BIN)):$$PATH" OUT="$(OUT)" CHECKPOINT="$(CHECKPOINT)" PROMPT="$(PROMPT)" STEPS="$(STEPS)" \
		bash scripts/demo.sh

# TensorRT's type stubs for mypy, outside site-packages (installed, they would make `import tensorrt` work).
$(TYPINGS)/.tensorrt-stubs-version: scripts/tensorrt_typings.py $(VENV)/.installed
	$(BIN)/python scripts/tensorrt_typings.py $(TYPINGS)
	touch $@

lint: venv $(TYPINGS)/.tensorrt-stubs-version
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	MYPYPATH="$(TYPINGS)" $(BIN)/mypy

test: lint deploy-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Deployment checks (tests/test_deploy.py): kubectl renders deploy/k8s, kubernetes-validate and checkov check the
# result. The tools live in their own virtualenv inside $(VENV): checkov pins packaging and networkx below what
# the project's packages use (torch imports networkx). deploy/tools/install-kubectl.sh links a kubectl 1.27+
# from PATH or unpacks Debian 13's (Debian 12's kubernetes-client, 1.20, is too old for the kustomizations).
DEPLOY_TOOLS := $(VENV)/deploy-tools

$(DEPLOY_TOOLS)/.installed: deploy/check-requirements.txt
	$(PYTHON) -m venv $(DEPLOY_TOOLS)
	$(DEPLOY_TOOLS)/bin/pip install --quiet -r deploy/check-requirements.txt
	touch $@

$(DEPLOY_TOOLS)/bin/kubectl: deploy/tools/install-kubectl.sh | $(DEPLOY_TOOLS)/.installed
	bash deploy/tools/install-kubectl.sh $@

deploy-tools: $(DEPLOY_TOOLS)/.installed $(DEPLOY_TOOLS)/bin/kubectl

clean:
	rm -rf $(OUT)
