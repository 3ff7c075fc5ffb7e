# Set-up is part of every target: a fresh machine needs only Python 3.10+ and pip.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch and torchvision first, as a matched pair: torch 2.13 CPU with PyPI torchvision fails to import.
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	# setuptools' note on editable installs is the only text left otherwise
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e '.[test,scale,ui]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bench run --method dgst --shots 3

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV)
