"""Shared test settings: eight CPU devices, float32 CPU math, the fixture paths (`../shared`,
else the copies bundled in demo/), GPU skipping."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

# Eight CPU devices for the multi-device tests (set before JAX starts its backend); every
# single-device test runs on the first, as without the flag. Without a GPU, the CPU backend's
# LLVM at optimization level 0: the suite's time is mostly compiling tiny models, which this
# cuts by a third (tests/test_engine.py and test_page_decode.py on 2 cores: 211 -> 130 s); the
# tests assert values, never speed. Subprocesses (the command-line tests) inherit both.
# The few execution-bound commands (router training, long evaluations) run in a subprocess
# at the default level instead (`run_optimized_cli`), where level 0 would double their time.
# The flags as the session found them, kept for the xdist workers (which inherit the flags
# set here) and `run_optimized_cli`.
_flags = os.environ.setdefault("POLAR_JAX_TESTS_GIVEN_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
OPTIMIZED_XLA_FLAGS = _flags.strip()
if "xla_backend_optimization_level" not in _flags and not os.path.exists("/dev/nvidiactl"):
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

# XLA's compiled programs cached on disk, shared by the xdist workers and the command-line
# tests' subprocesses (which inherit these variables): the suite compiles the same fixture
# programs in many processes. Kept between runs (a developer's second run compiles little);
# the tests that check for recompilation count lowerings, which a cache hit does not skip.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "polar-jax-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 2**30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
try:
    import torch  # noqa: E402
except ImportError:  # the tests that need it skip
    pass
else:
    # PyTorch (the Hugging Face references) on one thread: the two xdist workers keep both
    # cores busy, and a team of OpenMP threads waiting for a descheduled member took ~8 ms per
    # small matmul (HF greedy generation of tiny-opt: 5.8 s instead of 0.17 s).
    torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax\.experimental\.pallas")

SHARED = Path(os.environ.get("POLAR_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DEMO = Path(__file__).resolve().parents[1] / "demo"
# The fixtures the repository ships in demo/, byte-identical to their ../shared copies. Not
# bundled: fixtures/tiny-llama.
BUNDLED = {("fixtures", "tiny-opt"): DEMO / "tiny-opt",
           ("data", "wikitext2_test.txt"): DEMO / "data" / "wikitext2_test.txt",
           ("data", "wikitext2_valid.txt"): DEMO / "data" / "wikitext2_valid.txt"}


def fixture_path(*parts: str) -> Path:
    """A fixture under `../shared` (or `$POLAR_JAX_SHARED`), else its copy bundled in demo/,
    else a skip saying where it would be."""
    path = SHARED.joinpath(*parts)
    if path.exists():
        return path
    if parts in BUNDLED:
        return BUNDLED[parts]
    pytest.skip(f"{path} is absent and demo/ does not bundle it: it lives in ../shared beside "
                "the checkout (or set POLAR_JAX_SHARED)")


# The fixtures `trained_routers` trains routers for. A test that uses it names the one it asks
# for with `@pytest.mark.routers(NAME)`: its xdist group is that fixture's.
ROUTER_FIXTURES = ("tiny-opt", "tiny-llama")
ROUTER_EPOCHS = {"tiny-opt": 1, "tiny-llama": 2}  # trained_routers's training epochs
# xdist groups, the costliest first; the rest follow in collection order. xdist hands a worker
# the next group when it is nearly done with its own: a long group handed out last would keep
# one worker busy while the other has nothing left.
COSTLIEST_FIRST = ("routers:tiny-opt", "routers:tiny-llama", "test_sparsity.py", "test_decode.py",
                   "test_page_decode.py", "test_engine_overlap.py",
                   "test_kernel_topk.py", "test_model_parity.py", "test_engine.py",
                   "test_perplexity.py")


# `pytest -m quick`: a few cheap tests of every package (kernels, models, convert, routers,
# decoding, the engine, the server's parsing, the CLI), for iteration. Per file, test names:
# a function's name takes all its cases, `name[id]` one case. A name that matches nothing in a
# collected file is an error (a renamed test must not drop out silently).
QUICK = {
    "test_imports.py": ("test_imports_flow_one_way",),
    "test_kernel_kv_write.py": ("test_write_matches_references[3-5-17-24-bfloat16]",
                                "test_bad_arguments"),
    "test_kernel_sparse_attention.py": ("test_all_groups_default_and_jit", "test_argument_errors"),
    "test_page_sparsity.py": ("test_selector_keeps_the_top_bound_pages_and_never_drops_sink_or_current",
                              "test_page_rule_and_settings_refuse_bad_values"),
    "test_kernel_selective_mlp.py": ("test_order_of_indices_does_not_matter_and_jit",
                                     "test_argument_errors"),
    "test_kernel_neuron_scores.py": ("test_quantize_rows", "test_bad_arguments"),
    "test_kernel_skinny_matmul.py": ("test_skinny_matmul_refuses_bad_arguments",),
    "test_kernel_topk.py": ("test_topk_matches_references[float32-100]", "test_topk_bad_arguments"),
    "test_config_validation.py": ("test_bad_field_is_named_in_one_line",
                                  "test_parsed_fields_agree_with_transformers"),
    "test_model_parity.py": ("test_padded_batch[opt-pre-ln]", "test_padded_batch[llama-3.1-gqa]"),
    "test_step.py": ("test_kv_cache_shapes_and_bytes",
                     "test_prefill_and_decode_step_over_slots_equal_the_full_forward[llama-gqa-xla]"),
    "test_convert_errors.py": ("test_unsupported_model_type_lists_supported_types",
                               "test_missing_tensor_is_named", "test_sharded_safetensors_matches_hf"),
    "test_files_safety.py": ("test_finite_checks_against_numpy",),
    "test_model_dir.py": ("test_everything_is_read_once",),
    "test_routers.py": ("test_batch_neuron_scores_break_ties_by_probability",
                        "test_calibration_against_brute_force", "test_unstack_int8_mlp_up"),
    "test_router_training_errors.py": ("test_damaged_metadata_is_refused_in_one_line[negative k]",),
    "test_decode.py": ("test_greedy_equals_hf_on_ragged_batch[llama-3.1-gqa]",
                       "test_filtered_logits_against_numpy", "test_bucketing"),
    "test_sparsity.py": ("test_teacher_forced_decode_equals_sparse_evaluation[opt-pre-ln-1-False-False]",),
    "test_engine.py": ("test_bad_requests_are_refused_in_one_line",),
    "test_api_errors.py": ("test_bad_prompts", "test_bad_settings"),
    "test_serve.py": ("test_chat_prompt_applies_the_template",),
    "test_perplexity.py": ("test_windows_keep_a_last_window_of_at_least_two_tokens",),
    "test_bench_args.py": ("test_bad_argument_is_refused_in_one_line",),
    "test_cli_usability.py": ("test_version", "test_usage_errors_are_one_line"),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "routers(name): the trained_routers fixture the test uses")
    config.addinivalue_line("markers", "quick: in the quick subset (`pytest -m quick`, QUICK)")
    # `--dist loadgroup` would reorder the groups by their number of tests (most first): keep
    # the order `pytest_collection_finish` gives them.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _group(item) -> str:
    """The item's xdist group: `routers:NAME` for a test of trained routers, else its file."""
    if "trained_routers" not in item.fixturenames:
        return item.path.name
    names = {marker.args[0] for marker in item.iter_markers("routers")}
    if len(names) != 1 or not names <= set(ROUTER_FIXTURES):
        raise pytest.UsageError(f"{item.nodeid} uses trained_routers: mark it with one "
                                f"@pytest.mark.routers(NAME), NAME in {ROUTER_FIXTURES}")
    return f"routers:{names.pop()}"


@pytest.hookimpl(tryfirst=True)  # before xdist's hook, which reads the groups into node ids
def pytest_collection_modifyitems(config, items):
    """GPU tests skip on a CPU. Under pytest-xdist (`-n 2 --dist loadgroup`), the tests that
    use the routers `trained_routers` trains on one fixture are one group, so those routers are
    trained once, and each file's other tests are one group, so its module fixtures are built
    once. The tests QUICK names are marked `quick`."""
    on_gpu = jax.default_backend() == "gpu"
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; the default JAX backend is CPU")
    quick = set()  # (file, name) of the QUICK entries met
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip)
        item.add_marker(pytest.mark.xdist_group(_group(item)))
        names = {item.name, item.originalname} & set(QUICK.get(item.path.name, ()))
        if names:
            item.add_marker(pytest.mark.quick)
            quick |= {(item.path.name, name) for name in names}
    if all("::" not in arg for arg in config.args):  # whole files collected
        files = {item.path.name for item in items} & QUICK.keys()
        if missing := {(file, name) for file in files for name in QUICK[file]} - quick:
            raise pytest.UsageError(f"conftest.QUICK names tests that do not exist: {sorted(missing)}")


@pytest.hookimpl(tryfirst=True)  # before xdist's hook, which sends the collection
def pytest_collection_finish(session):
    """The groups in the order xdist hands them out: COSTLIEST_FIRST, then the others as
    collected (and ordered by pytest); each group's tests keep their order."""
    rank = {group: i for i, group in enumerate(COSTLIEST_FIRST)}
    first = {}  # group -> (its rank, its first test's position)
    for i, item in enumerate(session.items):
        first.setdefault(_group(item), (rank.get(_group(item), len(rank)), i))
    session.items.sort(key=lambda item: first[_group(item)])  # stable


@pytest.fixture(scope="session")
def trained_routers(tmp_path_factory):
    """`trained_routers(name, *options)` -> (metrics, routers dir): `polar-jax train-routers` on
    a fixture with the first 60,000 tokens of WikiText-2 valid (the same split for every
    router form) and the extra `options` (e.g. another router form), run once per session per
    fixture and options. Learning rate 1e-3 for `ROUTER_EPOCHS[name]` epochs: on tiny-opt one
    epoch reaches a held-out loss of 2.334 (two: 2.275; the defaults' ten epochs at 1e-4: 2.32)
    at the same recall (attention 0.768, MLP 0.990), in 30 CPU-s of training instead of 62; on
    tiny-llama (no MLP router) training is 6 CPU-s of the 38, two epochs kept."""
    cache: dict[tuple[str, ...], tuple[dict, Path]] = {}

    def train(name: str, *options: str):
        assert name in ROUTER_FIXTURES, name
        if (name, *options) not in cache:
            model = fixture_path("fixtures", name)
            text = fixture_path("data", "wikitext2_valid.txt")
            out = tmp_path_factory.mktemp(name) / "routers"
            metrics = run_optimized_cli(["train-routers", "--model", model, "--text", text,
                                         "--max-tokens", "60000", "--lr", "1e-3",
                                         "--epochs", ROUTER_EPOCHS[name], "--out", out, *options])
            cache[name, *options] = metrics, out
        return cache[name, *options]

    return train


OPTIMIZED_CLI_TIMEOUT_S = 600


def run_optimized_cli(argv) -> dict:
    """The JSON line `polar-jax ARGV --json` prints last, run in a subprocess whose XLA
    compiles at its default optimization level (`OPTIMIZED_XLA_FLAGS`): for the execution-bound
    commands (router training, evaluations over thousands of tokens)."""
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=OPTIMIZED_XLA_FLAGS)
    # bounded: the longest (tiny-opt's router training) takes 65-100 s on 2 busy cores
    done = subprocess.run([sys.executable, "-m", "polar_jax.cli", *map(str, argv), "--json"],
                          env=env, capture_output=True, text=True, timeout=OPTIMIZED_CLI_TIMEOUT_S,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cli(capsys, argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `polar-jax ARGV` run in-process (arguments str()-ed)."""
    from polar_jax.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err
