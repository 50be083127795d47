# Two entry points, each doing its own setup on a fresh machine:
#   make figures   generate the phantom if absent, execute every notebook, write figures/
#   make test      run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KERNEL := hipmri-vqvae
DATA_DIR ?= data/phantom
STAMP := $(VENV)/.installed

.PHONY: setup figures test ipynb clean
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

figures: $(STAMP) $(if $(filter data/phantom,$(DATA_DIR)),data/phantom/PHANTOM.json)
	$(PY) -m vqvae_lib notebooks --data-dir $(DATA_DIR) --fig-dir figures --build build

test: $(STAMP)
	$(PY) -m pytest

# Plain .ipynb copies of the notebooks (for Jupyter users who do not use jupytext), in build/ipynb.
ipynb: $(STAMP)
	$(PY) -c "from vqvae_lib import runner; [runner.to_ipynb(p, runner.REPO / 'build/ipynb') for p in runner.notebook_paths()]"

clean:
	rm -rf build .pytest_cache
