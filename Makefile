# Two commands on a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
STAMP   := .venv/.stamp
PYTHON3 ?= python3

.PHONY: venv test test-slow demo bench clean

venv: $(STAMP)

# Re-install only when the pins change; the stamp is newer than setup.cfg otherwise.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON3) -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

test: venv
	$(PY) -m pytest -q

# setup.cfg's addopts deselect slow tests; a later -m wins.
test-slow: venv
	$(PY) -m pytest -q -m slow

demo: venv
	$(PY) tools/demo.py --out out/demo

bench: venv
	@if [ -f benchmarks/speedup.py ]; then $(PY) benchmarks/speedup.py; \
	else echo "benchmarks/speedup.py lands in a later issue; nothing to run yet"; fi

clean:
	rm -rf out build dist .pytest_cache .qcompile-cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
