# Two commands do all the set-up on a fresh machine with Python >= 3.10:
#   make demo   - create .venv if missing, install, learn 3 generated products one after another, print the table
#   make test   - create .venv if missing, install with test extras, run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned as a pair; on the development machines pip takes them from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/moleflow demo --out demo_run

# the review-page test drives a headless Chromium from the Debian archive (.browser/); without apt it skips
test: install
	@bash tests/browser/fetch_chromium.sh >/dev/null || echo "no headless Chromium: the browser test will skip"
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/moleflow bench speed --preset cpu --json benchmarks/results/speed_cpu.json

clean:
	rm -rf demo_run .pytest_cache
