# latentheat: make demo | make test | make bench   (each sets up .venv itself)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.latentheat-installed
PYTEST_ARGS ?=
DEEPSPEED ?= deepspeed==0.19.8

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

# torch first, pinned: it is a local CPU wheel here; any other torch request pulls a CUDA build.
# deepspeed (the `deepspeed` extra, for DeepSpeedTrainer) builds against the installed torch: no build
# isolation, or pip would fetch another torch to build it
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,thrml,peft,lm_eval]"
	$(PY) -m pip install -q "setuptools>=68" wheel
	$(PY) -m pip install -q --no-build-isolation $(DEEPSPEED)
	touch $(STAMP)

demo: install
	$(VENV)/bin/accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m trainers.train \
		configs/experiments/code_image_mnist.yaml --training.output_dir outputs/demo
	@echo "samples: outputs/demo/samples.png   metrics: outputs/demo/eval_results.json"
	@cat outputs/demo/eval_results.json

test: install
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -ra -m slow $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/frame_decoding.py
	$(PY) benchmarks/trainer_overhead.py
	$(PY) benchmarks/solver.py
	$(PY) benchmarks/gibbs_vs_thrml.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/tokcom_generation.py
	$(PY) benchmarks/abstractinator_speed.py

clean:
	rm -rf outputs .pytest_cache
