"""fp32 vs RTN vs GPTQ perplexity, quantization wall time and peak RSS, measured side by side in one run.

    GPTQKIT_DATA=../shared/assets/corpora python benchmarks/quality.py                 # SmolLM2 64x512 + stories260K
    GPTQKIT_DATA=../shared/assets/corpora python benchmarks/quality.py --calib 64x512,128x2048 --eval-chars 0
    GPTQKIT_DATA=../shared/assets/corpora python benchmarks/quality.py --peer --skip-stories   # + GPTQModel rows

SmolLM2-135M-Instruct: calibration windows from the c4 sample, evaluation on the WikiText-2 test split (rows joined
with "\\n\\n", no BOS added by this tokenizer) in non-overlapping windows of 2048 tokens; --eval-chars limits it to
the first N characters (120,000 is the slice the GPTQModel reference numbers in issue 2 used; 0 means all of it).
Its weights came from a Q4_1 GGUF, so the "fp32" model already sits on a 4-bit grid of block 32.
stories260K: per-channel (group -1), calibration and evaluation on TinyStories-style text.
Each quantization runs in its own subprocess so its peak RSS is its own. gptqkit's GPTQ rows use its defaults
(MSE clipping search on; --no-mse turns it off); RTN is plain round-to-nearest over the full range, as in the paper.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


def child(spec: dict) -> dict:
    """Run in a subprocess: quantize (or not), evaluate, report ppl, seconds and this process's peak RSS."""
    import resource

    import torch

    from gptqkit.checkpoint import load
    from gptqkit.config import QuantConfig
    from gptqkit.data import eval_tokens
    from gptqkit.evaluate import perplexity
    from gptqkit.pipeline import load_source, quantize

    model, tok = load_source(spec["model"])
    tokens = eval_tokens(tok, spec["eval"], data_dir=spec["data_dir"], max_chars=spec["eval_chars"] or None)
    secs = 0.0
    if spec["method"] == "gptqmodel":
        # GPTQModel 7.6.0 in its own venv, on the very token windows gptqkit calibrates with (seed 0), with the
        # same column order as the gptqkit row it sits under (act_group_aware is its default). Its time is its own
        # load + quantize (imports and save excluded).
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import interop
        from gptqkit.data import calibration_samples

        del model
        samples = calibration_samples(tok, spec["calib"], nsamples=spec["nsamples"], seqlen=spec["seqlen"], seed=0,
                                      data_dir=spec["data_dir"])
        out, job = Path(spec["tmp"]) / "ckpt", Path(spec["tmp"]) / "job.json"
        job.write_text(json.dumps({"bits": spec["bits"], "group_size": spec["group_size"], "desc_act": spec["desc_act"],
                                   "act_group_aware": spec["group_aware"], "sym": True, "damp_percent": 0.01,
                                   "dtype": "float32",
                                   "calibration": [s["input_ids"][0].tolist() for s in samples]}))
        text = interop.run_peer("gptqmodel", "gptqmodel_quantize.py", [spec["model"], out, job],
                                Path(spec["tmp"]) / "gptqmodel.log", threads=torch.get_num_threads())
        res = json.loads(next(ln for ln in text.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
        secs = res["load_s"] + res["quantize_s"]
        rss = float("nan")  # another process; not comparable with the rows measured in-process
        model = load(out, kernel="torch")
    elif spec["method"] != "fp32":
        out = Path(spec["tmp"]) / "ckpt"
        cfg = QuantConfig(bits=spec["bits"], group_size=spec["group_size"], desc_act=spec["desc_act"],
                          act_group_aware=spec["group_aware"], quant_method=spec["method"], damp_percent=0.01,
                          mse=spec.get("mse", False), lm_head=spec.get("lm_head", False))
        del model
        t = time.perf_counter()
        quantize(spec["model"], out, cfg, dataset=spec["calib"], nsamples=spec["nsamples"], seqlen=spec["seqlen"],
                 data_dir=spec["data_dir"], overwrite=True, progress=False, save_dtype="keep")
        secs = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        model = load(out, kernel="torch")
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    with torch.no_grad():
        ppl = perplexity(model, tokens, seqlen=spec["eval_seqlen"], progress=False)
    return {"ppl": ppl, "seconds": secs, "peak_rss_mib": rss, "windows": tokens.shape[1] // spec["eval_seqlen"]}


def run(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "tmp": tmp}
        p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"child failed: {spec}\n{p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])


def rows_for(model: str, calib: str, nsamples: int, seqlen: int, eval_set: str, eval_chars: int, eval_seqlen: int,
             group_size: int, data_dir: str, bits_list=(4, 3), peer=(), mse: bool = False, heads: bool = False):
    base = dict(model=model, calib=calib, nsamples=nsamples, seqlen=seqlen, eval=eval_set, eval_chars=eval_chars,
                eval_seqlen=eval_seqlen, group_size=group_size, data_dir=data_dir, bits=16, desc_act=False,
                group_aware=False, mse=mse)
    yield "fp32", {**base, "method": "fp32"}
    for bits in bits_list:
        yield f"RTN {bits}-bit", {**base, "method": "rtn", "bits": bits, "mse": False}  # the paper's baseline
        if heads:
            yield f"RTN {bits}-bit +head", {**base, "method": "rtn", "bits": bits, "mse": False, "lm_head": True}
        for order, kw in (("natural", {}), ("group-aware", {"group_aware": True}), ("act-order", {"desc_act": True})):
            yield f"GPTQ {bits}-bit {order}", {**base, "method": "gptq", "bits": bits, **kw}
            if heads:
                yield f"GPTQ {bits}-bit {order} +head", {**base, "method": "gptq", "bits": bits, "lm_head": True, **kw}
            if peer and order in peer:
                yield f"GPTQModel {bits}-bit {order}", {**base, "method": "gptqmodel", "bits": bits, **kw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--calib", default="64x512", help="comma list of NSAMPLESxSEQLEN for SmolLM2 (default 64x512)")
    ap.add_argument("--eval-chars", type=int, default=120_000, help="WikiText-2 test characters; 0 = all")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-stories", action="store_true")
    ap.add_argument("--peer", nargs="?", const="group-aware", default="",
                    help="add GPTQModel rows on SmolLM2 for these column orders (comma list of natural, group-aware, "
                         "act-order; default group-aware, its own default); needs benchmarks/peers/setup.sh")
    ap.add_argument("--bits", default="4,3", help="comma list of bit widths")
    ap.add_argument("--mse", action=argparse.BooleanOptionalAction, default=True,
                    help="gptqkit's GPTQ rows search clipping ranges (QuantConfig.mse, its default); RTN rows never do")
    ap.add_argument("--only", default="", help="run only the rows whose name matches this regular expression")
    ap.add_argument("--lm-head", action="store_true",
                    help="also rows ('+head') with the output layer quantized the same way (QuantConfig.lm_head)")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    data_dir = os.environ.get("GPTQKIT_DATA", str(ASSETS / "corpora"))
    tables = []
    bits = tuple(int(b) for b in a.bits.split(","))
    if not a.skip_smollm2:
        from gptqkit import bundled

        smol = str(bundled.smollm2())
        for c in a.calib.split(","):
            n, s = (int(x) for x in c.split("x"))
            tables.append((f"SmolLM2-135M-Instruct, group {a.group_size}, sym, damp 0.01, calibration c4 sample "
                           f"{n} x {s}, eval WikiText-2 test ({a.eval_chars or 'all'} chars) in windows of 2048",
                           list(rows_for(smol, "c4", n, s, "wikitext2", a.eval_chars, 2048, a.group_size, data_dir,
                                         bits, a.peer.split(",") if a.peer else (), a.mse, a.lm_head))))
    if not a.skip_stories:
        tiny = str(ASSETS / "corpora" / "calibration" / "tiny.txt")
        tables.append(("stories260K, per-channel (group -1), calibration 64 x 256 from tiny.txt, eval tiny.txt "
                       "(first 60,000 chars) in windows of 256",
                       list(rows_for(str(ASSETS / "models" / "stories260K"), tiny, 64, 256, tiny, 60_000, 256, -1,
                                     data_dir, bits, mse=a.mse, heads=a.lm_head))))
    for title, rows in tables:
        print(f"\n{title}")
        print(f"{'':32s} {'ppl':>9s} {'quant s':>8s} {'peak RSS MiB':>13s}")
        for name, spec in rows:
            if a.only and not re.search(a.only, name):
                continue
            r = run(spec)
            secs = f"{r['seconds']:8.1f}" if r["seconds"] else f"{'-':>8s}"
            rss = f"{r['peak_rss_mib']:13.0f}" if r["peak_rss_mib"] == r["peak_rss_mib"] else f"{'-':>13s}"
            print(f"{name:32s} {r['ppl']:9.3f} {secs} {rss}", flush=True)


if __name__ == "__main__":
    main()
