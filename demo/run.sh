#!/usr/bin/env bash
# The whole polar-jax pipeline on the bundled tiny OPT model, on a CPU in a few minutes:
# convert -> train routers -> generate a batch dense and sparse -> dense / sparse / oracle
# perplexity, side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${POLAR_JAX_DEMO_OUT:-runs/demo}
mkdir -p "$out"
text_eval=demo/data/wikitext2_test.txt
text_train=demo/data/wikitext2_valid.txt

echo "== 1. convert the Hugging Face checkpoint (bf16 safetensors) into polar-jax params"
polar-jax convert demo/tiny-opt "$out/model" --force

echo "== 2. train the attention-group and MLP routers (60k tokens of WikiText-2 valid)"
polar-jax train-routers --model "$out/model" --text "$text_train" --max-tokens 60000 \
    --out "$out/routers" --force

echo "== 3. generate a batch of 8 prompts, dense and sparse (50% of KV groups, calibrated MLP)"
polar-jax generate --model "$out/model" --prompts-file demo/prompts.txt --max-new-tokens 24 \
    --json > "$out/generate-dense.jsonl"
polar-jax generate --model "$out/model" --prompts-file demo/prompts.txt --max-new-tokens 24 \
    --routers "$out/routers" --attn-topk 0.5 --json > "$out/generate-sparse.jsonl"

echo "== 4. perplexity on WikiText-2 test (65,536 tokens): dense, sparse, oracle"
for mode in dense sparse oracle; do
    polar-jax eval perplexity --model "$out/model" --routers "$out/routers" --mode "$mode" \
        --attn-topk 0.5 --text "$text_eval" --max-tokens 65536 --json > "$out/ppl-$mode.json"
done

python - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
ppl = {m: json.loads((out / f"ppl-{m}.json").read_text()) for m in ("dense", "sparse", "oracle")}
gen = {m: [json.loads(l) for l in (out / f"generate-{m}.jsonl").read_text().splitlines()]
       for m in ("dense", "sparse")}
print("\n== comparison (tiny-opt, CPU; the sparse kernels run in the Pallas interpreter here,")
print("   so CPU speed says nothing about GPU speed: see docs/BENCHMARKS.md)")
print(f"{'':<8} {'perplexity':>11} {'vs dense':>9} {'generate tokens/s':>18}")
for mode in ("dense", "sparse", "oracle"):
    p = ppl[mode]["perplexity"]
    tps = f"{gen[mode][-1]['tokens_per_second']:.1f}" if mode in gen else "-"
    print(f"{mode:<8} {p:>11.3f} {p / ppl['dense']['perplexity']:>8.3f}x {tps:>18}")
same = sum(d["tokens"] == s["tokens"] for d, s in zip(gen["dense"][:-1], gen["sparse"][:-1]))
print(f"\nsparse completions identical to dense: {same} of {len(gen['dense']) - 1}")
for d, s in list(zip(gen["dense"], gen["sparse"]))[:3]:
    print(f"\n  prompt: {d['prompt']}\n  dense:  {d['completion']!r}\n  sparse: {s['completion']!r}")
PY
