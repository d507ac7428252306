# The two commands of the README:
#   make demo   - install everything, then run the example project's tests in a microVM
#   make test   - install everything, then run the test suite (real VMs under TCG)
.PHONY: setup demo test lint bench

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/stoker run examples/hello -- make test

test: setup
	./scripts/test.sh

lint: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/ruff format --check src tests bench
	.venv/bin/mypy

bench: setup
	.venv/bin/python bench/coldstart.py
	.venv/bin/python bench/fastpath.py
	.venv/bin/python bench/levers.py
	.venv/bin/python bench/snapshots.py
	.venv/bin/python bench/images.py
	.venv/bin/python bench/scheduler.py
	.venv/bin/python bench/joblist.py
	.venv/bin/python bench/dashboard.py
	.venv/bin/python bench/network.py
	.venv/bin/python bench/github.py
	.venv/bin/python bench/gitlab.py
