# livehead — the commands the README shows. Every target sets itself up on a fresh machine.
#   make serve   set up, then run the server with the bundled avatar and model
#   make test    set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
APT_PACKAGES := espeak-ng sox libportaudio2 chromium chromium-driver firefox-esr iproute2 \
                pulseaudio pulseaudio-utils libasound2-plugins
HOST   ?= 127.0.0.1
PORT   ?= 8080
# ONNX Runtime runs the tiny networks ~1.5x faster than PyTorch here (livehead bench stream).
# BACKEND=torch skips the one-off export (~1 min) and, to keep real time on 2 cores, uses
# 3-frame windows with 2 frames of look-ahead (latency ~220 ms instead of ~120 ms).
BACKEND ?= onnx
ifeq ($(BACKEND),torch)
RUNTIME := --set stream.backend=torch --set stage2.window_frames=3 --set stage2.lookahead_frames=2
else
RUNTIME := --set stream.backend=$(BACKEND)
endif

.PHONY: setup sysdeps serve test test-all lint format typecheck bench clean

# System packages: installed when we are root and they are missing; otherwise we say what to do.
sysdeps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing system packages:$$missing (sudo apt-get install$$missing)"; fi; \
	fi

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first and pinned, so nothing pulls a multi-GB CUDA build on a CPU machine.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cpu,clients,dev]'
	touch $@

setup: sysdeps $(BIN)/.installed

serve: setup
	@if [ "$(BACKEND)" = onnx ]; then $(BIN)/livehead export onnx --if-missing --config tiny; fi
	$(BIN)/livehead serve --host $(HOST) --port $(PORT) $(RUNTIME)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy engine export training server clients livehead
	$(BIN)/pytest -q -m "not slow and not gpu and not trt" tests

# Everything that can run here, slow tests included.
test-all: setup
	$(BIN)/pytest -q -m "not gpu and not trt" tests

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

typecheck: setup
	$(BIN)/mypy engine export training server clients livehead

bench: setup
	@if [ "$(BACKEND)" = onnx ]; then $(BIN)/livehead export onnx --if-missing --config tiny; fi
	$(BIN)/livehead bench stream --realtime --config tiny $(RUNTIME) --json

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
