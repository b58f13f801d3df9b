# tsopsd: `make demo` and `make test` work on a fresh machine (they install first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on disk on these machines; unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test test-fast test-slow lint demo smoke bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# Tests run in JOBS worker processes (at most 4) of one thread each: the tiny models spend their time in
# per-operation overhead, so two one-thread workers do twice the work of one two-thread process. Tests that
# share the quick demo's checkpoints run on one worker (xdist_group "quick_demo"), which builds them once.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(JOBS) --dist loadgroup

test: install
	$(PYTEST) -m "not slow and not gpu"

# The tier to run on every edit (about a minute on 2 cores): the maths against float64, config, run state, the
# decoder and sampler on tiny models, the code map, and one CLI error per exit-code class (2, 1, 6) in-process.
FAST := tests/test_loss.py tests/test_heat.py tests/test_intervals.py tests/test_config.py tests/test_state.py \
	tests/test_structure.py tests/test_closed_form.py tests/test_decode.py tests/test_rollout.py tests/test_prompts.py \
	tests/test_host_traffic.py \
	tests/test_cli.py::test_bad_checkpoint_exit_2_one_line tests/test_cli.py::test_usage_error_exit_2 \
	tests/test_cli.py::test_unexpected_failure_exit_1_without_traceback \
	tests/test_cli.py::test_nan_loss_on_the_first_step_trained_nothing_one_line_and_no_output

test-fast: install
	$(PYTEST) -m "not slow and not gpu" -k "not reheat_method_scale_writes" $(FAST)

test-slow: install
	$(BIN)/pip install -q -e ".[dev,bench]"  # TRL: the peer benchmark and the continued-RL test
	$(PYTEST) -m "slow"

lint: install
	$(BIN)/ruff check tsopsd tests bench

demo: install
	$(BIN)/tsopsd demo

smoke: install
	$(BIN)/tsopsd demo --out runs/smoke --quick

bench: install
	$(BIN)/pip install -q -e ".[dev,bench]"
	bash bench/compare.sh
	$(BIN)/python bench/cli_step.py          # the fixed-length job through the CLI, vs TRL, with floors
	$(BIN)/python bench/prompt_heavy.py      # shared prompt prefixes vs unshared vs TRL
	$(BIN)/python bench/long_tail.py         # continuous batching vs static vs HF generate
	$(BIN)/python bench/decode.py            # one decode step, eager vs compiled, vs the bandwidth bound

clean:
	rm -rf $(VENV) runs .pytest_cache
