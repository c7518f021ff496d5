# batctl: the two commands a fresh machine needs are `make demo` and `make test`.
#
# torch is installed first, pinned, and from PyTorch's CPU index as well as your pip's own: on
# Linux, PyPI's torch is a CUDA build of several GB, and pip prefers the CPU index's `+cpu` build
# of the same version (a local wheel of it, where pip is configured with one, is taken too).
# For a GPU machine, e.g.
#   make test TORCH_VERSION=2.5.1 TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cu124
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= --extra-index-url=https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: install demo demo-diffusion test test-all lint bench bench-quality bench-reselect clean

install:
	$(PIP) install --quiet "torch==$(TORCH_VERSION)" $(TORCH_INDEX)
	$(PIP) install --quiet -e ".[dev]"

demo: install
	$(PYTHON) -m batctl demo

demo-diffusion: install
	$(PYTHON) -m batctl demo --task diffusion

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint:
	$(PYTHON) -m ruff check batctl stages tests benchmarks
	$(PYTHON) -m ruff format --check batctl stages tests benchmarks

bench: install
	$(PYTHON) benchmarks/read_throughput.py
	$(PYTHON) benchmarks/tiny_backbones.py
	$(PYTHON) benchmarks/score_throughput.py

DEV_METHODS = mmr mmr-c64 mmr-c256 mmr-c512 mmr-d3 mmr-d7 mmr-d85 mmr-bm25 bm25 tfidf dsir embed

bench-quality: install
	$(PYTHON) benchmarks/train_recipe.py
	$(PYTHON) benchmarks/train_recipe.py --with mmr --steps 8 16 24 48 96 --out runs/train-recipe-mmr
	$(PYTHON) benchmarks/train_recipe.py --with bm25 --steps 8 16 24 48 96 --out runs/train-recipe-bm25
	$(PYTHON) benchmarks/train_recipe.py --with tfidf --steps 8 16 24 48 96 --out runs/train-recipe-tfidf
	$(PYTHON) benchmarks/train_recipe.py --family digits --out runs/train-recipe-digits
	$(PYTHON) benchmarks/bat_quality.py --domains logging email asyncio http xml --methods mmr mmr-c256 --seeds 3 4 5 --out runs/bat-quality-dev
	$(PYTHON) benchmarks/bat_quality.py --domains idlelib concurrency --methods mmr mmr-c256 --seeds 3 4 5 --out runs/bat-quality-dev-new
	$(PYTHON) benchmarks/bat_quality.py --domains logging email asyncio http xml --world-seed 1 --methods mmr mmr-c256 --seeds 3 4 5 --out runs/bat-quality-dev-ws1
	$(PYTHON) benchmarks/bat_quality.py --domains logging email asyncio http xml --methods $(DEV_METHODS) --out runs/bat-quality-dev
	$(PYTHON) benchmarks/bat_quality.py --domains idlelib concurrency --methods $(DEV_METHODS) --out runs/bat-quality-dev-new
	$(PYTHON) benchmarks/bat_quality.py --domains logging email asyncio http xml --world-seed 1 --methods $(DEV_METHODS) --out runs/bat-quality-dev-ws1
	$(PYTHON) benchmarks/bat_quality.py --domains logging email asyncio http xml idlelib concurrency --world-seed 2 --methods mmr bm25 tfidf dsir embed --out runs/bat-quality-dev-ws2
	$(PYTHON) benchmarks/bat_quality.py --methods mmr mmr-c256 mmr-d7 bm25 tfidf dsir embed
	$(PYTHON) benchmarks/bat_quality.py --world-seed 1 --methods mmr mmr-c256 bm25 tfidf dsir embed influence --out runs/bat-quality-ws1
	$(PYTHON) benchmarks/pool_reports.py runs/bat-quality/bat_quality.json runs/bat-quality-ws1/bat_quality.json --out runs/bat_quality-lm-pooled.md
	$(PYTHON) benchmarks/bat_quality.py --world-seed 2 --methods mmr bm25 tfidf dsir embed --out runs/bat-quality-ws2
	$(PYTHON) benchmarks/pool_reports.py runs/bat-quality/bat_quality.json runs/bat-quality-ws1/bat_quality.json runs/bat-quality-ws2/bat_quality.json --out runs/bat_quality-lm-pooled-ws012.md
	$(PYTHON) benchmarks/bat_quality.py --world-seed 3 --methods mmr bm25 tfidf dsir embed --out runs/bat-quality-ws3
	$(PYTHON) benchmarks/bat_quality.py --world-seed 4 --methods mmr bm25 tfidf dsir embed --out runs/bat-quality-ws4
	$(PYTHON) benchmarks/pool_reports.py runs/bat-quality/bat_quality.json runs/bat-quality-ws1/bat_quality.json runs/bat-quality-ws2/bat_quality.json runs/bat-quality-ws3/bat_quality.json runs/bat-quality-ws4/bat_quality.json --out runs/bat_quality-lm-pooled-40.md
	$(PYTHON) benchmarks/bat_quality.py --world-seed 5 --methods mmr bm25 tfidf dsir embed --out runs/bat-quality-ws5
	$(PYTHON) benchmarks/bat_quality.py --world-seed 6 --methods mmr bm25 tfidf dsir embed --out runs/bat-quality-ws6
	$(PYTHON) benchmarks/pool_reports.py runs/bat-quality/bat_quality.json runs/bat-quality-ws1/bat_quality.json runs/bat-quality-ws2/bat_quality.json runs/bat-quality-ws3/bat_quality.json runs/bat-quality-ws4/bat_quality.json runs/bat-quality-ws5/bat_quality.json runs/bat-quality-ws6/bat_quality.json --out runs/bat_quality-lm-pooled-56.md
	$(PYTHON) benchmarks/bat_quality.py --methods mmr bm25 tfidf --seeds 3 4 5 --out runs/bat-quality-s345
	$(PYTHON) benchmarks/bat_quality.py --world-seed 1 --methods mmr bm25 tfidf --seeds 3 4 5 --out runs/bat-quality-ws1-s345
	$(PYTHON) benchmarks/pool_reports.py runs/bat-quality/bat_quality.json+runs/bat-quality-s345/bat_quality.json runs/bat-quality-ws1/bat_quality.json+runs/bat-quality-ws1-s345/bat_quality.json --out runs/bat_quality-lm-pooled-6seeds.md
	$(PYTHON) benchmarks/bat_quality.py --train 24,1e-3,3 --out runs/bat-quality-plain-cv --methods influence bm25 tfidf dsir embed hybrid fusion mmr mmr-d7
	$(PYTHON) benchmarks/bat_quality.py --train 48,3e-3,4 --out runs/bat-quality-overfit --methods influence bm25 tfidf dsir embed hybrid fusion mmr mmr-d7
	$(PYTHON) benchmarks/bat_quality.py --family digits --domains seven zero three six --methods mmr-clip embed --seeds 3 4 5 --out runs/bat-quality-digits-dev
	$(PYTHON) benchmarks/bat_quality.py --family digits --domains seven zero three six --methods mmr-clip embed fusion-clip influence bm25 --out runs/bat-quality-digits-dev
	$(PYTHON) benchmarks/bat_quality.py --family digits --domains seven zero three six --world-seed 1 --methods mmr-clip embed --out runs/bat-quality-digits-dev-ws1
	$(PYTHON) benchmarks/bat_quality.py --family digits --out runs/bat-quality-digits
	$(PYTHON) benchmarks/bat_quality.py --family digits --world-seed 1 --methods mmr-clip embed bm25 influence --out runs/bat-quality-digits-ws1
	$(PYTHON) benchmarks/pool_reports.py --default mmr-clip runs/bat-quality-digits/bat_quality.json runs/bat-quality-digits-ws1/bat_quality.json --out runs/bat_quality-digits-pooled.md
	$(PYTHON) benchmarks/bat_quality.py --family digits --world-seed 2 --methods mmr-clip embed bm25 influence --out runs/bat-quality-digits-ws2
	$(PYTHON) benchmarks/pool_reports.py --default mmr-clip runs/bat-quality-digits/bat_quality.json runs/bat-quality-digits-ws1/bat_quality.json runs/bat-quality-digits-ws2/bat_quality.json --out runs/bat_quality-digits-pooled-18.md
	$(PYTHON) benchmarks/bat_quality.py --family digits --train 40,1e-3,4 --out runs/bat-quality-digits-40
	$(PYTHON) benchmarks/bat_quality.py --family digits --train 160,1e-2,8 --out runs/bat-quality-digits-long

bench-reselect: install
	$(PYTHON) benchmarks/reselect_curves.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
