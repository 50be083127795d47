# Entry points, each doing its own setup on a fresh machine (make.py does the work; `python make.py TARGET`
# is the same without make, on Windows and macOS too):
#   make figures   generate the phantom if absent, execute every notebook, write figures/
#   make test      run the test suite (the browser tests need a Chromium: see README, "Browser tests")
#   make lab       open the series in JupyterLab
#   make explorer  serve the codebook explorer as a web page (Voila) on 127.0.0.1
#   make bench     benchmark data loading, training and evaluation on the full-size phantom
#   make checkpoints  retrain every committed checkpoint from the current code (resumable; about two hours on
#                  a 2-core CPU) and write checkpoints/MANIFEST.json
#   make sweeps    the short runs behind notebooks 03, 05 and 08 (resumable; about an hour on a 2-core CPU), one
#                  result JSON per run in results/sweeps/
#   make book      the series as a static website, build/book/html, from the notebooks `make figures` executed
#                  (no re-execution), and its screenshot figures/book_page.png
#   make ipynb     regenerate the published notebooks in colab/
PYTHON ?= python3
DATA_DIR ?= data/phantom
DEVICE ?= auto
# make lab: LAB_DIR is the folder it shows; LAB_ARGS more options for `jupyter lab` (the tests set the port
# there). A token goes in $JUPYTER_TOKEN, not in LAB_ARGS: every local user sees command lines in `ps`.
LAB_DIR ?= .
LAB_ARGS ?=

.PHONY: setup figures test lab explorer bench checkpoints sweeps book ipynb lock clean
setup book ipynb lock:
	$(PYTHON) make.py $@

figures explorer:
	$(PYTHON) make.py $@ --data-dir $(DATA_DIR)

test:
	$(PYTHON) make.py test

lab:
	$(PYTHON) make.py lab --lab-dir $(LAB_DIR) -- $(LAB_ARGS)

bench checkpoints sweeps:
	$(PYTHON) make.py $@ --device $(DEVICE)

clean:
	rm -rf build .pytest_cache
