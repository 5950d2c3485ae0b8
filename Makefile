# minisgm: `make book` renders the book, `make test` runs every test. Both create and fill
# the virtual environment .venv on first use (and again when requirements.txt changes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install book check-pages test test-unit check-portable clean

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

# The widget manager and require.js are vendored (npm pack, only when missing) into the
# ignored book/_vendor/ and copied into the HTML, so interactive figures render offline.
VENDOR := book/_vendor
HTML_MANAGER := @jupyter-widgets/html-manager@1.0.15
REQUIREJS := requirejs@2.3.8
WIDGETS_JS := $(VENDOR)/html/widgets/embed-amd.js $(VENDOR)/html/widgets/require.js $(VENDOR)/html/widgets/offline.js

$(VENDOR)/html/widgets/embed-amd.js:
	mkdir -p $(VENDOR)/npm $(VENDOR)/html/widgets
	cd $(VENDOR)/npm && npm pack --silent $(HTML_MANAGER) >/dev/null
	rm -rf $(VENDOR)/npm/html-manager && mkdir -p $(VENDOR)/npm/html-manager
	tar -xzf $(VENDOR)/npm/jupyter-widgets-html-manager-*.tgz -C $(VENDOR)/npm/html-manager
	cp $(VENDOR)/npm/html-manager/package/dist/*.woff* $(VENDOR)/npm/html-manager/package/dist/*.ttf \
	   $(VENDOR)/npm/html-manager/package/dist/*.eot $(VENDOR)/npm/html-manager/package/dist/*.svg $(VENDOR)/html/widgets/
	cp $(VENDOR)/npm/html-manager/package/dist/embed-amd.js $@

$(VENDOR)/html/widgets/require.js:
	mkdir -p $(VENDOR)/npm $(VENDOR)/html/widgets
	cd $(VENDOR)/npm && npm pack --silent $(REQUIREJS) >/dev/null
	tar -xzf $(VENDOR)/npm/requirejs-*.tgz -O package/require.js > $@.tmp && mv $@.tmp $@

# Loaded between the two: points the manager at its fonts and at MathJax 3 (see the file).
$(VENDOR)/html/widgets/offline.js: book/_ext/widgets_offline.js
	mkdir -p $(VENDOR)/html/widgets
	cp $< $@

# Render the book, then open every page in headless Chromium (where installed) and report
# console errors (book/_ext/check_pages.py; without Chromium it prints a note and passes).
book: $(STAMP) $(WIDGETS_JS)
	$(BIN)/jupyter-book build . -W --keep-going
	@$(MAKE) --no-print-directory check-pages
	@echo "Open _build/html/index.html (or, for search excerpts: $(BIN)/python -m http.server -d _build/html)"

# Screenshots of each page's top go to $(SHOTS) when set: make check-pages SHOTS=/tmp/shots
SHOTS ?=
check-pages:
	$(PY) book/_ext/check_pages.py _build/html $(if $(SHOTS),--screenshots $(SHOTS))

# Unit tests and strict nbval on every chapter, two workers, one notebook per worker, with
# PyTorch's native CPU kernels and its default threads; then everything again with its generic
# kernels (ATEN_CPU_CAPABILITY=default), a stand-in for "another CPU", on one thread per
# worker: committed outputs and exact float comparisons must hold on any CPU and thread count.
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadfile --nbval
test: $(STAMP)
	$(PYTEST) tests book $(PYTEST_ARGS)
	@echo "== again with the generic CPU kernels on one thread (ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1)"
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(PYTEST) tests book $(PYTEST_ARGS)

# One chapter (or any pytest path) under three kernel sets x thread counts: native kernels with
# 2 threads, generic kernels with 1, AVX2 kernels with 1 (where this CPU has AVX2):
#   make check-portable NB=book/04_langevin_dynamics.ipynb
NB ?= book
check-portable: $(STAMP)
	@set -e; for cfg in native:2 default:1 avx2:1; do cap=$${cfg%:*}; th=$${cfg#*:}; \
	  if [ $$cap = native ]; then env=""; else env="ATEN_CPU_CAPABILITY=$$cap"; fi; \
	  echo "== $(NB): kernels $$cap, $$th thread(s)"; \
	  env $$env OMP_NUM_THREADS=$$th $(BIN)/python -m pytest -q --nbval $(NB) $(PYTEST_ARGS); \
	done

test-unit: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests $(PYTEST_ARGS)

clean:
	rm -rf _build .pytest_cache
