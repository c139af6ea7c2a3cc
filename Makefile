# make demo | make test | make test-fast | make lint | make bench | make flickr8k | make flickr8k-scst | make bench-flickr8k | make mutants
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The browser tests drive Debian's Chromium (playwright cannot download its own browser here).
CHROMIUM ?= /usr/bin/chromium
DEMO := outputs/demo
SHAPES := data/shapes/dataset_shapes.json

.PHONY: venv demo test test-fast lint format bench bench-web bench-flickr8k clean chromium mutants flickr8k flickr8k-data flickr8k-scst

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

# The tests that train nothing and run no command end to end: a minute or two while editing.
test-fast: $(STAMP)
	CAPTION_CHROMIUM=$(CHROMIUM) $(BIN)/pytest -m "not slow"

# Plants each known-wrong equation of tests/mutants/*.toml and checks that its tests fail.
mutants: $(STAMP)
	$(BIN)/python tests/mutants/run.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Flickr8k end to end: features, training, the test split decoded and scored, the attention
# report and figures, into $(F8K)/. FLICKR8K is the folder holding Flicker8k_Dataset/ and the
# Flickr8k_text files (Flickr8k.token.txt, Flickr_8k.*Images.txt), at its top or in
# Flickr8k_text/. An interrupted run continues where it stopped (resume=auto).
FLICKR8K ?= $(firstword $(wildcard ../shared/flickr8k))
F8K := outputs/flickr8k
F8K_TOKENS = $(firstword $(wildcard $(FLICKR8K)/Flickr8k.token.txt $(FLICKR8K)/Flickr8k_text/Flickr8k.token.txt))
F8K_RUN = experiment=flickr8k_cpu data.annotations=$(F8K_TOKENS) \
	data.images=$(FLICKR8K)/Flicker8k_Dataset data.feature_cache_dir=$(F8K)/cache
F8K_MODEL := $(F8K)/checkpoints/best.pt
# $(call f8k_stage,<n>,<name>,<command>): run a stage, print and record its wall-clock time.
define f8k_stage
	@echo "== stage $(1)/5: $(2)"
	@echo "$(3)"
	@s=$$(date +%s); $(3) && t=$$(( $$(date +%s) - s )) && \
		printf '%s\t%s\t%s\n' "$(1)" "$(2)" "$$t" >> $(F8K)/stages.tsv && \
		echo "== stage $(1)/5: $(2) took $$((t / 60)) min $$((t % 60)) s"
endef

flickr8k-data:
	@test -n "$(F8K_TOKENS)" -a -d "$(FLICKR8K)/Flicker8k_Dataset" || { echo "error: Flickr8k \
	not found (FLICKR8K=$(FLICKR8K)); download Flickr8k_Dataset.zip and Flickr8k_text.zip \
	(https://forms.illinois.edu/sec/1713398, or github.com/jbrownlee/Datasets/releases), unzip \
	both into one folder and run make flickr8k FLICKR8K=<that folder>"; exit 1; }

# Training is done once summary.json exists; delete $(F8K) to train again.
$(F8K)/summary.json: | $(STAMP) flickr8k-data
	@mkdir -p $(F8K) && rm -f $(F8K)/stages.tsv
	$(call f8k_stage,1,features,$(BIN)/caption-train $(F8K_RUN) trainer.features_only=true hydra.run.dir=$(F8K)/features)
	$(call f8k_stage,2,training,$(BIN)/caption-train $(F8K_RUN) resume=auto hydra.run.dir=$(F8K))

$(F8K_MODEL): $(F8K)/summary.json

flickr8k: $(F8K_MODEL) | flickr8k-data
	@awk -F'\t' '$$1 < 3' $(F8K)/stages.tsv > $(F8K)/stages.tmp; mv $(F8K)/stages.tmp $(F8K)/stages.tsv
	$(call f8k_stage,3,test split: beam-3 decode and metrics,$(BIN)/caption-evaluate checkpoint=$(F8K_MODEL) split=test captions=$(F8K)/test_captions.jsonl output=$(F8K)/eval_test.json > $(F8K)/eval_test.txt)
	$(call f8k_stage,4,attention report of the test photos,$(BIN)/caption-visualize checkpoint=$(F8K_MODEL) split=test format=html output_dir=$(F8K)/report)
	$(call f8k_stage,5,per-word attention of the first three test photos,$(BIN)/caption-visualize checkpoint=$(F8K_MODEL) split=test max_images=3 output_dir=$(F8K)/attention)
	@echo "== seconds per stage ($(F8K)/stages.tsv):" && cut -f 2- $(F8K)/stages.tsv
	@head -n -1 $(F8K)/eval_test.txt
	@tail -n 1 $(F8K)/eval_test.txt

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

# Self-critical fine-tuning of the recipe's best.pt on CIDEr-D (built first if missing), then
# both models' test metrics side by side, decoded the same way (beam 3).
F8K_SCST := outputs/flickr8k-scst
# experiment=scst's keys, spelled out (the recipe's own experiment= stays in F8K_RUN), with
# what val chose on Flickr8k: the mean baseline and 32 images a step; 12 epochs, the longest
# run measured, with val CIDEr-D still rising (docs/training.md).
SCST_KEYS = trainer.objective=scst trainer.monitor=cider scheduler=constant optimizer.lr=5e-5 \
	trainer.scst.baseline=mean data.batch_size=32 trainer.max_epochs=12 trainer.progress=false
$(F8K_SCST)/summary.json: | $(F8K_MODEL)
	$(BIN)/caption-train $(F8K_RUN) $(SCST_KEYS) init_from=$(F8K_MODEL) resume=auto \
		hydra.run.dir=$(F8K_SCST)

flickr8k-scst: $(F8K_SCST)/summary.json | flickr8k-data
	$(BIN)/caption-evaluate checkpoint=$(F8K_MODEL) split=test output=$(F8K_SCST)/eval_test_xe.json > /dev/null
	$(BIN)/caption-evaluate checkpoint=$(F8K_SCST)/checkpoints/best.pt split=test \
		captions=$(F8K_SCST)/test_captions.jsonl output=$(F8K_SCST)/eval_test.json > /dev/null
	$(BIN)/python bench/side_by_side.py cross-entropy=$(F8K_SCST)/eval_test_xe.json \
		SCST=$(F8K_SCST)/eval_test.json | tee $(F8K_SCST)/side_by_side.md
