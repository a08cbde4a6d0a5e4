#!/usr/bin/env bash
# The polar-jax pipeline on the bundled tiny OPT model, on a CPU in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${POLAR_JAX_DEMO_OUT:-runs/demo}
mkdir -p "$out"

echo "== convert the Hugging Face checkpoint (bf16 safetensors) into polar-jax params"
polar-jax convert demo/tiny-opt "$out/tiny-opt" --force

echo "== dense perplexity on WikiText-2 test (first 65,536 tokens, windows of 512)"
polar-jax eval perplexity --model "$out/tiny-opt" --text demo/data/wikitext2_test.txt \
    --max-tokens 65536 --dtype float32
echo "   (Hugging Face transformers, float32: 61.074)"
