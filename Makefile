# dtrain: `make install`, `make test`, `make demo`. Each installs what it needs first (idempotent, quick when done).
PYTHON ?= python3.11
VENV   := .venv
PIP    := $(VENV)/bin/pip --disable-pip-version-check -q
STAMP  := $(VENV)/.dtrain-installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: install test lint demo bench clean

install: $(STAMP)

# torch first (the pinned CPU wheel on local disk), then DeepSpeed built against it with its CPU shared-memory
# collective prebuilt (saves a 40-70 s JIT compile at the first deepspeed.initialize), then dtrain and the rest.
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0 ninja setuptools
	DS_BUILD_SHM_COMM=1 $(PIP) install --no-build-isolation deepspeed
	$(PIP) install -e '.[test]'
	$(VENV)/bin/python -c "import torch, deepspeed, transformers; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check dtrain launch tests bench

test: lint
	$(VENV)/bin/python -m pytest

# The demo: fetch the examples; prepare the BBC corpus (+ held-out BBC articles) and the sentiment splits as shards;
# continue MLM+NSP pretraining of MiniLM on BBC under torchrun with 2 processes, held-out MLM loss before → after.
EXAMPLES = $${DTRAIN_CACHE:-$$HOME/.cache/dtrain}/examples
DEMO     = runs/demo/data
demo: install
	$(VENV)/bin/dtrain fetch-examples
	$(VENV)/bin/dtrain prepare pretrain $(EXAMPLES)/bbc_corpus --out $(DEMO)/bbc_pretrain --tokenizer minilm \
		--max-seq-len 128 --overwrite
	for split in train dev test; do \
		$(VENV)/bin/dtrain prepare finetune $(EXAMPLES)/sentiment_en/$$split.jsonl --out $(DEMO)/sentiment_en/$$split \
			--tokenizer minilm --max-seq-len 64 --overwrite $$([ $$split = train ] || echo --labels $(DEMO)/sentiment_en/train) \
			|| exit 1; \
	done
	$(VENV)/bin/dtrain prepare pretrain $(EXAMPLES)/topic_en/dev.jsonl --out $(DEMO)/bbc_heldout --tokenizer minilm \
		--max-seq-len 128 --overwrite
	$(VENV)/bin/torchrun --standalone --nproc_per_node=2 -m dtrain.pretrain --config configs/pretrain/minilm_bbc.yaml \
		checkpoint.resume=none logging.progress_bar=false
	$(VENV)/bin/torchrun --standalone --nproc_per_node=2 -m dtrain.finetune --config configs/finetune/sentiment_en.yaml \
		data.train=$(DEMO)/sentiment_en/train data.eval=$(DEMO)/sentiment_en/dev data.test=$(DEMO)/sentiment_en/test \
		run_dir=runs/demo/sentiment checkpoint.resume=none logging.progress_bar=false
	$(VENV)/bin/dtrain predict --model runs/demo/sentiment --input examples/new_reviews.txt \
		--output runs/demo/sentiment/new_reviews.predictions.jsonl --overwrite
	cat runs/demo/sentiment/new_reviews.predictions.jsonl

# Benchmarks beside their peers (not part of `make test`; ~30 min on 2 CPU cores): each rewrites its section of
# BENCHMARKS.md. bench/gpu.sh writes "not measured" where there is no CUDA GPU.
bench: install
	$(VENV)/bin/dtrain fetch-examples --only minilm bbc_corpus sentiment_en
	$(VENV)/bin/python bench/data.py
	$(VENV)/bin/python bench/pretrain.py
	$(VENV)/bin/python bench/step_profile.py
	$(VENV)/bin/python bench/finetune.py --reps 1
	$(VENV)/bin/python bench/memory.py --models large --engines DDP,ZeRO-3,ZeRO-3@4,ZeRO-3@4:mmap
	DTRAIN_PYTHON=$(VENV)/bin/python bench/gpu.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
