# Two commands: `make demo` (the main job) and `make test`. Each creates .venv when missing.
#
# torch comes from TORCH_INDEX:
#   auto (default)  the PyTorch CPU wheel index (https://download.pytorch.org/whl/cpu) when this machine
#                   reaches it, else pip's configured index (a mirror or local wheels, as on offline CI);
#   a URL           that index, e.g. https://download.pytorch.org/whl/cu124 for a CUDA build;
#   empty           pip's configured index only (plain PyPI serves the CUDA build on Linux: gigabytes).
# EXTRAS: the package extras installed with it (default test: pytest, scipy and Ray; EXTRAS= for a
# venv without them, enough for `make demo`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= auto
EXTRAS ?= test

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	index="$(TORCH_INDEX)"; \
	if [ "$$index" = auto ]; then \
		index=$$($(BIN)/python -c "import urllib.request as u; u.urlopen('$(CPU_INDEX)/torch/', timeout=5); print('$(CPU_INDEX)')" 2>/dev/null); \
		echo "torch $(TORCH_VERSION) from $${index:-pip's configured index (the CPU wheel index is not reachable)}"; \
	fi; \
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $${index:+--index-url $$index}
	$(BIN)/pip install -q -e ".$(if $(EXTRAS),[$(EXTRAS)])"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/tgems demo --out results/demo

test: $(STAMP)
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf results .pytest_cache
