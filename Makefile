# make demo | make test | make lint | make bench
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := outputs/demo
SHAPES := data/shapes/dataset_shapes.json

.PHONY: venv demo test lint format bench clean

# torch/torchvision come from this machine's local wheels; `pip install -e .[dev]` pins them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install --quiet -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import caption, torch, torchvision, hydra" 
	touch $(STAMP)

venv: $(STAMP)

$(SHAPES): caption/data/shapes.py | $(STAMP)
	$(BIN)/python -m caption.data.shapes --output data/shapes

demo: $(STAMP) $(SHAPES)
	rm -rf $(DEMO)
	$(BIN)/caption-train hydra.run.dir=$(DEMO)
	$(BIN)/caption-generate checkpoint=$(DEMO)/checkpoints/best.pt \
		images='data/shapes/images/test_0000?.png' output=$(DEMO)/captions.jsonl
	head -n 5 $(DEMO)/captions.jsonl
# Attention figures of three test images (quoted twice: `[` is Hydra override syntax).
	$(BIN)/caption-visualize checkpoint=$(DEMO)/checkpoints/best.pt \
		"images='data/shapes/images/test_0000[0-2].png'" output_dir=$(DEMO)/attention
	@echo "attention figures: $(DEMO)/attention/"
	$(BIN)/caption-evaluate checkpoint=$(DEMO)/checkpoints/best.pt split=test

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache

bench: $(STAMP)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/feature_cache.py
