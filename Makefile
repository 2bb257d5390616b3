# Two commands on a fresh machine: `make book` (the full Fashion-MNIST book) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
NAME ?= fashionmnist-$(shell date +%Y%m%d-%H%M%S)
export KDBOOK_PROGRESS ?= text

.PHONY: install data browser postgres book smoke sweep tune studies lab test check-site test-colab bench site blocks clean-interactive

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian's package when we can install it; otherwise torchvision downloads it.
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi

# A PostgreSQL server for tests/test_postgres.py (it skips, saying why, without one).
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq postgresql; fi

# Chromium for tests/test_browser.py (those tests skip, saying why, without it).
browser:
	@if ! command -v chromium >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium; fi

book: install data
	$(PY) -m kdlib run params/fashionmnist.yaml --name $(NAME)

smoke: install data
	$(PY) -m kdlib run params/smoke.yaml --name smoke-$(shell date +%Y%m%d-%H%M%S)

# make sweep SWEEP=params/sweeps/NAME.yaml [WORKERS=N] [SCHEDULER=tcp://host:8786] [RESUME=1]
sweep: install data
	@test -n "$(SWEEP)" || { echo "give the sweep file: make sweep SWEEP=params/sweeps/NAME.yaml"; exit 2; }
	$(PY) -m kdlib sweep $(SWEEP) $(if $(WORKERS),--workers $(WORKERS)) $(if $(SCHEDULER),--scheduler $(SCHEDULER)) $(if $(RESUME),--resume)

# make tune TUNE=params/tune/NAME.yaml [WORKERS=N] [SCHEDULER=tcp://host:8786] [STORAGE=URL] [TIMEOUT=2h]; goes on where a
# tuning in outputs/NAME stopped, if there is one
TUNE_OPTIONS = $(if $(WORKERS),--workers $(WORKERS)) $(if $(SCHEDULER),--scheduler $(SCHEDULER)) \
	$(if $(STORAGE),--storage $(STORAGE)) $(if $(TIMEOUT),--timeout $(TIMEOUT))
tune: install data
	@test -n "$(TUNE)" || { echo "give the tune file: make tune TUNE=params/tune/NAME.yaml"; exit 2; }
	$(PY) -m kdlib tune $(TUNE) $(TUNE_OPTIONS) $(if $(wildcard outputs/$(basename $(notdir $(TUNE)))/tune.json),--resume)

# the book's tuning studies, one after the other, each resumed where it stopped (many hours on a 2-core CPU);
# TIMEOUT=2h: no trial or run starts after 2 hours (each study's own clock), the running ones finish, and it
# stops there without error (exit status 3 of kdlib tune); make studies goes on from there
STUDIES := seed-student small-student-wide small-student-swapped
studies: install data
	@for s in $(STUDIES); do \
		resume=$$(test -f outputs/$$s/tune.json && echo --resume); \
		echo "$(PY) -m kdlib tune params/tune/$$s.yaml $(strip $(TUNE_OPTIONS)) $$resume"; \
		$(PY) -m kdlib tune params/tune/$$s.yaml $(TUNE_OPTIONS) $$resume; \
		rc=$$?; if [ $$rc = 3 ]; then echo "studies: $$s stopped by TIMEOUT=$(TIMEOUT); make studies goes on from there"; \
		exit 0; fi; [ $$rc = 0 ] || exit $$rc; done

lab: install
	KDBOOK_PROGRESS=auto $(VENV)/bin/jupyter lab notebooks/

# pytest on TEST_WORKERS processes (pytest-xdist, --dist loadfile: a test file runs whole on one worker, so its
# module fixtures are built once; the longest files first, tests/conftest.py), then the notebooks 01-03 under nbval
# in order (03 reads what 01 and 02 wrote), writing their checkpoints and outputs/interactive under a throw-away
# folder, not the repository, then the tests marked serial alone: notebook 03 live in JupyterLab, on a copy of
# what 01 and 02 left there. 04 and 05 run under nbval inside the tests that make a sweep (tests/test_sweep.py)
# and a tuning (tests/test_tune.py) for them to read.
TEST_WORKERS ?= 2
test: install data browser postgres
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests -p no:cacheprovider \
		--durations=15 --ignore=tests/test_site_links.py -m "not serial"
	root=$$(mktemp -d) && KDBOOK_ROOT=$$root $(PY) -m pytest --nbval-lax notebooks/0[1-3]_*.ipynb -p no:cacheprovider \
		--durations=5 && KDBOOK_LAB_RECORDS=$$root $(PY) -m pytest tests -p no:cacheprovider --durations=3 \
		--ignore=tests/test_site_links.py -m serial

# A Colab-like runtime (CI runs it; minutes, 6 GB in a temporary folder): a fresh venv holding what Colab
# preinstalls takes the core install (pip install .) with no version changed, then runs 01, 02 and 03 in its kernel.
test-colab: install data
	KDBOOK_COLAB_TEST=1 $(PY) -m pytest tests/test_install.py -k colab_like -p no:cacheprovider --durations=1

# the whole committed site built and every internal link and image checked (minutes: make test's site
# tests build a small site from records made for them); CI runs it after make test
check-site: install
	$(PY) -m pytest tests/test_site_links.py -p no:cacheprovider --durations=3

bench: install data
	$(PY) -m kdlib bench

# The site (docs/ and a page per committed run, notebooks rendered from their stored outputs) into site/.
site: install
	$(PY) -m kdlib site

# Every generated block (the README's answers, the site's results tables) from the committed records.
blocks: install
	$(PY) -m kdlib blocks
