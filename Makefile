# MG-Geo. `make install`, `make test`, `make build-mg-geo`. Variables:
#   SOURCES="exif:/photos table:/list.parquet"  (empty: generate the sample set first)
#   OUT=mg-geo-out  PARTS=meta  BEAM_ARGS="--runner=... "  N=200 (sample size)  TRAIN=1 (train after build)
#   RUN=mg-geo-out-run (training output)  TRAIN_ARGS="--model PATH --max-steps N ..."
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= mg-geo-out
SAMPLES ?= mg-geo-samples
N ?= 200
PARTS ?= meta
SOURCES ?=
BEAM_ARGS ?=
TRAIN ?=
TRAIN_ARGS ?=
RUN ?= $(OUT)-run
TORCH_CPU := torch==2.13.0

.PHONY: install test build-mg-geo samples train-mg-geo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# The CPU torch goes in first, so the `train` extra's torch range is already met and pip never
# fetches CUDA wheels. download = img2dataset, gcp = Beam's Dataflow/GCS IO (both tested).
install: $(BIN)/python
	$(BIN)/pip install $(TORCH_CPU)
	$(BIN)/pip install -e '.[dev,train,download,gcp]'

test:
	$(BIN)/python -m pytest -q

samples:
	$(BIN)/mg-geo sample --out $(SAMPLES) --n $(N)

build-mg-geo: $(if $(SOURCES),,samples)
	$(BIN)/mg-geo build $(foreach s,$(if $(SOURCES),$(SOURCES),exif:$(SAMPLES)),--source $(s)) \
		--out $(OUT) --parts $(PARTS) $(BEAM_ARGS)
	$(if $(TRAIN),$(MAKE) train-mg-geo OUT=$(OUT) RUN=$(RUN))

# GaGA's two stages: Meta, then Clue + Dialogue (+ Meta replay) from stage 1's weights. --resume
# makes the same lines restart a crashed run and only re-export a finished one.
train-mg-geo:
	$(BIN)/mg-geo train --data $(OUT) --output $(RUN)/stage1 --stage 1 --resume $(TRAIN_ARGS)
	$(BIN)/mg-geo train --data $(OUT) --output $(RUN)/stage2 --stage 2 --init-from $(RUN)/stage1/model --resume $(TRAIN_ARGS)

bench:
	$(BIN)/python bench/bench_build.py

clean:
	rm -rf $(OUT) $(SAMPLES) .bench-out
