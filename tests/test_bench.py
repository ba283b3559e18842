"""gptqkit.bench on a stories260K checkpoint against its dense original (small settings: the numbers are not the
point here, the measurement protocol and the report are)."""

import argparse
import json
from pathlib import Path

import pytest

from gptqkit import bench as bench_mod
from gptqkit.bench import BenchError, add_bench_args, bench, format_table, run_bench, size_on_disk
from conftest import stories_checkpoint

ASSETS = Path(__file__).resolve().parents[2] / "shared/assets"
MODEL = ASSETS / "models/stories260K"
TINY = ASSETS / "corpora/calibration/tiny.txt"

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason=f"{MODEL} not found")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    ckpt = stories_checkpoint(tmp_path_factory)
    return bench(ckpt, baseline=MODEL, prompt_len=40, new_tokens=4, runs=2, threads=1)


def test_both_models_measured(result, tmp_path_factory):
    q, b = result["quantized"], result["baseline"]
    for r in (q, b):
        assert len(r["prefill_s"]) == len(r["decode_s"]) == 2
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["threads"] == 1
        assert abs(r["decode_ms_per_token"] * r["decode_tokens_per_s"] - 1000) < 1e-6
        assert r["peak_rss_bytes"] >= r["rss_loaded_bytes"] > r["rss_start_bytes"] > 50 * 2**20  # torch alone
        assert r["peak_rss_model_bytes"] == r["peak_rss_bytes"] - r["rss_start_bytes"]
    assert q["quantized"] and not b["quantized"]
    # the CPU defaults: fp32 compute with a bf16 embedding and head, against a bf16 baseline
    assert (q["dtype"], q["dense_dtype"], b["dtype"]) == bench_mod.default_dtypes("cpu")
    assert bench_mod.default_dtypes("cpu") == ("float32", "bfloat16", "bfloat16")
    # q/k/v/o in 5 blocks (the 172-wide MLP is not packable and stays dense), all on the first CPU kernel that runs
    # here: avx2-q8 when its C file builds, else cpu
    from gptqkit.kernels import cpu_avx2

    assert q["kernels"] == {"cpu" if isinstance(cpu_avx2.library(), str) else "avx2-q8": 20}
    assert q["size_bytes"] == size_on_disk(stories_checkpoint(tmp_path_factory)) < b["size_bytes"]
    ratios = result["ratios"]
    assert ratios["size"] == q["size_bytes"] / b["size_bytes"] < 1
    assert ratios["decode_speedup"] == q["decode_tokens_per_s"] / b["decode_tokens_per_s"]
    assert ratios["peak_memory_model"] == q["peak_rss_model_bytes"] / b["peak_rss_model_bytes"]


def test_table_and_cli_json(result, monkeypatch, capsys):
    table = format_table(result)
    for label in ("size on disk", "peak RSS", "of which the model", "the model's code", "prefill, 40 tokens",
                  "decode latency (ms/token)", "decode throughput (tokens/s)", "ratio", "1 threads"):
        assert label in table
    monkeypatch.setattr(bench_mod, "bench", lambda *a, **k: result)
    p = argparse.ArgumentParser()
    add_bench_args(p)
    assert run_bench(p.parse_args(["ckpt", "--baseline", str(MODEL), "--json"])) == 0
    assert json.loads(capsys.readouterr().out) == result
    assert run_bench(p.parse_args(["ckpt"])) == 0
    assert capsys.readouterr().out == table + "\n"


def record_forward_lengths(monkeypatch, into: list) -> None:
    """Dense models measure() loads from here on append each forward's token count to `into`."""
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def loaded(*a, **k):
        m = real(*a, **k)
        m.get_input_embeddings().register_forward_pre_hook(lambda mod, args: into.append(args[0].shape[1]))
        return m

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)


def test_prefill_in_pieces(monkeypatch, tmp_path_factory):
    """--prefill-chunk: each timed prefill feeds the prompt in pieces into one cache; the table says so."""
    rows: list[int] = []
    record_forward_lengths(monkeypatch, rows)
    spec = {"path": str(MODEL), "quantized": False, "device": "cpu", "prompt_len": 40, "new_tokens": 2, "runs": 1,
            "prefill_runs": 2, "threads": 1, "prefill_chunk": 16}
    r = bench_mod.measure(spec)
    assert len(r["prefill_s"]) == 2 and r["prefill_tokens_per_s"] > 0
    # the warm-up's prefill and its min(4, new_tokens) decode steps, then 2 timed prefills and a decode of 2 tokens
    assert rows == [16, 16, 8] + [1] * 2 + [16, 16, 8] * 2 + [1] * 2
    with pytest.raises(ValueError, match="prefill_chunk must be a positive number of tokens"):
        bench(stories_checkpoint(tmp_path_factory), prefill_chunk=0)
    result = {"settings": {"prompt_len": 40, "prefill_chunk": 16, "prefill_runs": 2, "runs": 1, "new_tokens": 2,
                           "warmup": 1},
              "quantized": {**r, "size_bytes": 1}, "baseline": None, "ratios": {}}
    assert "prefill, 40 tokens in pieces of 16 (tokens/s)" in format_table(result)
    p = argparse.ArgumentParser()
    add_bench_args(p)
    assert p.parse_args(["ckpt", "--prefill-chunk", "64"]).prefill_chunk == 64
    assert p.parse_args(["ckpt"]).prefill_chunk is None


def test_refuses_a_dense_model_and_reports_child_failures(tmp_path):
    from gptqkit.kernels import KernelError

    with pytest.raises(BenchError, match="not a GPTQ checkpoint"):
        bench(MODEL)
    with pytest.raises(KernelError, match="unknown kernel"):
        bench(MODEL, kernel="no-such-kernel")
    spec = {"path": str(tmp_path / "missing"), "quantized": True, "device": "cpu", "prompt_len": 4, "new_tokens": 1,
            "runs": 1}
    with pytest.raises(BenchError, match="failed .exit 1.:\n(.|\n)*is not a model folder"):
        bench_mod.run_measurement(spec, timeout=120)


def test_runtime_includes_the_models_code(tmp_path):
    """The RSS measure() calls the runtime is taken after the architecture's modeling code is imported: it is the
    same for the dense and the quantized process, so "of which the model" leaves it out. Checked in a fresh
    interpreter, where the Llama module is not yet loaded."""
    import subprocess
    import sys

    code = ("import sys; from gptqkit.bench import import_architecture as ia; "
            "m = 'transformers.models.llama.modeling_llama'; before = m in sys.modules; "
            f"print(before, ia({str(MODEL)!r}), m in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "LlamaForCausalLM", "True"]
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    assert bench_mod.import_architecture(tmp_path) is None
    assert bench_mod.import_architecture(tmp_path / "missing") is None


def test_decode_runs_between_probe_readings(monkeypatch, tmp_path):
    """spec["probe"]: one reading before each decode run and one after the last, taken by another process (here a
    thread) while the measured one waits; they come back in order as decode_probes, and a probe that goes away
    without answering fails the measurement."""
    import os
    import threading

    events: list = []
    record_forward_lengths(monkeypatch, events)
    req, rep = str(tmp_path / "request"), str(tmp_path / "reply")
    os.mkfifo(req)
    os.mkfifo(rep)

    def serve(answers: int):
        with open(req) as r, open(rep, "w") as w:
            for i, _ in zip(range(answers), r):
                events.append("probe")
                w.write(f"{i + 0.5}\n")
                w.flush()

    server = threading.Thread(target=serve, args=(10,), daemon=True)
    server.start()
    spec = {"path": str(MODEL), "quantized": False, "device": "cpu", "prompt_len": 8, "new_tokens": 2, "runs": 3,
            "prefill_runs": 1, "threads": 1, "probe": [req, rep]}
    r = bench_mod.measure(spec)
    server.join(timeout=60)
    assert not server.is_alive()  # the measurement closed its end when it was done
    assert r["decode_probes"] == [0.5, 1.5, 2.5, 3.5]
    # warm-up (prefill and 2 steps), the timed prefill, then 3 decode runs of 2 tokens between the readings
    assert events == [8, 1, 1, 8] + ["probe", 1, 1] * 3 + ["probe"]
    server = threading.Thread(target=serve, args=(1,), daemon=True)  # answers once, then closes
    server.start()
    with pytest.raises(BenchError, match="closed .* without a reading"):
        bench_mod.measure(spec)
    server.join(timeout=60)
