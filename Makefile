# The original project's habits: `make pip-tools`, `make lint`, `make test`.
# torch is installed first and on its own (README, "Install"): the pinned files never name it.
PYTHON ?= python3
TORCH ?= torch==2.13.0
COMPILE = pip-compile --quiet --generate-hashes --strip-extras --unsafe-package torch \
	--no-emit-index-url --no-emit-find-links

.PHONY: pip-tools compile install lint test

# Re-pin requirements/*.txt from requirements/*.in (newest versions allowed), then install them.
pip-tools: compile install

compile:
	$(PYTHON) -m pip install -q "pip-tools>=7"
	$(COMPILE) --upgrade -o requirements/prod.txt requirements/prod.in
	$(COMPILE) --upgrade -o requirements/dev.txt requirements/dev.in

# Install exactly the pinned versions (hash-checked), then fewshot itself without dependencies.
install:
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q --require-hashes -r requirements/prod.txt -r requirements/dev.txt
	$(PYTHON) -m pip install -q --no-deps -e .

lint:
	ruff check src tests benchmarks training
	lint-imports

test:
	$(PYTHON) -m pytest -q
