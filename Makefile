# Set-up is part of every target: a fresh machine needs only Python 3.10+ and pip.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch and torchvision first, as a matched pair: torch 2.13 CPU with PyPI torchvision fails to import.
TORCH   ?= torch==2.14.1 torchvision==0.29.1

EXTRAS  := --extra test --extra scale --extra ui

.PHONY: demo test install lock clean

# Exact versions from requirements.lock (refresh: make lock); the package itself without resolving again.
$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.lock
	# setuptools' note on editable installs is the only text left otherwise
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# Re-resolve every dependency (Python 3.10+, all platforms) with torch held at $(TORCH).
lock:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv
	printf '%s\n' $(TORCH) > $(VENV)/torch-pins.txt
	$(BIN)/uv pip compile pyproject.toml $(EXTRAS) -c $(VENV)/torch-pins.txt --universal \
		--python-version 3.10 --no-header -q -o requirements.lock

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bench run --method dgst --shots 3

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV)
