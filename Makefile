# Entry points, each doing its own setup on a fresh machine:
#   make figures   generate the phantom if absent, execute every notebook, write figures/
#   make test      run the test suite (installs Debian's Chromium for the browser test if absent)
#   make lab       open the series in JupyterLab
#   make explorer  serve the codebook explorer as a web page (Voila) on 127.0.0.1
#   make bench     benchmark data loading, training and evaluation on the full-size phantom
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KERNEL := hipmri-vqvae
DATA_DIR ?= data/phantom
DEVICE ?= auto
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
LAB_OVERRIDES := $(VENV)/etc/jupyter/labconfig/default_setting_overrides.json

.PHONY: setup figures test ipynb lab explorer bench clean
setup: $(STAMP)

# A local virtual environment with the pinned dependencies and the project's Jupyter kernel.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python ($(KERNEL))"
	touch $@

# The default phantom; its manifest is written last, so an interrupted run is redone.
data/phantom/PHANTOM.json: | $(STAMP)
	$(PY) -m vqvae_lib phantom --out data/phantom --size small --seed 0 --force

# Debian's Chromium, which the browser test and the explorer page's screenshot drive (never downloaded by a
# test tool); a failed install stops the build.
$(CHROMIUM):
	$(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium \
		|| { echo "error: could not install Debian's chromium, needed by tests/test_browser.py" >&2; exit 1; }
	test -x $@

figures: $(STAMP) $(if $(filter data/phantom,$(DATA_DIR)),data/phantom/PHANTOM.json) $(CHROMIUM)
	$(PY) -m vqvae_lib notebooks --data-dir $(DATA_DIR) --fig-dir figures --build build
	EXPLORER_DATA_DIR=$(DATA_DIR) $(PY) -m vqvae_lib.explorer_page screenshot figures/05_explorer_page.png

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest

# JupyterLab on the series, from .venv: the jupytext scripts open as notebooks on a double click. LAB_DIR: the
# folder it shows; LAB_ARGS: more options for `jupyter lab` (the tests set the port there). A token goes in
# $JUPYTER_TOKEN, not in LAB_ARGS: every local user sees command lines in `ps`.
LAB_DIR ?= .
lab: $(STAMP)
	$(VENV)/bin/jupytext-config --settings-file $(LAB_OVERRIDES) set-default-viewer python
	$(VENV)/bin/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=$(LAB_DIR) \
		--LabApp.default_url=/lab/tree/notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# The explorer of notebook 05 as a web page (notebooks/explorer_app.py in Voila, no code shown) on 127.0.0.1,
# with the committed checkpoint and the default phantom on the CPU (EXPLORER_DATA_DIR, EXPLORER_CHECKPOINT and
# EXPLORER_DEVICE override them).
explorer: $(STAMP) data/phantom/PHANTOM.json
	$(PY) -m vqvae_lib.explorer_page serve

# The full-size phantom (12,660 slices, as many as the real data) and the benchmarks on it; DEVICE=cuda on a GPU.
data/phantom-full/PHANTOM.json: | $(STAMP)
	$(PY) -m vqvae_lib phantom --out data/phantom-full --size full --seed 0 --force

bench: $(STAMP) data/phantom-full/PHANTOM.json
	mkdir -p build
	$(PY) -m vqvae_lib bench --data-dir data/phantom-full --device $(DEVICE) --json build/bench.json

# Plain .ipynb copies of the notebooks (for Jupyter users who do not use jupytext), in build/ipynb.
ipynb: $(STAMP)
	$(PY) -c "from vqvae_lib import runner; [runner.to_ipynb(p, runner.REPO / 'build/ipynb') for p in runner.notebook_paths()]"

clean:
	rm -rf build .pytest_cache
