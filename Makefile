# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: run test lint format schema services clean

$(VENV)/.installed-base: requirements/base.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements/base.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-base requirements/dev.txt
	$(PIP) install --quiet -r requirements/dev.txt
	touch $@

## make run: the whole service on this machine (API, worker, beat). Zero config:
## SQLite and an embedded broker; set DATABASE_URL, CELERY_BROKER_URL and
## REDIS_URL to run on PostgreSQL and Redis instead.
run: $(VENV)/.installed-base
	$(PY) manage.py migrate --no-input -v0
	$(PY) manage.py setup_local
	bash scripts/run_local.sh

## make test: lint, Django checks, migrations check, the whole test suite against
## the machine's PostgreSQL and Redis (started when installed but stopped).
test: $(VENV)/.installed-dev
	bash scripts/ensure_services.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DJANGO_SETTINGS_MODULE=config.settings.test $(PY) manage.py check
	DJANGO_SETTINGS_MODULE=config.settings.test DATABASE_URL=sqlite://:memory: $(PY) manage.py makemigrations --check --dry-run
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## make schema: regenerate the committed OpenAPI file.
schema: $(VENV)/.installed-dev
	DJANGO_SETTINGS_MODULE=config.settings.test $(PY) manage.py spectacular --validate --file docs/openapi.yaml

services:
	bash scripts/ensure_services.sh

clean:
	rm -rf .local var
