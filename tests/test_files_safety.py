"""File safety (`polar_jax.files`): nothing outside SRC is read and nothing that is not a
regular file is opened; an output never overlaps its inputs, never replaces an existing
destination without --force (not even one that appears meanwhile), leaves nothing behind on
failure, and a killed run's debris is removed by the next; weights are finite, also after a
narrowing cast.

Every bad input is checked for: exit code 2 (or PolarJaxError), a one-line message naming the
problem, no traceback, no output or temporary left, and the source untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_convert_errors import (  # noqa: E402, F401  (the tiny HF checkpoints, CLI helpers)
    _assert_cli_error,
    _assert_logits_match,
    _copy_source,
    _edit_tensors,
    _snapshot,
    llama_sharded,
    opt_hf,
    opt_pickle,
    opt_src,
)

import polar_jax.files as files  # noqa: E402
from convert import convert_checkpoint  # noqa: E402
from polar_jax.errors import PolarJaxError  # noqa: E402
from polar_jax.loading import load_model, load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FC1 = "model.decoder.layers.0.fc1.weight"  # OPT [ffn_dim, hidden] = (64, 32), ours 'layers/0/mlp/w_in'


# ---------------------------------------------------------------------------------------------
# Helpers.


def _debris(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _assert_untouched_and_clean(before: dict, src: Path, dst_parent: Path) -> None:
    assert _snapshot(src) == before, "the source changed"
    assert not _debris(dst_parent), _debris(dst_parent)


def _one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message, message
    return message


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fails the test instead of hanging (a blocked open() of a FIFO is interrupted)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _convert_process(src: Path, dst: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "polar_jax.cli", "convert", str(src), str(dst),
                             *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def sharded_copy(llama_sharded, tmp_path):
    """(copy of the sharded Llama, its index dict, the first shard's name)."""
    src = _copy_source(llama_sharded[0], tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src, index, sorted(set(index["weight_map"].values()))[0]


def _set(tensors: dict, name: str, indices, value) -> None:
    """Sets `tensors[name][index] = value` for each index (on a copy)."""
    array = tensors[name].copy()
    for index in indices:
        array[index] = value
    tensors[name] = array


def _rename_shard(src: Path, index: dict, old: str, new: str) -> None:
    index["weight_map"] = {k: (new if v == old else v) for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


# ---------------------------------------------------------------------------------------------
# Containment: shards and every other file a checkpoint names or holds.


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_shard_outside_src_is_refused(sharded_copy, tmp_path, capsys, how):
    src, index, shard = sharded_copy
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((src / shard).read_bytes())  # a readable shard: only its place is wrong
    if how == "symlink":
        (src / shard).unlink()
        (src / shard).symlink_to(outside)
        named = shard
    else:
        named = "../elsewhere.safetensors" if how == "relative" else str(outside)
        _rename_shard(src, index, shard, named)
    before, dst = _snapshot(src), tmp_path / "out"
    line = _assert_cli_error(capsys, ["convert", src, dst], "model.safetensors.index.json",
                             f"names shard {named!r}", "lies outside", str(outside))
    assert "Traceback" not in line
    assert not dst.exists()
    _assert_untouched_and_clean(before, src, tmp_path)


def test_pickle_index_shard_outside_src_is_refused(opt_pickle, tmp_path, capsys):
    src = _copy_source(opt_pickle, tmp_path)
    (src / "pytorch_model.bin").rename(tmp_path / "outside.bin")
    (src / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"model.decoder.embed_tokens.weight": "../outside.bin"}}))
    before, dst = _snapshot(src), tmp_path / "out"
    _assert_cli_error(capsys, ["convert", src, dst, "--allow-pickle"],
                      "pytorch_model.bin.index.json", "'../outside.bin'", "lies outside")
    assert not dst.exists()
    _assert_untouched_and_clean(before, src, tmp_path)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_file_symlinked_outside_src_is_refused(opt_src, tmp_path, capsys, name):
    """The weights, the config and a side file that convert copies."""
    src = _copy_source(opt_src, tmp_path)
    outside = tmp_path / f"outside-{name}"
    (src / name).rename(outside)
    (src / name).symlink_to(outside)
    before, dst = _snapshot(src), tmp_path / "out"
    _assert_cli_error(capsys, ["convert", src, dst], str(src / name), "lies outside", str(outside))
    assert not dst.exists()
    _assert_untouched_and_clean(before, src, tmp_path)


@pytest.mark.parametrize("name", ["shard", "model.safetensors", "config.json",
                                  "tokenizer_config.json", "model.safetensors.index.json"])
def test_fifo_is_refused_without_opening(opt_src, sharded_copy, tmp_path, capsys, name):
    """A FIFO would block the first open() forever: refused from its stat alone."""
    if name in ("shard", "model.safetensors.index.json"):
        src, _, shard = sharded_copy
        name = shard if name == "shard" else name
    else:
        src = _copy_source(opt_src, tmp_path, "opt")
    (src / name).unlink()
    os.mkfifo(src / name)
    dst = tmp_path / "out"
    with _deadline(120):
        line = _assert_cli_error(capsys, ["convert", src, dst], "not a regular file (a FIFO)")
    assert name in line
    assert not dst.exists() and not _debris(tmp_path)


def test_a_side_file_swapped_for_a_symlink_meanwhile_is_never_copied(opt_src, tmp_path,
                                                                     monkeypatch):
    """A thread swaps tokenizer_config.json for a symlink to a file outside SRC and back, in a
    loop, while the weights are read and written, and leaves the symlink there: DST gets the
    file that was checked (read through one descriptor), never the outside one."""
    import convert.convert as conversion

    src = _copy_source(opt_src, tmp_path)
    name = "tokenizer_config.json"
    original = (src / name).read_bytes()
    (tmp_path / "copy.json").write_bytes(original)
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": "from outside SRC"}')
    stop, swaps = threading.Event(), []

    def swap(link: bool) -> None:
        temporary = src / f".swap-{len(swaps)}"
        temporary.symlink_to(secret) if link else shutil.copyfile(tmp_path / "copy.json",
                                                                   temporary)
        os.replace(temporary, src / name)
        swaps.append(link)

    def loop() -> None:
        while not stop.is_set():
            swap(link=not len(swaps) % 2)
        swap(link=True)

    swapper = threading.Thread(target=loop, daemon=True)
    read, save = conversion.read_hf_params, conversion.save_arrays

    def reading(*args, **kwargs):
        swapper.start()
        return read(*args, **kwargs)

    def saving(*args, **kwargs):
        try:
            save(*args, **kwargs)
        finally:
            stop.set()
            swapper.join()

    monkeypatch.setattr(conversion, "read_hf_params", reading)
    monkeypatch.setattr(conversion, "save_arrays", saving)
    convert_checkpoint(str(src), str(tmp_path / "out"))
    assert len(swaps) > 2 and (src / name).is_symlink()
    assert (tmp_path / "out" / name).read_bytes() == original


def test_a_failed_write_of_the_params_is_one_line(opt_src, tmp_path):
    """The disk filling up while orbax writes the params: a real failed write, made by a file
    size limit of 4 KiB on the converting process (EFBIG, the path ENOSPC takes; SIGXFSZ
    ignored, so that the write fails instead of killing the process). The tests' persistent
    compilation cache is off there: its own writes would hit the limit first."""
    dst = tmp_path / "out"
    limited = ["bash", "-c", "trap '' XFSZ && ulimit -f 4 && exec \"$@\"", "bash"]
    run = subprocess.run([*limited, sys.executable, "-m", "polar_jax.cli", "convert",
                          str(opt_src), str(dst), "--quiet"], cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=""),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.startswith(f"polar-jax: error: {dst} was not written: [Errno 27] File too "
                                 "large: ") and run.stderr.count("\n") == 1, run.stderr[-3000:]
    assert not dst.exists() and not _debris(tmp_path)


def test_a_failed_save_waits_for_the_writes_still_under_way(tmp_path):
    """What a failed orbax save leaves running (tensorstore's writes, which create their
    directories) ends before the staging directory is removed: the wait returns only once the
    tree has been still for its quiet time, and not later than its limit."""
    stop_at = time.monotonic() + 0.6 + np.random.default_rng().uniform(0, 0.3)
    written = []  # the time each write had ended

    def writer() -> None:
        while time.monotonic() < stop_at:
            path = tmp_path / "a" / f"{len(written)}" / "d"
            path.parent.mkdir(parents=True)
            path.write_bytes(b"x")
            written.append(time.monotonic())
            time.sleep(0.05)

    thread = threading.Thread(target=writer)
    thread.start()
    files._wait_until_unchanged(tmp_path, quiet_s=0.3)
    returned, writes_then = time.monotonic(), len(written)
    thread.join()
    assert len(written) == writes_then > 2  # no write after it returned
    assert returned >= written[-1] + 0.3 - 0.1, returned - written[-1]  # 0.1: the writer's
    # record of its last write may come late under load
    start = time.monotonic()
    files._wait_until_unchanged(tmp_path, quiet_s=10.0, limit_s=0.2)  # still, but the limit
    assert time.monotonic() - start < 1.0


def test_a_full_disk_while_copying_the_side_files_is_one_line(opt_src, tmp_path, monkeypatch,
                                                              capsys):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Path, "write_bytes", full)
    dst = tmp_path / "out"
    _assert_cli_error(capsys, ["convert", opt_src, dst], f"{dst} was not written: ",
                      "No space left on device")
    assert not dst.exists() and not _debris(tmp_path)


def test_symlinks_inside_src_and_the_hub_cache_layout_are_read(opt_hf, tmp_path):
    """Links that stay inside SRC are fine, and so is a Hugging Face cache snapshot, whose files
    link into the model's blob store (`../../blobs/HASH`)."""
    src, hf_model = opt_hf
    inside = _copy_source(src, tmp_path, "inside")
    (inside / "weights").mkdir()
    (inside / "model.safetensors").rename(inside / "weights" / "real.safetensors")
    (inside / "model.safetensors").symlink_to(Path("weights") / "real.safetensors")
    convert_checkpoint(str(inside), str(tmp_path / "out-inside"))
    _assert_logits_match(tmp_path / "out-inside", hf_model)

    repo = tmp_path / "hub" / "models--tiny--opt"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    assert load_tokenizer(str(snapshot))("the man")["input_ids"]
    _assert_logits_match(snapshot, hf_model)


def test_tokenizer_file_outside_or_fifo_is_refused(opt_src, tmp_path, capsys):
    """The tokenizer opens files of its own choosing: every file of the directory is checked."""
    src = _copy_source(opt_src, tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("the man said that")
    outside = tmp_path / "outside.json"
    (src / "tokenizer_config.json").rename(outside)
    (src / "tokenizer_config.json").symlink_to(outside)
    argv = ["eval", "perplexity", "--model", src, "--text", text, "--seq-len", "4"]
    _assert_cli_error(capsys, argv, "tokenizer_config.json", "lies outside")
    (src / "tokenizer_config.json").unlink()
    settings = json.loads(outside.read_text())
    (src / "tokenizer_config.json").write_text(json.dumps(dict(settings, vocab_file=str(text))))
    _assert_cli_error(capsys, argv, "tokenizer_config.json 'vocab_file' names", str(text),
                      "lies outside")
    (src / "tokenizer_config.json").write_text(json.dumps(settings))
    os.mkfifo(src / "chat_template.jinja")
    with _deadline(120):
        _assert_cli_error(capsys, argv, "chat_template.jinja", "not a regular file (a FIFO)")


@pytest.fixture(scope="module")
def converted_f32(opt_src, tmp_path_factory):
    """The tiny OPT converted to float32, with a value of 1e5 in fc1 (beyond float16's range)
    at a random index (HF's and ours agree: the layout of `w_in` is HF's)."""
    root = tmp_path_factory.mktemp("converted")
    src = _copy_source(opt_src, root)
    index = tuple(int(i) for i in np.random.default_rng().integers(0, (64, 32)))
    _edit_tensors(src / "model.safetensors", lambda t: _set(t, FC1, [index], 1e5))
    convert_checkpoint(str(src), str(root / "converted"))
    return src, root / "converted", index


def test_converted_params_outside_dir_are_refused(converted_f32, tmp_path, capsys):
    """orbax reads the files of params/ itself: every entry is checked first."""
    _, converted, _ = converted_f32
    model = _copy_source(converted, tmp_path, "model")
    victim = next(p for p in sorted((model / "params").rglob("*")) if p.is_file())
    outside = tmp_path / "outside"
    victim.rename(outside)
    victim.symlink_to(outside)
    with pytest.raises(PolarJaxError) as info:
        load_model(str(model))
    assert "lies outside" in _one_line_error(info) and victim.name in str(info.value)
    victim.unlink()
    os.mkfifo(victim)
    with _deadline(120), pytest.raises(PolarJaxError, match=r"not a regular file \(a FIFO\)"):
        load_model(str(model))


# ---------------------------------------------------------------------------------------------
# Destinations overlapping the source, existing, appearing meanwhile.


@pytest.mark.parametrize("where, needle", [
    ("src", "is the source checkpoint itself"),
    ("parent", "contains the source checkpoint"),
    ("inside", "lies inside the source checkpoint"),
    ("file-inside", "lies inside the source checkpoint"),
    ("symlink-to-src", "is the source checkpoint itself"),
])
def test_destination_overlapping_source_is_refused(opt_src, tmp_path, capsys, where, needle):
    """With --force too: SRC stays byte-identical and nothing is left beside DST."""
    src = _copy_source(opt_src, tmp_path / "models")
    dst = {"src": src, "parent": tmp_path / "models", "inside": src / "converted",
           "file-inside": src / "config.json", "symlink-to-src": tmp_path / "link"}[where]
    if where == "symlink-to-src":
        dst.symlink_to(src)
    before = _snapshot(src)
    _assert_cli_error(capsys, ["convert", src, dst, "--force"], str(dst), needle)
    _assert_untouched_and_clean(before, src, dst.parent)
    assert not (src / "converted").exists()


def test_destination_must_name_an_entry(opt_src, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    _assert_cli_error(capsys, ["convert", opt_src, ".", "--force"], "must end in a name")
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("existing", [False, True])
def test_write_failure_leaves_nothing_behind(opt_src, tmp_path, capsys, monkeypatch, existing):
    """An error after the temporary directory is made (here: the params writer dies half-way)
    removes it, an existing DST (with --force) survives untouched, and directories made for DST
    go too. (Moved from test_convert_errors: the OSError now reaches the user as one line.)"""
    import convert.convert as convert_module

    def failing_save(directory, params):
        directory.mkdir()
        (directory / "partial").write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_module, "save_arrays", failing_save)
    dst = tmp_path / "out" if existing else tmp_path / "new" / "dirs" / "out"
    if existing:
        dst.mkdir()
        (dst / "keep.txt").write_text("precious")
    with pytest.raises(PolarJaxError, match="No space left") as info:
        convert_checkpoint(str(opt_src), str(dst), force=existing)
    assert str(dst) in _one_line_error(info)
    argv = ["convert", opt_src, dst] + (["--force"] if existing else [])
    _assert_cli_error(capsys, argv, str(dst), "No space left")
    if existing:
        assert _snapshot(dst) == {"keep.txt": b"precious"}
        assert not _debris(tmp_path)
    else:
        assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("force", [False, True])
def test_destination_appearing_meanwhile(opt_hf, tmp_path, monkeypatch, renameat2, force):
    """Another process creates DST while we convert: without --force we refuse (theirs stays),
    with --force ours replaces it; atomically with renameat2, by renames where it is missing."""
    import convert.convert as convert_module

    if not renameat2:
        monkeypatch.setattr(files, "_renameat2", None)
    elif files._renameat2 is None:
        pytest.skip("renameat2 is unavailable here")
    src, hf_model = opt_hf
    dst = tmp_path / "out"
    save = convert_module.save_arrays

    def racing_save(directory, params):
        dst.mkdir()
        (dst / "theirs.txt").write_text("theirs")
        save(directory, params)

    monkeypatch.setattr(convert_module, "save_arrays", racing_save)
    if force:
        convert_checkpoint(str(src), str(dst), force=True)
        assert not (dst / "theirs.txt").exists()
        _assert_logits_match(dst, hf_model)
    else:
        with pytest.raises(PolarJaxError) as info:
            convert_checkpoint(str(src), str(dst))
        assert str(dst) in _one_line_error(info) and "already exists" in str(info.value)
        assert _snapshot(dst) == {"theirs.txt": b"theirs"}
    assert not _debris(tmp_path)


def test_two_concurrent_converts_to_one_destination(opt_hf, tmp_path):
    """Exactly one wins; the other exits 2 naming DST; DST is complete and nothing is left."""
    src, hf_model = opt_hf
    dst = tmp_path / "out"
    processes = [_convert_process(src, dst) for _ in range(2)]
    try:
        results = [(p.returncode, out, err) for p in processes
                   for out, err in [p.communicate(timeout=300)]]
    finally:  # bounded: a hung convert is killed, not left behind
        for p in processes:
            p.kill()
            p.wait()
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    _, _, err = next(r for r in results if r[0] == 2)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("polar-jax: error: ")]
    assert len(lines) == 1 and str(dst) in lines[0] and "already exists" in lines[0], err
    _assert_logits_match(dst, hf_model)
    assert not _debris(tmp_path)


# ---------------------------------------------------------------------------------------------
# Crash debris.


def test_killed_convert_is_cleaned_up_by_the_next_run(opt_hf, tmp_path):
    src, hf_model = opt_hf
    dst = tmp_path / "out"
    process = _convert_process(src, dst)
    deadline = time.monotonic() + 300
    try:
        while not _debris(tmp_path):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no temporary directory appeared"
            time.sleep(0.01)
    finally:
        process.kill()
    assert process.wait() == -signal.SIGKILL
    process.communicate()
    left = _debris(tmp_path)
    assert left and left[0].startswith(f".out.tmp-{process.pid}-") and not dst.exists()

    convert_checkpoint(str(src), str(dst))
    _assert_logits_match(dst, hf_model)
    assert not _debris(tmp_path)


def test_only_dead_processes_debris_is_removed(opt_src, tmp_path):
    """Temporaries of live processes (another convert at work) and other names stay."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead = _dead_pid()
        names = {
            f".out.tmp-{dead}-0123abcd": False, f".out.old-{dead}-89abcdef": False,  # removed
            f".out.tmp-{live.pid}-0123abcd": True,  # a live process's
            f".other.tmp-{dead}-0123abcd": True,  # another destination's
            ".out.tmp-notapid": True, "out.tmp-1-ab": True,  # not ours by name
        }
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "data").write_bytes(os.urandom(16))
        (tmp_path / f".out.old-{dead}-aaaa0000").write_text("a file, as a replaced DST may be")
        convert_checkpoint(str(opt_src), str(tmp_path / "out"))
        for name, kept in names.items():
            assert (tmp_path / name).exists() == kept, name
        assert not (tmp_path / f".out.old-{dead}-aaaa0000").exists()
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------
# Non-finite weights and narrowing casts.


@pytest.mark.parametrize("value, kind, dtype", [
    (np.nan, "NaN", None), (np.inf, "Inf", None), (-np.inf, "-Inf", "bfloat16"),
    (1e5, "100000", "float16"), (3.4e38, "3.4e+38", "bfloat16"),
])
def test_non_finite_or_overflowing_tensor_is_refused(opt_src, tmp_path, capsys, value, kind, dtype):
    """convert names the tensor, the first bad index (in HF's layout) and what is wrong; so does
    loading the HF directory with the same cast."""
    src = _copy_source(opt_src, tmp_path)
    rng = np.random.default_rng()
    bad = sorted({tuple(int(i) for i in rng.integers(0, (64, 32))) for _ in range(3)})
    _edit_tensors(src / "model.safetensors", lambda t: _set(t, FC1, bad, value))
    dst = tmp_path / "out"
    cast = ["--dtype", dtype] if dtype else []
    overflow = ["beyond the range of", dtype, "wider dtype"] if kind[0].isdigit() else ["finite"]
    line = _assert_cli_error(capsys, ["convert", src, dst, *cast], repr(FC1), kind,
                             f"at index {bad[0]}", *overflow)
    assert not dst.exists() and not _debris(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("the man said that")
    assert _assert_cli_error(capsys, ["eval", "perplexity", "--model", src, "--text", text,
                                      "--seq-len", "4", *cast]) == line


def test_converted_float32_loaded_as_float16_is_refused(converted_f32, tmp_path, capsys):
    """A converted directory loaded narrower than stored: the loaded params are checked on the
    device (one reduction per parameter) and the first bad one is named with its index."""
    src, converted, index = converted_f32
    text = tmp_path / "text.txt"
    text.write_text("the man said that")
    _assert_cli_error(capsys, ["eval", "perplexity", "--model", converted, "--text", text,
                               "--seq-len", "4", "--dtype", "float16"],
                      "'layers/0/mlp/w_in'", f"Inf at index {index}", "float16", "float32",
                      "wider dtype")
    config, model = load_model(str(converted))  # as stored (float32) it loads
    assert float(model.layers[0].mlp.w_in[...][index]) == 1e5


def test_finite_checks_against_numpy():
    rng = np.random.default_rng()
    array = rng.standard_normal(tuple(rng.integers(2, 9, size=3))).astype(np.float32)
    files.check_finite("tensor 'x'", array)
    flat = rng.choice(array.size, size=4, replace=False)
    array.flat[flat] = [np.inf, np.nan, -np.inf, np.nan]
    first = np.unravel_index(flat.min(), array.shape)
    value = float(array[first])
    kind = "NaN" if np.isnan(value) else ("Inf" if value > 0 else "-Inf")
    with pytest.raises(PolarJaxError) as info:
        files.check_finite("tensor 'x'", array)
    assert _one_line_error(info) == (f"tensor 'x' holds {kind} at index "
                                     f"{tuple(int(i) for i in first)}; weights must be finite")
    ok = rng.uniform(-6e4, 6e4, size=(5, 7)).astype(np.float32)
    np.testing.assert_array_equal(files.cast_checked("w", ok, np.float16), ok.astype(np.float16))
    ok[3, 2] = -7e4
    with pytest.raises(PolarJaxError, match=r"'?w'? holds -70000 at index \(3, 2\), beyond the "
                                            r"range of float16 \(largest 65504\)"):
        files.cast_checked("w", ok, np.float16)


# ---------------------------------------------------------------------------------------------
# Sources are local directories only.


def test_hub_ids_are_not_downloaded(tmp_path, capsys, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    _assert_cli_error(capsys, ["convert", "facebook/opt-125m", "out"], "facebook/opt-125m",
                      "does not exist (expected a local Hugging Face checkpoint directory)")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Routers: the same output mechanism.


@pytest.fixture(scope="module")
def tiny_model(opt_src):
    return load_model(str(opt_src))


@pytest.mark.parametrize("where, needle", [
    ("model", "is the model itself"), ("model-parent", "contains the model"),
    ("inside-model", "lies inside the model"), ("text", "is the text file itself"),
])
def test_routers_out_overlapping_inputs_is_refused(opt_src, tiny_model, tmp_path, where, needle):
    from routers.pipeline import train_routers
    from routers.train import TrainSettings

    model_dir = _copy_source(opt_src, tmp_path / "models", "model")
    text = model_dir.parent / "text.txt"
    text.write_text("the man said")
    out = {"model": model_dir, "model-parent": model_dir.parent, "inside-model": model_dir / "r",
           "text": text}[where]
    before = _snapshot(model_dir.parent)
    config, model = tiny_model
    ids = np.random.default_rng().integers(0, config.vocab_size, 400).astype(np.int32)
    with pytest.raises(PolarJaxError) as info:
        train_routers(model, config, ids, out, TrainSettings(batch_size=8), seq_len=16,
                      force=True, inputs={"the model": model_dir, "the text file": text})
    assert needle in _one_line_error(info) and str(out) in str(info.value)
    assert _snapshot(model_dir.parent) == before and not _debris(out.parent)


def test_routers_replace_existing_out_with_force(tiny_model, tmp_path, monkeypatch):
    """The collected data lives in the temporary beside --out (not under /tmp) and goes with
    it; an existing --out needs force; the saved routers load. (Training itself is stubbed:
    tests/test_routers.py trains for real.)"""
    import routers.pipeline as pipeline
    from routers.model import Routers, load_routers

    config, model = tiny_model
    out = tmp_path / "routers"
    collected = []

    def fake_train(config, train_data, calib_data, settings, progress, mesh, attn_groups):
        collected.extend(data.directory for data in (train_data, calib_data))
        return Routers.for_model(config, settings.mlp_rank), []

    monkeypatch.setattr(pipeline, "train", fake_train)
    monkeypatch.setattr(pipeline, "calibrate_mlp_topk", lambda *a, **k: {1: [3, 5]})
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: {"attn_recall_mean": 1.0})
    ids = np.random.default_rng().integers(0, config.vocab_size, 400).astype(np.int32)
    out.mkdir()
    (out / "old.txt").write_text("old")
    (tmp_path / f".routers.tmp-{_dead_pid()}-00ff00ff").mkdir()
    settings = pipeline.TrainSettings(batch_size=8, mlp_rank=8)
    with pytest.raises(PolarJaxError, match="already exists; pass --force") as info:
        pipeline.train_routers(model, config, ids, out, settings, seq_len=16)
    assert str(out) in _one_line_error(info) and (out / "old.txt").exists()
    summary = pipeline.train_routers(model, config, ids, out, settings, seq_len=16, force=True)
    for directory in collected:
        staging = directory.parent.parent
        assert directory.parent.name == ".scratch" and staging.parent == tmp_path
        assert staging.name.startswith(f".routers.tmp-{os.getpid()}-") and not staging.exists()
    assert sorted(p.name for p in out.iterdir()) == ["params", "routers.json"]
    assert not _debris(tmp_path)
    routers, metadata = load_routers(out, config)
    assert metadata["tokens_train"] == summary["tokens_train"] > 0
    assert metadata["mlp_topk"] == {"1": [3, 5]}
