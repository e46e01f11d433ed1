# Benchmarks. `make bench` is the full load suite (about 15 minutes on 2 cores); `make bench-quick`
# the 2-3 minute version; `make micro` the pytest-benchmark micro benchmarks. Results go to
# benchmarks/results/ (JSON + PNG). The venv is used when present.

PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
RESULTS := benchmarks/results
LOADTEST_ARGS ?=

.PHONY: bench bench-quick bench-redis micro

bench:
	$(PYTHON) benchmarks/loadtest.py $(LOADTEST_ARGS)

bench-quick:
	$(PYTHON) benchmarks/loadtest.py --quick --out $(RESULTS)/loadtest_quick.json $(LOADTEST_ARGS)

bench-redis:
	$(PYTHON) benchmarks/loadtest.py --redis --out $(RESULTS)/loadtest_redis.json $(LOADTEST_ARGS)

micro:
	@mkdir -p $(RESULTS)
	$(PYTHON) -m pytest benchmarks/bench_*.py --benchmark-only -q -p no:cacheprovider \
		--benchmark-columns=min,median,mean,ops \
		--benchmark-json $(RESULTS)/micro.json
