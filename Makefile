# make test: create a local venv, install the requirements and run the tests (make test-fast: all but the slow ones).
# make demo: the same set-up, then the whole pipeline on the shipped model, in prompt mode
# (parcellation_datasets/test_1_tinybard) and in corpus mode (parcellation_datasets/heldout_corpus_tinybard_tinybard).
VENV ?= .venv
PY = $(VENV)/bin/python

.PHONY: install test test-fast demo bench model clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt
	python3 -m venv $(VENV) && $(VENV)/bin/pip install -r requirements.txt -c constraints.txt && touch $@

# the test files run in parallel, one file per worker (its module fixtures built once), one worker per core
test: install
	$(PY) -m pytest -q -n auto --dist loadfile tests

# the same without the tests marked slow (pytest.ini): a quicker loop while working; `make test` runs them all
test-fast: install
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow" tests

# the two modes side by side, one thread each (faster on 2 cores than one after the other with two threads each);
# each run's log, progress bars included, is written as it goes, and its summary shown at the end
DEMO_LOGS = parcellation_datasets/demo_prompt.log parcellation_datasets/demo_corpus.log
demo: install
	@echo "prompt mode and corpus mode run side by side; follow them with: tail -f $(DEMO_LOGS)"
	@export PATH="$(abspath $(VENV))/bin:$$PATH" OMP_NUM_THREADS=1; \
	./run_pipeline.sh > parcellation_datasets/demo_prompt.log 2>&1 & prompt=$$!; \
	./run_pipeline.sh --text parcellation_datasets/heldout_corpus_tinybard.txt \
	  > parcellation_datasets/demo_corpus.log 2>&1 & corpus=$$!; \
	failed=""; wait $$prompt || failed="$$failed parcellation_datasets/demo_prompt.log"; \
	wait $$corpus || failed="$$failed parcellation_datasets/demo_corpus.log"; \
	for log in $(DEMO_LOGS); do echo "== $$log"; tr '\r' '\n' < $$log | grep -v 'it/s\|s/it\|%|' | tail -n 30; done; \
	if [ -n "$$failed" ]; then echo "error: the demo failed, see$$failed" >&2; exit 1; fi

bench: install
	set -e; for f in bench/bench_*.py; do [ -e "$$f" ] || continue; echo "== $$f"; $(PY) $$f; done

# retrains models/tinybard (and tests/data/heldout.txt) from registry-hosted public-domain text
model: install
	$(PY) tools/train_shipped_model.py

clean:
	rm -rf parcellation_datasets/*/ bench/out
