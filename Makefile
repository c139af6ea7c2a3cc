# make demo | make test | make lint | make bench | make bench-flickr8k | make mutants
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The browser tests drive Debian's Chromium (playwright cannot download its own browser here).
CHROMIUM ?= /usr/bin/chromium
DEMO := outputs/demo
SHAPES := data/shapes/dataset_shapes.json

.PHONY: venv demo test lint format bench bench-web bench-flickr8k clean chromium mutants

# torch/torchvision come from this machine's local wheels; `pip install -e .[dev]` pins them.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install --quiet -e '.[dev,web]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import caption, torch, torchvision, hydra, fastapi, uvicorn, multipart, playwright" 
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

# Installs Debian's chromium when it is missing (CI runs as root).
chromium:
	@test -x $(CHROMIUM) || { echo "installing chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@test -x $(CHROMIUM) || { echo "error: $(CHROMIUM) is missing; install Debian's chromium (apt-get install chromium) or set CHROMIUM=<path>"; exit 1; }

test: $(STAMP) chromium
	CAPTION_CHROMIUM=$(CHROMIUM) $(BIN)/pytest

# Plants each known-wrong equation of tests/mutants/*.toml and checks that its tests fail.
mutants: $(STAMP)
	$(BIN)/python tests/mutants/run.py

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
	$(BIN)/python bench/allocator.py --repeats 2 --steps 3

# The Flickr8k CPU recipe on the team's photos (../shared/flickr8k): feature cache, decoder
# steps, and greedy vs beam 3 with outputs/flickr8k/checkpoints/best.pt when it exists.
bench-flickr8k: $(STAMP)
	$(BIN)/python bench/flickr8k.py --out bench/flickr8k.json

# The report of 1,000 test images and POST /caption latency, with `make demo`'s model.
bench-web: $(STAMP) chromium
	$(BIN)/python bench/web.py --chromium $(CHROMIUM)
