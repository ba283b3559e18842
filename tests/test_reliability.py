"""Reliability of gptqkit on the real stories260K model (issue 4): resume after SIGKILL, determinism, atomic outputs,
one test per bad input, and safe defaults (no pickle, no remote code, no network).

The oracle for resume is an uninterrupted run of the same command: every file of the resumed checkpoint must match it
byte for byte. Every test checks that the shared source model is unchanged afterwards (a hash of the folder), and the
bad-input tests check that nothing was left half-written next to the output.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from gptqkit import __version__
from gptqkit import checkpoint as ckpt_mod
from gptqkit import sequential
from gptqkit.checkpoint import CheckpointError, WriteError, load
from gptqkit.cli import main as cli_main
from gptqkit.config import ConfigError, QuantConfig
from gptqkit.data import DataError
from gptqkit.gptq import gptq
from gptqkit.pipeline import ModelError, load_source, quantize
from gptqkit.quant import rtn
from gptqkit.sequential import UnsupportedModel, find_blocks

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
MODEL = ASSETS / "models" / "stories260K"
TINY = ASSETS / "corpora" / "calibration" / "tiny.txt"

pytestmark = pytest.mark.skipif(
    not (MODEL / "model.safetensors").is_file() or not TINY.is_file(),
    reason=f"shared assets not found under {ASSETS} (models/stories260K and corpora/calibration/tiny.txt are needed)",
)

CFG = QuantConfig(bits=4, group_size=32)
NBLOCKS = 5  # stories260K
# The command the subprocess tests run; 32 samples make a block take a few hundred ms, long enough to kill inside.
# 100KB shards give a sharded checkpoint (and a save that lasts long enough to be killed in the middle).
CLI_ARGS = ["--bits", "4", "--group-size", "32", "--dataset", str(TINY), "--nsamples", "32", "--seqlen", "128",
            "--max-shard-size", "100KB"]
KILL_SEED = 20240611  # k, the number of finished blocks at which the run is killed, is drawn from this seed


def texts(n: int = 16) -> list[str]:
    return [t for t in TINY.read_text(encoding="utf-8").split("\n\n") if t.strip()][:n]


def tree(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under path."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def files_bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def run_api(out: Path, model: Path | str = MODEL, cfg: QuantConfig = CFG, **kw):
    args = dict(dataset=texts(), nsamples=16, seqlen=128, progress=False)
    args.update(kw)
    return quantize(model, out, cfg, **args)


def ours(parent: Path, out: Path) -> list[str]:
    """Everything gptqkit could have left next to `out`: out itself, OUT.work, .OUT.partial-*, .OUT.old-*."""
    return sorted(p.name for p in parent.iterdir()
                  if p.name in (out.name, f"{out.name}.work") or p.name.startswith(f".{out.name}."))


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one `gptqkit: error:` line, the last one on stderr."""
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    ours_ = [line for line in err if line.startswith("gptqkit:")]
    assert len(ours_) == 1 and ours_[0].startswith("gptqkit: error: "), err
    assert err[-1] == ours_[0]
    return ours_[0].removeprefix("gptqkit: error: ")


def refuses(c: Path, **kw) -> str:
    """load(c) must raise CheckpointError with a one-line message and leave the checkpoint folder as it was."""
    before = tree(c)
    with pytest.raises(CheckpointError) as e:
        load(c, **kw)
    assert tree(c) == before
    assert "\n" not in str(e.value)
    return str(e.value)


def poison(dst: Path, name: str, value: float | None = None, add: float | None = None) -> Path:
    """A copy of the model with element 3 of tensor `name` set to `value` (NaN, Inf) or moved by `add`."""
    from safetensors.torch import load_file, save_file

    copy_model(dst)
    sd = load_file(str(dst / "model.safetensors"))
    t = sd[name].clone()
    t.view(-1)[3] = value if value is not None else t.view(-1)[3] + add
    sd[name] = t
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def copy_model(dst: Path) -> Path:
    shutil.copytree(MODEL, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d, indent=2))


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    yield


@pytest.fixture(autouse=True)
def offline_and_source_guard(monkeypatch):
    """No test reaches the network (any TCP connect is recorded and refused), and the source model is unchanged."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.delenv("GPTQKIT_DATA", raising=False)
    attempts: list = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(errno.ENETUNREACH, f"network access attempted in a test: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    before = tree(MODEL)
    yield
    assert tree(MODEL) == before, "the source model folder was modified"
    assert not attempts, f"network access attempted: {attempts}"


def _sub_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GPTQKIT_DATA", None)
    return env


def _cli_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gptqkit.cli", "-q", "quantize", str(MODEL), str(out), *CLI_ARGS, *extra]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory) -> Path:
    """An uninterrupted `gptqkit quantize` run in a subprocess: the oracle for resume."""
    out = tmp_path_factory.mktemp("reference") / "out"
    r = subprocess.run(_cli_cmd(out), cwd=REPO, env=_sub_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ours(out.parent, out) == ["out"], "the work folder must be removed after success"
    assert (out / "model.safetensors.index.json").exists()
    return out


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    """A checkpoint made in-process through the public API (16 texts, seqlen 128, 4 bits, group 32)."""
    out = tmp_path_factory.mktemp("quantized") / "out"
    run_api(out)
    return out


def _kill_when(cmd: list[str], ready, timeout: float = 240.0) -> int:
    """Start cmd, poll every millisecond, SIGKILL it as soon as ready() is true; returns the exit code."""
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_sub_env(), stdout=devnull, stderr=devnull)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if ready():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.001)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> tuple[Path, int]:
    """A real quantization killed with SIGKILL once k blocks (k random in 1..3, seeded) are finished."""
    k = random.Random(KILL_SEED).randint(1, 3)
    out = tmp_path_factory.mktemp("killed") / "out"
    work = out.parent / "out.work"
    rc = _kill_when(_cli_cmd(out), lambda: (work / f"block_{k - 1:04d}.json").exists())
    assert rc == -signal.SIGKILL, f"the run ended by itself (exit {rc}) before block {k} was finished"
    done = sorted(p.name for p in work.glob("block_*.json"))
    assert k <= len(done) < NBLOCKS, f"killed with {done} finished; expected between {k} and {NBLOCKS - 1}"
    assert not out.exists(), "a killed run must not leave an output folder"
    logging.getLogger(__name__).info("killed after %d finished blocks (k=%d)", len(done), k)
    return out, k


def _resume_copy(killed: tuple[Path, int], dst: Path) -> tuple[Path, Path]:
    out = dst / "out"
    shutil.copytree(killed[0].parent / "out.work", dst / "out.work")
    return out, dst / "out.work"


# ---------------------------------------------------------------------------------------------------- 1. resume


def test_resume_after_sigkill_at_a_random_block_is_byte_identical(killed_run, cli_reference, tmp_path, capsys):
    out, work = _resume_copy(killed_run, tmp_path)
    finished = len(list(work.glob("block_*.json")))
    assert cli_main(["-q", "quantize", str(MODEL), str(out), *CLI_ARGS, "--resume"]) == 0
    assert files_bytes(out) == files_bytes(cli_reference)
    assert ours(tmp_path, out) == ["out"], "the work folder must be removed after success"
    assert finished < NBLOCKS


def test_rerun_without_resume_is_refused_and_keeps_the_work(killed_run, tmp_path, capsys):
    out, work = _resume_copy(killed_run, tmp_path)
    before = tree(work)
    msg = cli_error(capsys, ["-q", "quantize", str(MODEL), str(out), *CLI_ARGS])
    assert "holds an earlier unfinished run" in msg and "--resume" in msg and str(work) in msg
    assert tree(work) == before and not out.exists()


@pytest.mark.parametrize("change, differs", [
    (["--group-size", "64"], "settings"),
    (["--bits", "8"], "settings"),
    (["--seed", "1"], "calibration data, seed"),
    (["--nsamples", "24"], "calibration data"),
    (["--batch-size", "2"], "settings"),
])
def test_resume_with_other_settings_seed_or_data_is_refused(killed_run, tmp_path, capsys, change, differs):
    out, work = _resume_copy(killed_run, tmp_path)
    before = tree(work)
    args = list(CLI_ARGS)
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    msg = cli_error(capsys, ["-q", "quantize", str(MODEL), str(out), *args, "--resume"])
    assert msg.startswith(f"cannot resume from {work}: it was made with a different {differs};"), msg
    assert "delete the folder" in msg
    assert tree(work) == before and not out.exists()


def test_resume_with_another_compute_dtype_is_refused(killed_run, tmp_path, capsys, monkeypatch):
    # A run started on a GPU or a CPU with bf16 units (bf16 compute) cannot be finished on a CPU without them
    # (fp32), and back: the resumed run gets the other dtype than the one this machine gave the killed run.
    import gptqkit.pipeline as pipeline

    out, work = _resume_copy(killed_run, tmp_path)
    here = pipeline.default_compute_dtype(torch.device("cpu"), torch.float32)
    other = torch.float32 if here == torch.bfloat16 else torch.bfloat16
    monkeypatch.setattr(pipeline, "default_compute_dtype", lambda device, dtype: other)
    msg = cli_error(capsys, ["-q", "quantize", str(MODEL), str(out), *CLI_ARGS, "--resume"])
    assert msg.startswith(f"cannot resume from {work}: it was made with a different settings;"), msg


def test_resume_with_another_model_is_refused(killed_run, tmp_path, capsys):
    out, work = _resume_copy(killed_run, tmp_path)
    other = tmp_path / "other-model"
    poison(other, "model.layers.4.mlp.up_proj.weight", add=1e-3)
    msg = cli_error(capsys, ["-q", "quantize", str(other), str(out), *CLI_ARGS, "--resume"])
    assert msg.startswith(f"cannot resume from {work}: it was made with a different model;"), msg


def test_sigkill_during_the_final_save_leaves_no_output_and_resumes(cli_reference, tmp_path):
    out = tmp_path / "out"
    for _ in range(3):
        rc = _kill_when(_cli_cmd(out), lambda: any(tmp_path.glob(".out.partial-*")))
        if rc == -signal.SIGKILL and not out.exists():
            break
        for p in [out, tmp_path / "out.work", *tmp_path.glob(".out.partial-*")]:  # the save won the race: again
            shutil.rmtree(p, ignore_errors=True)
    else:
        pytest.fail("could not kill the run inside its final save in 3 attempts")
    # The output folder holds nothing of ours: only the hidden temporary sibling and the work folder remain.
    assert not out.exists()
    assert len(list(tmp_path.glob(".out.partial-*"))) == 1
    assert len(list((tmp_path / "out.work").glob("block_*.json"))) == NBLOCKS
    r = subprocess.run(_cli_cmd(out, "--resume"), cwd=REPO, env=_sub_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert files_bytes(out) == files_bytes(cli_reference)
    assert ours(tmp_path, out) == ["out"], "the stale partial folder and the work folder must be gone"


def test_work_folder_write_failure_keeps_finished_blocks_and_resumes(quantized, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = sequential.atomic_write_bytes

    def full_disk(path, data):
        if path.name.startswith("block_0002"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(sequential, "atomic_write_bytes", full_disk)
    with pytest.raises(WriteError) as e:
        run_api(out)
    assert str(e.value) == (f"cannot write the work folder {tmp_path / 'out.work'}: No space left on device; free disk "
                            "space or fix the folder's permissions, then rerun with --resume")
    assert sorted(p.name for p in (tmp_path / "out.work").glob("block_*.json")) == ["block_0000.json",
                                                                                   "block_0001.json"]
    assert not out.exists()
    monkeypatch.setattr(sequential, "atomic_write_bytes", real)
    run_api(out, resume=True)
    assert files_bytes(out) == files_bytes(quantized)
    assert ours(tmp_path, out) == ["out"]


def test_work_folder_not_writable_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def denied(path, data):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(sequential, "atomic_write_bytes", denied)
    msg = cli_error(capsys, ["-q", "quantize", str(MODEL), str(tmp_path / "out"), *CLI_ARGS])
    assert msg == (f"cannot write the work folder {tmp_path / 'out.work'}: Permission denied; free disk space or fix "
                   "the folder's permissions, then rerun with --resume")
    assert ours(tmp_path, tmp_path / "out") == []


# ---------------------------------------------------------------------------------------------------- 2. determinism


def test_same_inputs_give_byte_identical_checkpoints(quantized, tmp_path):
    # A second run, and a third from a copy of the model in another folder: no path or time may reach the files.
    run_api(tmp_path / "again")
    copy = copy_model(tmp_path / "elsewhere" / "stories260K")
    cfg = QuantConfig(bits=4, group_size=32)
    report = run_api(tmp_path / "from-copy", model=copy, cfg=cfg)
    assert files_bytes(tmp_path / "again") == files_bytes(quantized)
    assert files_bytes(tmp_path / "from-copy") == files_bytes(quantized)
    assert cfg.dynamic is None, "quantize must not modify the caller's QuantConfig"
    assert len(report.config.dynamic) == 3 * NBLOCKS  # the 172-wide MLP Linears stay in floating point
    qc = json.loads((quantized / "quantize_config.json").read_text())
    assert qc["meta"] == {"quantizer": [f"gptqkit:{__version__}"], "method": "gptq", "mse": True,
                          "act_group_aware": True,
                          "damp_percent": 0.01,
                          "calibration": {"dataset": "list", "nsamples": 16, "seqlen": 128, "seed": 0}}
    assert json.loads((quantized / "config.json").read_text())["quantization_config"] == qc
    for f in quantized.glob("*.json"):
        text = f.read_text()
        assert str(MODEL) not in text and "/tmp" not in text and str(tmp_path) not in text, f.name
    mode = {f.name: f.stat().st_mode & 0o777 for f in quantized.iterdir()}
    assert mode["model.safetensors"] == mode["config.json"], "safetensors files must get the umask's mode too"


def test_cli_run_in_a_subprocess_matches_an_in_process_api_run(cli_reference, tmp_path):
    # Other process, other hash seed, dataset given as a file path: the same bytes, and no path in the metadata.
    run_api(tmp_path / "api", dataset=str(TINY), nsamples=32, max_shard_size="100KB")
    assert files_bytes(tmp_path / "api") == files_bytes(cli_reference)
    meta = json.loads((cli_reference / "quantize_config.json").read_text())["meta"]
    assert meta["calibration"]["dataset"] == "tiny.txt"


# ---------------------------------------------------------------------------------------------------- 3. atomic outputs


def test_non_empty_output_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite to replace it"):
        run_api(out)
    msg = cli_error(capsys, ["quantize", str(MODEL), str(out), "--bits", "4"])
    assert msg == f"output {out} exists and is not empty; pass --overwrite to replace it or choose another folder"
    assert tree(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert ours(tmp_path, out) == ["out"]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_equal_to_inside_or_containing_the_source_is_refused(tmp_path, capsys, where):
    src = copy_model(tmp_path / "models" / "src")
    before = tree(tmp_path / "models")
    out = {"same": src, "inside": src / "gptq", "parent": tmp_path / "models"}[where]
    expect = "contains the source model" if where == "parent" else "is the source model folder or inside it"
    with pytest.raises(FileExistsError, match=expect):
        run_api(out, model=src, overwrite=True)
    msg = cli_error(capsys, ["quantize", str(src), str(out), "--overwrite"])
    assert expect in msg and "choose another output folder" in msg
    assert tree(tmp_path / "models") == before


def _full_disk_save_file(real):
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save_file


def test_overwrite_that_fails_mid_write_leaves_the_old_output_intact(quantized, tmp_path, monkeypatch):
    import safetensors.torch

    out = copy_ckpt(quantized, tmp_path / "out")
    (out / "extra.txt").write_text("the old checkpoint's own file")
    before = tree(out)
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk_save_file(safetensors.torch.save_file))
    with pytest.raises(WriteError) as e:
        run_api(out, overwrite=True, cfg=QuantConfig(bits=4, group_size=64))
    assert str(e.value).startswith(f"cannot write the checkpoint {out}: No space left on device; free disk space")
    assert "the quantized blocks are kept in" in str(e.value) and "--resume" in str(e.value)
    assert tree(out) == before
    assert ours(tmp_path, out) == ["out", "out.work"]  # no temporary folder; the finished blocks are kept


def test_rename_failure_restores_the_old_output(quantized, tmp_path, monkeypatch):
    out = copy_ckpt(quantized, tmp_path / "out")
    before = tree(out)
    real_os = ckpt_mod.os

    class FailingRename(types.ModuleType):
        def __getattr__(self, name):
            return getattr(real_os, name)

        @staticmethod
        def replace(a, b):
            if ".partial-" in str(a):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_os.replace(a, b)

    monkeypatch.setattr(ckpt_mod, "os", FailingRename("os"))
    with pytest.raises(WriteError, match="No space left on device"):
        run_api(out, overwrite=True)
    assert tree(out) == before
    assert ours(tmp_path, out) == ["out", "out.work"]


def test_disk_full_and_permission_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    out = tmp_path / "out"
    monkeypatch.setattr(safetensors.torch, "save_file", _full_disk_save_file(None))
    msg = cli_error(capsys, ["-q", "quantize", str(MODEL), str(out), *CLI_ARGS])
    assert msg.startswith(f"cannot write the checkpoint {out}: No space left on device; free disk space or fix the "
                          f"permissions of {tmp_path}")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))

    def denied(tensors, filename, metadata=None):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", denied)
    msg = cli_error(capsys, ["-q", "quantize", str(MODEL), str(out), *CLI_ARGS, "--resume"])
    assert msg.startswith(f"cannot write the checkpoint {out}: Permission denied; free disk space or fix the "
                          f"permissions of {tmp_path}")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


# ---------------------------------------------------------------------------------------------------- 4. bad inputs
# Each case: the error's type, its message (the problem and the fix), and nothing of ours left behind.


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_bits_not_supported(tmp_path, capsys, bits):
    with pytest.raises(ConfigError) as e:
        QuantConfig(bits=bits)
    assert str(e.value) == f"bits={bits} is not supported; use one of 2, 3, 4, 8"
    assert cli_error(capsys, ["quantize", str(MODEL), str(tmp_path / "out"), "--bits", str(bits)]) == str(e.value)
    assert ours(tmp_path, tmp_path / "out") == []


@pytest.mark.parametrize("group_size", [0, -2, -128])
def test_group_size_invalid(tmp_path, capsys, group_size):
    with pytest.raises(ConfigError) as e:
        QuantConfig(group_size=group_size)
    assert str(e.value) == (f"group_size={group_size} is invalid; use -1 (one group per column) or a positive size "
                            "such as 128")
    assert cli_error(capsys, ["quantize", str(MODEL), str(tmp_path / "out"), "--group-size", str(group_size)]) \
        == str(e.value)
    assert ours(tmp_path, tmp_path / "out") == []


@pytest.mark.parametrize("damp", [0.0, -0.01, 1.0, 2.5])
def test_damp_out_of_range(tmp_path, capsys, damp):
    with pytest.raises(ConfigError) as e:
        QuantConfig(damp_percent=damp)
    assert str(e.value) == f"damp_percent={damp} is out of range; use a value in (0, 1), e.g. 0.01"
    assert cli_error(capsys, ["quantize", str(MODEL), str(tmp_path / "out"), "--damp", str(damp)]) == str(e.value)
    assert ours(tmp_path, tmp_path / "out") == []


def test_nsamples_zero(tmp_path, capsys):
    with pytest.raises(ValueError) as e:
        run_api(tmp_path / "out", nsamples=0)
    assert str(e.value) == "nsamples=0 is invalid; use a positive integer (--nsamples)"
    assert cli_error(capsys, ["quantize", str(MODEL), str(tmp_path / "out"), "--nsamples", "0"]) == str(e.value)
    assert ours(tmp_path, tmp_path / "out") == []


def test_seqlen_below_one(tmp_path):
    with pytest.raises(ValueError) as e:
        run_api(tmp_path / "out", seqlen=0)
    assert str(e.value) == "seqlen=0 is invalid; use a positive integer (--seqlen)"
    assert ours(tmp_path, tmp_path / "out") == []


def test_seqlen_above_the_context(tmp_path, capsys):
    with pytest.raises(ValueError) as e:
        run_api(tmp_path / "out", seqlen=513)
    assert str(e.value) == "seqlen=513 exceeds the model's context of 512 tokens; use --seqlen 512 or less"
    msg = cli_error(capsys, ["-q", "quantize", str(MODEL), str(tmp_path / "out"), "--seqlen", "4096"])
    assert msg == "seqlen=4096 exceeds the model's context of 512 tokens; use --seqlen 512 or less"
    assert ours(tmp_path, tmp_path / "out") == []


def test_calibration_set_empty(tmp_path):
    with pytest.raises(DataError) as e:
        run_api(tmp_path / "out", dataset=[])
    assert str(e.value) == "calibration set is empty: no texts given; pass at least one text of 4 or more tokens"
    assert ours(tmp_path, tmp_path / "out") == []


def test_calibration_texts_all_too_short(tmp_path, capsys):
    with pytest.raises(DataError) as e:
        run_api(tmp_path / "out", dataset=["Hi", "a", "", "Once"])
    assert str(e.value).startswith("calibration set is empty: all 4 texts are shorter than 4 tokens; pass longer "
                                   "texts")
    short = tmp_path / "short.txt"
    short.write_text("Hi\na\nOnce\n")
    msg = cli_error(capsys, ["-q", "quantize", str(MODEL), str(tmp_path / "out"), "--dataset", str(short), "--seqlen",
                             "128"])
    assert msg.startswith("calibration set is empty: all 3 texts are shorter than 4 tokens")
    assert ours(tmp_path, tmp_path / "out") == []


def test_unknown_dataset_name(tmp_path, capsys):
    with pytest.raises(DataError) as e:
        run_api(tmp_path / "out", dataset="wikitext3")
    assert str(e.value) == ("unknown dataset 'wikitext3': use one of wikitext2, c4, c4-new, ptb, ptb-new, a path to a "
                            ".txt or .jsonl file, or a list of strings")
    assert cli_error(capsys, ["-q", "quantize", str(MODEL), str(tmp_path / "out"), "--dataset", "wikitext3", "--seqlen",
                            "128"]) \
        == str(e.value)
    assert ours(tmp_path, tmp_path / "out") == []


def test_offline_without_local_data_fails_fast(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "corpora"
    empty.mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        run_api(tmp_path / "out", dataset="wikitext2", data_dir=empty)
    assert time.monotonic() - t0 < 30
    assert str(e.value) == (
        f"dataset 'wikitext2' (train split) is not available locally (looked in: {empty}/wikitext2/wiki.train.raw, "
        f"{empty}/wikitext2/wiki.valid.raw, {empty}/wikitext2/wiki.valid.tokens) and the `datasets` package is not "
        "installed (pip install gptqkit[datasets]). Set GPTQKIT_DATA or --data-dir to a folder holding "
        "wikitext2/wiki.train.raw, or pass a local file")
    msg = cli_error(capsys, ["-q", "quantize", str(MODEL), str(tmp_path / "out"), "--dataset", "c4", "--data-dir",
                             str(empty), "--seqlen", "128"])
    assert msg.startswith("dataset 'c4' (train split) is not available locally")
    assert ours(tmp_path, tmp_path / "out") == []


def test_offline_with_datasets_installed_but_not_cached(tmp_path, monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError) as e:
        run_api(tmp_path / "out", dataset="wikitext2")
    assert str(e.value).startswith("dataset 'wikitext2' (train split) is not available locally (looked in: no data "
                                   "dir given) and HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set and it is not in the HF "
                                   "cache (ConnectionError: Couldn't reach 'wikitext' on the Hub")
    assert ours(tmp_path, tmp_path / "out") == []


@pytest.mark.parametrize("path", ["/nonexistent/stories260K", "./no-such-model", "~/no-such-model-xyz",
                                  "models/llama-missing"])
def test_model_path_missing(tmp_path, capsys, monkeypatch, path):
    import transformers

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)

    def no_hub(*a, **k):
        raise AssertionError("a missing local path must not be looked up on the hub")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    with pytest.raises(ModelError) as e:
        run_api(tmp_path / "out", model=path)
    assert str(e.value) == f"model path {path} does not exist; give an existing folder or a hub id like org/name"
    assert cli_error(capsys, ["quantize", path, str(tmp_path / "out")]) == str(e.value)
    assert ours(tmp_path, tmp_path / "out") == []


def test_model_path_is_a_file(tmp_path, capsys):
    with pytest.raises(ModelError) as e:
        run_api(tmp_path / "out", model=MODEL / "model.safetensors")
    assert str(e.value) == (f"model path {MODEL / 'model.safetensors'} is a file; give the model's folder "
                            "(config.json + weights)")
    assert ours(tmp_path, tmp_path / "out") == []


def test_hub_id_offline_fails_with_one_line(tmp_path, capsys):
    with pytest.raises(ModelError) as e:
        run_api(tmp_path / "out", model="no-such-org/no-such-model")
    assert str(e.value).startswith("cannot load no-such-org/no-such-model: ")
    assert str(e.value).endswith("; give a local folder or unset HF_HUB_OFFLINE")
    assert "\n" not in str(e.value)
    assert ours(tmp_path, tmp_path / "out") == []


def test_model_folder_without_weights(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(MODEL / "config.json", src)
    shutil.copy(MODEL / "tokenizer.json", src)
    with pytest.raises(ModelError) as e:
        run_api(tmp_path / "out", model=src)
    assert str(e.value) == f"{src} has a config.json but no weights (*.safetensors); the folder is incomplete"
    assert cli_error(capsys, ["quantize", str(src), str(tmp_path / "out")]) == str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="has no config.json; give a Hugging Face model folder"):
        run_api(tmp_path / "out", model=empty)
    assert ours(tmp_path, tmp_path / "out") == []


class _NoBlocks(torch.nn.Module):
    """A model whose layers are plain attributes, not an nn.ModuleList."""

    def __init__(self):
        super().__init__()
        self.layer0 = torch.nn.Linear(64, 64)
        self.layer1 = torch.nn.Linear(64, 64)
        self.config = types.SimpleNamespace(max_position_embeddings=512)


def test_unsupported_architecture_no_decoder_blocks(tmp_path, monkeypatch):
    with pytest.raises(UnsupportedModel) as e:
        find_blocks(_NoBlocks())
    assert str(e.value) == ("no decoder blocks found in _NoBlocks: gptqkit needs a model whose repeated layers sit in "
                            "an nn.ModuleList (every transformers causal LM does)")
    import gptqkit.pipeline as pipeline

    tok = load_source(MODEL)[1]
    monkeypatch.setattr(pipeline, "load_source", lambda *a, **k: (_NoBlocks(), tok))
    with pytest.raises(UnsupportedModel, match="no decoder blocks found in _NoBlocks"):
        run_api(tmp_path / "out")
    assert ours(tmp_path, tmp_path / "out") == []


def test_unsupported_architecture_not_a_causal_lm(tmp_path, capsys):
    from transformers import T5Config

    src = tmp_path / "t5"
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=128).save_pretrained(src)
    shutil.copy(MODEL / "model.safetensors", src)
    with pytest.raises(ModelError) as e:
        run_api(tmp_path / "out", model=src)
    assert str(e.value) == (f"{src} is not a causal language model (T5Config has no AutoModelForCausalLM class); "
                            "gptqkit quantizes decoder-only LMs")
    assert cli_error(capsys, ["quantize", str(src), str(tmp_path / "out")]) == str(e.value)
    assert ours(tmp_path, tmp_path / "out") == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_weights_with_nan_or_inf(tmp_path, capsys, value):
    src = tmp_path / "src"
    poison(src, "model.layers.2.self_attn.q_proj.weight", value)
    with pytest.raises(ModelError) as e:
        run_api(tmp_path / "out", model=src)
    assert str(e.value) == (f"{src}: parameter model.layers.2.self_attn.q_proj.weight contains NaN or Inf; the source "
                            "model is broken, fix or re-download its weights")
    assert cli_error(capsys, ["quantize", str(src), str(tmp_path / "out")]) == str(e.value)
    assert ours(tmp_path, tmp_path / "out") == []


def test_hessian_with_dead_input_columns_is_handled_by_zeroing():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    X = torch.randn(512, 64)
    X[:, [5, 17, 40]] = 0  # inputs that are always zero: H has zero rows and columns there
    r = gptq(W, X.T @ X, CFG)
    assert r.fallback is None and r.damp == CFG.damp_percent
    assert torch.all(r.dequantize()[:, [5, 17, 40]] == 0)


def test_hessian_slightly_indefinite_gets_more_damping():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    H = torch.eye(64)
    H[0, 0] = -0.015  # needs damp 0.02: the first 0.01 is not enough
    r = gptq(W, H, CFG)
    assert r.fallback is None and r.damp == pytest.approx(0.02)


def test_hessian_that_stays_indefinite_falls_back_to_round_to_nearest():
    torch.manual_seed(0)
    W = torch.randn(32, 64)
    H = torch.eye(64)
    H[0, 0] = -9.0  # a negative eigenvalue no damping up to 1.0 * mean(diag) can lift
    r = gptq(W, H, CFG)
    assert r.fallback == "Hessian not positive definite even with damp_percent 0.64; used round-to-nearest"
    assert torch.equal(r.codes, rtn(W, CFG).codes) and torch.equal(r.scales, rtn(W, CFG).scales)


def test_driver_logs_the_round_to_nearest_fallback(tmp_path, monkeypatch, caplog):
    real = sequential.gptq
    monkeypatch.setattr(sequential, "gptq", lambda W, H, cfg: real(W, -H, cfg))  # negative definite
    with caplog.at_level(logging.WARNING, logger="gptqkit.sequential"):
        report = run_api(tmp_path / "out")
    notes = [x.note for x in report.layers]
    assert len(notes) == 4 * NBLOCKS and all("used round-to-nearest" in n for n in notes)
    warned = [r.getMessage() for r in caplog.records if "used round-to-nearest" in r.getMessage()]
    assert len(warned) == 4 * NBLOCKS
    assert warned[0] == ("model.layers.0.self_attn.q_proj: Hessian not positive definite even with damp_percent 0.64;"
                         " used round-to-nearest")
    model = load(tmp_path / "out")
    assert torch.isfinite(model(torch.tensor([[1, 403, 407, 261]])).logits).all()


def test_checkpoint_with_a_truncated_safetensors_file(quantized, tmp_path, capsys):
    for keep in (4, 600, 200_000):  # inside the header length, inside the header, inside the data
        c = copy_ckpt(quantized, tmp_path / f"cut{keep}")
        f = c / "model.safetensors"
        f.write_bytes(f.read_bytes()[:keep])
        msg = refuses(c)
        assert msg.startswith(f"{f} cannot be read (SafetensorError: ")
        assert msg.endswith("); the file is truncated or corrupt, download or copy it again")
        assert "\n" not in msg
    assert cli_error(capsys, ["eval", str(c)]) == msg


def test_checkpoint_with_a_missing_shard(cli_reference, tmp_path, capsys):
    c = copy_ckpt(cli_reference, tmp_path / "ckpt")
    index = json.loads((c / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    (c / shards[1]).unlink()
    msg = refuses(c)
    assert msg == (f"{c / 'model.safetensors.index.json'} names shard(s) that are missing: {shards[1]}; the "
                            "download or copy is incomplete, fetch the missing files")
    assert cli_error(capsys, ["eval", str(c)]) == msg


def test_checkpoint_tensors_disagree_with_the_config(quantized, tmp_path, capsys):
    c = copy_ckpt(quantized, tmp_path / "group")
    edit_json(c / "quantize_config.json", group_size=64)
    msg = refuses(c)
    assert msg == ("model.safetensors: model.layers.0.self_attn.k_proj.scales has 2 groups but group_size=64 "
                            "over 64 inputs gives 1; the config does not match the tensors (the tensors suggest "
                            "group_size=32)")
    assert cli_error(capsys, ["eval", str(c)]) == msg
    c = copy_ckpt(quantized, tmp_path / "bits")
    edit_json(c / "quantize_config.json", bits=8)
    msg = refuses(c)
    assert msg == ("model.safetensors: model.layers.0.self_attn.k_proj.qweight has shape (8, 32) but a 64->32 "
                            "layer at 8 bits needs (16, 32); the config's bits do not match the tensors")


def test_checkpoint_without_any_quantization_config(quantized, tmp_path, capsys):
    c = copy_ckpt(quantized, tmp_path / "ckpt")
    (c / "quantize_config.json").unlink()
    edit_json(c / "config.json", quantization_config=None)
    msg = refuses(c)
    assert msg == (f"{c} is not a GPTQ checkpoint: no quantize_config.json, quant_config.json or "
                            "quantization_config in config.json; quantize the model first with `gptqkit quantize`")


@pytest.mark.parametrize("fmt", ["gptq_v9", "marlin"])
def test_checkpoint_format_unknown(quantized, tmp_path, fmt):
    c = copy_ckpt(quantized, tmp_path / "ckpt")
    edit_json(c / "quantize_config.json", checkpoint_format=fmt)
    msg = refuses(c)
    assert msg == f"checkpoint_format={fmt!r} is unknown; use one of gptq, gptq_v2"


def test_checkpoint_config_not_json(quantized, tmp_path):
    c = copy_ckpt(quantized, tmp_path / "ckpt")
    (c / "quantize_config.json").write_text('{"bits": 4, "group_si')
    msg = refuses(c)
    assert msg.startswith(f"{c / 'quantize_config.json'} is not valid JSON (")
    assert msg.endswith("); the file is truncated or corrupt, download or copy it again")


def _pickled(quantized: Path, dst: Path) -> Path:
    from safetensors.torch import load_file

    c = copy_ckpt(quantized, dst)
    torch.save(load_file(str(c / "model.safetensors")), c / "pytorch_model.bin")
    (c / "model.safetensors").unlink()
    return c


def test_pickled_checkpoint_refused_unless_allowed_then_weights_only(quantized, tmp_path, capsys, monkeypatch):
    c = _pickled(quantized, tmp_path / "ckpt")
    msg = refuses(c)
    assert msg == (f"{c} holds only pickled weights (pytorch_model.bin); pickles can run code, so gptqkit "
                            "refuses them by default: pass --allow-pickle (loaded with weights_only=True) or convert "
                            "the checkpoint to safetensors")
    assert cli_error(capsys, ["eval", str(c)]) == msg
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    x = torch.tensor([[1, 403, 407, 261, 270]])
    got = load(c, allow_pickle=True)(x).logits
    assert calls == [True]
    assert torch.equal(got, load(quantized)(x).logits)


def test_pickle_with_code_is_not_executed_even_when_allowed(quantized, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    c = _pickled(quantized, tmp_path / "ckpt")
    torch.save({"model.embed_tokens.weight": Evil()}, c / "pytorch_model.bin")
    msg = refuses(c, allow_pickle=True)
    assert msg == (f"{c / 'pytorch_model.bin'} holds more than tensors (it imports posix.system); gptqkit "
                            "never runs code from a checkpoint, even with --allow-pickle: convert it to safetensors "
                            "with a tool you trust")
    assert not marker.exists()


def _custom_code_folder(folder: Path, marker: Path) -> None:
    edit_json(folder / "config.json", model_type="gptqkit-test-custom", architectures=["CustomForCausalLM"],
              auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    code = f"open({str(marker)!r}, 'w').close()\n"
    (folder / "configuration_custom.py").write_text(code)
    (folder / "modeling_custom.py").write_text(code)


def test_trust_remote_code_required_but_not_given(quantized, tmp_path, capsys):
    marker = tmp_path / "custom-code-ran"
    c = copy_ckpt(quantized, tmp_path / "ckpt")
    _custom_code_folder(c, marker)
    msg = refuses(c)
    assert msg == (f"{c} needs custom code to build the model; pass --trust-remote-code only if you trust its "
                            "author")
    assert cli_error(capsys, ["eval", str(c)]) == msg
    src = copy_model(tmp_path / "src")
    _custom_code_folder(src, marker)
    with pytest.raises(ModelError) as e2:
        run_api(tmp_path / "out", model=src)
    assert str(e2.value) == f"{src} needs custom code; pass --trust-remote-code if you trust its author"
    assert cli_error(capsys, ["quantize", str(src), str(tmp_path / "out")]) == str(e2.value)
    assert not marker.exists()
    assert ours(tmp_path, tmp_path / "out") == []


def test_checkpoint_of_another_method(quantized, tmp_path, capsys):
    c = copy_ckpt(quantized, tmp_path / "ckpt")
    edit_json(c / "quantize_config.json", quant_method="awq")
    msg = refuses(c)
    assert msg == f"{c / 'quantize_config.json'}: quant_method='awq' is not GPTQ; gptqkit loads GPTQ checkpoints only"
    assert cli_error(capsys, ["inspect", str(c)]) == msg


# ---------------------------------------------------------------------------------------------------- 5. safe defaults


def test_loading_never_unpickles_by_default(quantized, monkeypatch):
    def no_pickle(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    x = torch.tensor([[1, 403, 407]])
    assert torch.isfinite(load(quantized)(x).logits).all()
    load_source(MODEL)


def test_source_with_only_pickled_weights_is_refused_unless_allowed(quantized, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    src = copy_model(tmp_path / "src")
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    with pytest.raises(ModelError) as e:
        run_api(tmp_path / "out", model=src)
    assert str(e.value) == (f"{src} holds only pickled weights (pytorch_model.bin); pickles can run code, so gptqkit "
                            "refuses them by default: pass --allow-pickle (read with weights_only=True) or convert the "
                            "model to safetensors")
    assert ours(tmp_path, tmp_path / "out") == []
    calls = []
    real_load = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    run_api(tmp_path / "out", model=src, allow_pickle=True)
    assert calls and all(w is True for w in calls)
    assert files_bytes(tmp_path / "out") == files_bytes(quantized)
