# The README's two commands: `make run` and `make test` (and `make prebuilt` for kernel work).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# the CPU kernels common calls use, compiled into the user's kernel cache (quick once cached)
install: $(VENV)/.installed
	$(PY) -m fusednorm warmup

run: install
	$(PY) examples/basic.py
	$(PY) examples/shapes.py
	$(PY) examples/transformer_block.py
	$(PY) examples/no_affine.py
	$(PY) -m fusednorm bench --quick

test: install
	$(PY) -m pytest tests -q -p no:cacheprovider

# after any change under src/fusednorm/cpu: the shipped kernels' bitcode (cpu/_prebuilt.py)
prebuilt: install
	$(PY) -m fusednorm.cpu.kernels._prebuild

.PHONY: install run test prebuilt
