"""Where a prefill call's time goes (llama-3-8b shapes, bf16, random weights): the engine's
prefill program over full rows, timed, then one call profiled by scope."""
import sys, time, json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from models import config_from_hf
from polar_jax.bench.decode import arch_hf_config, random_state
from polar_jax.bench.trace import scope_breakdown, tracing
from polar_jax.decode import Decoder
from polar_jax.sampling import SamplingParams
from polar_jax.serve.engine import Engine

rows, chunk, offset = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = config_from_hf(arch_hf_config("llama-3-8b", 4608))
model = nnx.merge(*random_state(config, jnp.bfloat16))
engine = Engine(Decoder(config, model, eos_ids=()), max_slots=rows, max_len=4608,
                prefill_chunk=chunk, prefill_rows=rows, kv_pages=rows * 288)
P, C = rows, chunk
table = np.arange(P * 288, dtype=np.int32).reshape(P, 288)
tokens = np.random.default_rng(0).integers(0, 1000, (P, C)).astype(np.int32)
positions = (offset + np.arange(C, dtype=np.int32))[None].repeat(P, 0)
valid = np.ones((P, C), bool)
last = np.full(P, C - 1, np.int32)
nxt = np.full((P, C), -1, np.int32)
samp = SamplingParams(np.zeros(P, np.float32), np.zeros(P, np.int32), np.ones(P, np.float32))
seeds = np.zeros(P, np.uint32)
args = lambda: (engine.decoder.state, engine._pages, table, tokens, positions, valid, last, nxt, samp, seeds)
def call():
    out = engine._prefill(*args(), echo=False)
    engine._pages = out[-1]
    jax.block_until_ready(out)
call(); call()
times = []
for _ in range(5):
    t = time.perf_counter(); call(); times.append(time.perf_counter() - t)
ms = float(np.median(times)) * 1e3
print(f"rows {P} chunk {C} offset {offset}: {ms:.1f} ms, {P * C / ms * 1e3:.0f} tokens/s")
hlo = engine._prefill.lower(*args(), echo=False).compile().as_text()
with tracing() as events:
    call()
b = scope_breakdown(events(), hlo, 1)
print(json.dumps({"span_us": b["span"], "parts": b["parts"]}))
for k in b["top_kernels"][:8]:
    print(f"   {k['us']:>9.0f} us {k['calls']:>5} x {k['scope']:<12} {k['kernel']}")
