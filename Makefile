# The two commands of the README, and what they need. Everything lands in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: up down test bench fuzz sysdeps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

# As root: the tools local mode's network namespaces and the tests need, when missing:
# libnghttp2-14 (the proxy's HTTP/2 codec loads libnghttp2.so.14 through cffi), kubectl
# (Debian's kubernetes-client) makes manifests for the inject round trip, the CNI reference
# plugins (bridge, host-local) set up pod networks for the CNI plugin's tests, Debian's
# chromium is the real browser the dashboard's tests drive (playwright's own download is
# not used).
sysdeps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; \
	  command -v iptables >/dev/null || missing="$$missing iptables"; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  command -v curl >/dev/null || missing="$$missing curl"; \
	  ldconfig -p | grep -q 'libnghttp2\.so\.14 ' || missing="$$missing libnghttp2-14"; \
	  command -v nsenter >/dev/null || missing="$$missing util-linux"; \
	  command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	  [ -x /usr/lib/cni/bridge ] || missing="$$missing containernetworking-plugins"; \
	  [ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi

up: $(STAMP) sysdeps
	$(BIN)/tulle up

down: $(STAMP)
	$(BIN)/tulle down

test: $(STAMP) sysdeps
	$(BIN)/pytest $(PYTEST_ARGS)

# Each fuzz target (fuzz/, atheris over libFuzzer) for FUZZ_SECONDS; new inputs go to
# fuzz/.work/<target>/, crashes to fuzz/.work/<target>-found/ (fix, then keep the input in
# fuzz/corpus/<target>/ as crash-<what>: tests/test_fuzz.py replays it).
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	@mkdir -p fuzz/.work
	@for t in $$($(BIN)/python -m fuzz list); do \
	  echo "== $$t ($(FUZZ_SECONDS) s)"; \
	  $(BIN)/python -m fuzz run $$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 >fuzz/.work/$$t.log 2>&1; \
	  rc=$$?; grep -E '^(stat::number_of_executed_units|Done )' fuzz/.work/$$t.log; \
	  if [ $$rc -ne 0 ]; then tail -40 fuzz/.work/$$t.log; exit 1; fi; \
	done

# Benchmarks print figures; they never pass or fail. nginx, HAProxy and the load
# generators come from apt when root.
bench: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; \
	  for t in nginx haproxy wrk; do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	  if [ -n "$$missing" ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	fi
	$(BIN)/python -m bench.proxy
	$(BIN)/python -m bench.identity
	$(BIN)/python -m bench.destination

clean:
	rm -rf $(VENV) *.egg-info
