#!/bin/bash
# Every benchmark with --device cuda, in one call of a lent GPU machine (docs/performance.md, "On a GPU").
#
#   bash tests/benchmarks/gpu.sh prepare     # here: wheels the GPU image lacks -> .whl/, SmolLM2's config and
#                                            # tokenizer -> .devkit/smollm2/ (both ignored through .git/info/exclude)
#   bash tests/benchmarks/gpu.sh run         # there: device run, carry [".whl", ".devkit"]; all output in $OUT/bench.log
#
# The GPU image has torch, transformers, einops, jaxtyping, scipy... but not TransformerLens, SAELens or their
# import-time needs, and nothing can be installed there but carried wheels (< 64 MiB with the tree). The
# GGUF (93 MB) does not travel, so the model is SmolLM2's architecture with random weights and the banks are
# random (`--weights random`, tests/benchmarks/_models.py): speed does not depend on the weights' values.
set -u
cd "$(dirname "$0")/../.." || exit 1
if [ "${1:-}" = prepare ]; then
  mkdir -p .git/info && for p in /.whl/ /.devkit/; do grep -qx "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
  v() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
  wheels=""
  for d in transformer-lens sae-lens datasets dill multiprocess better-abc docstring-parser simple-parsing wandb pydantic \
           pydantic-core annotated-types typing-inspection platformdirs sniffio beartype typeguard fancy-einsum babe nltk \
           tenacity python-dotenv; do wheels="$wheels $d==$(v $d)"; done
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $wheels
  folder=$(.venv/bin/python -c "from tl_featureflow.embedded import _verified_cache, embedded_model_dir; print(_verified_cache(embedded_model_dir(), False))")
  mkdir -p .devkit/smollm2 && cp "$folder"/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .devkit/smollm2/
  du -sh .whl .devkit
  exit 0
fi
LOG=${OUT:-/tmp}/bench.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 \
  || { tail -5 /tmp/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TL_FEATUREFLOW_CACHE=/tmp/ffcache PYTHONWARNINGS=ignore
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; } >> "$LOG" 2>&1
python3 -c "import torch, transformers, transformer_lens, sae_lens, tl_featureflow; print('torch', torch.__version__,
  'transformers', transformers.__version__, 'sae_lens', sae_lens.__version__, 'cuda', torch.cuda.is_available())" >> "$LOG" 2>&1 \
  || { cat "$LOG"; exit 1; }
W="--weights random --config .devkit/smollm2 --device cuda"
run() {  # run SECONDS SCRIPT ARGS...: one benchmark, its output (progress bars and warnings dropped) into the log
  local t=$1 s; shift
  echo "=== $(date -u +%T) timeout $t: $*" >> "$LOG"
  s=$(date +%s)
  timeout "$t" python3 "$@" 2>&1 | grep -v -E "it/s\]|s/it\]|batch/s\]|tok/s\]|Warning|warn\(" >> "$LOG"
  echo "=== rc ${PIPESTATUS[0]}, $(( $(date +%s) - s )) s" >> "$LOG"
}
run 50 tests/benchmarks/bench_matching.py --device cuda
run 40 tests/benchmarks/bench_training.py --device cuda --no-profile
run 50 tests/benchmarks/bench_training.py --device cuda --no-profile --d-in 2304 --expansion 7 --k 64 --batch 4096 --steps 100
run 75 tests/benchmarks/bench_generate.py $W
run 40 tests/benchmarks/bench_steering.py $W
run 60 tests/benchmarks/bench_validation.py $W --texts 4
run 35 tests/benchmarks/bench_contexts.py $W
run 70 tests/benchmarks/bench_training.py --preset-rate full --rate-tokens 131072 $W
run 70 tests/benchmarks/bench_matching.py --device cuda --n 262144
echo "=== done $(date -u +%T)" >> "$LOG"
