# Two commands on a fresh machine with Python 3.11: `make run` and `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/quickstart
export TFDS_DATA_DIR ?= $(HOME)/tensorflow_datasets

.PHONY: setup data run test kd-table kd-schemes bench clean

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	$(BIN)/python -m transferlab.kernels.build  # the native CPU conv kernels, for this CPU (seconds; optional)
	touch $@

setup: $(BIN)/.installed

data: setup  ## prepare the bundled offline datasets into $TFDS_DATA_DIR (seconds; done once)
	$(BIN)/python -m transferlab.data.prepare --datasets mnist5k,digits

run: data  ## the quickstart KD experiment: teacher, student, student+KD x 3 seeds; prints the table
	$(BIN)/python -m transferlab.main --config experiments/kd/quickstart.py --workdir $(WORKDIR)

test: setup  ## the whole suite on 8 simulated CPU devices
	$(BIN)/python -m pytest -n auto tests

kd-table: data  ## every KD method on MNIST-5k, 3 seeds -> results/kd.md
	$(BIN)/python -m transferlab.main --config experiments/kd/table.py --workdir runs/kd_table
	mkdir -p results && cp runs/kd_table/results.md results/kd.md

kd-schemes: data  ## every KD scheme (mixup, FM, HARD, multi-teacher, self-EMA, DML, born-again, partition), 3 seeds -> results/kd_schemes.md
	$(BIN)/python -m transferlab.main --config experiments/kd/schemes.py --workdir runs/kd_schemes
	mkdir -p results && cp runs/kd_schemes/results.md results/kd_schemes.md

bench: setup  ## KD step vs torchdistill (installs CPU torch into .venv-bench)
	bash bench/setup_peer.sh
	.venv-bench/bin/python bench/kd_step.py

clean:
	rm -rf $(VENV) runs
