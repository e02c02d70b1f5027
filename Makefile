# make test: create a local venv, install the requirements and run the tests (make test-fast: all but the slow ones).
# make demo: the same set-up, then the whole pipeline on the shipped model, in prompt mode
# (parcellation_datasets/test_1_tinybard) and in corpus mode (parcellation_datasets/heldout_corpus_tinybard_tinybard),
# side by side.
VENV ?= .venv
PY = $(VENV)/bin/python
TESTDEPS = .testdeps
# modules are byte-compiled when first imported rather than all at installation, which took 80 of 130 s on 2 cores
PIP = $(VENV)/bin/pip install --no-compile

.PHONY: install install-run test test-fast demo bench model clean

install: $(VENV)/.installed $(TESTDEPS)/.installed

# what the pipeline needs (pyproject.toml's dependencies, pinned by constraints.txt): all `make demo` installs
install-run: $(VENV)/.installed-run

$(VENV)/.installed-run: constraints.txt pyproject.toml
	python3 -m venv $(VENV) && $(PIP) -c constraints.txt "setuptools>=68" \
	  && $(PIP) -c constraints.txt --no-build-isolation -e . && touch $@

# and the test suite's extras (requirements.txt)
$(VENV)/.installed: requirements.txt $(VENV)/.installed-run
	$(PIP) -r requirements.txt -c constraints.txt && touch $@

# circuit-tracer, the reference tests/test_circuit_prune.py checks influence, pruning and scores against, in a folder
# of its own that only that test puts on sys.path, without its dependencies (its pinned older transformers must not
# enter the venv; the functions it checks against need only torch)
$(TESTDEPS)/.installed: | $(VENV)/.installed
	rm -rf $(TESTDEPS) && $(PIP) --no-deps --target $(TESTDEPS) circuit-tracer==0.5.0 && touch $@

# the test files run in parallel, one file per worker (its module fixtures built once), one worker per core,
# the longest files first (tests/conftest.py)
XDIST = -n auto --dist loadfile --no-loadscope-reorder

test: install
	$(PY) -m pytest -q $(XDIST) tests

# the same without the tests marked slow (pytest.ini): a quicker loop while working; `make test` runs them all
test-fast: install
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

# the two runs at once, one thread each: on 2 cores about a sixth faster than one after the other with two threads
# each (docs/performance.md); the prompt-mode run prints as it goes, the corpus-mode run into its log, shown after
CORPUS_LOG = parcellation_datasets/heldout_corpus_tinybard_demo.log
demo: install-run
	@export PATH="$(abspath $(VENV))/bin:$$PATH" OMP_NUM_THREADS=1; \
	./run_pipeline.sh --text parcellation_datasets/heldout_corpus_tinybard.txt > $(CORPUS_LOG) 2>&1 & corpus=$$!; \
	echo "== corpus mode runs beside this one: $(CORPUS_LOG)"; \
	./run_pipeline.sh; prompt=$$?; \
	echo "== waiting for the corpus-mode run"; wait $$corpus; status=$$?; \
	tail -n 25 $(CORPUS_LOG); \
	test $$prompt -eq 0 -a $$status -eq 0

bench: install
	set -e; for f in bench/bench_*.py; do [ -e "$$f" ] || continue; echo "== $$f"; $(PY) $$f; done

# retrains models/tinybard (and tests/data/heldout.txt) from registry-hosted public-domain text
model: install
	$(PY) tools/train_shipped_model.py

.PHONY: model-llama replicate
# retrains models/tinyllama-bard, the second shipped model (a Llama), on the same text with tinybard's tokenizer
model-llama: install
	$(PY) tools/train_shipped_model.py --family llama --tokenizer models/tinybard --precision fp32

# the demo's corpus-mode run on tinyllama-bard, with the same corpus, evaluation text and held-out prompts
# (parcellation_datasets/heldout_corpus_tinybard_tinyllama-bard); not part of `make demo`
replicate: install
	PATH="$(abspath $(VENV))/bin:$$PATH" ./run_pipeline.sh --text parcellation_datasets/heldout_corpus_tinybard.txt \
	  --eval_text parcellation_datasets/heldout_eval_tinybard.txt --eval_csv parcellation_datasets/heldout_tinybard.csv \
	  tinyllama-bard

clean:
	rm -rf parcellation_datasets/*/ bench/out
