"""Interoperability with the peer GPTQ libraries: GPTQModel 7.6.0 and AutoGPTQ 0.7.1, each in its own venv.

For each model (a tiny random Llama whose widths are multiples of 128, SmolLM2-135M-Instruct):
  (a) GPTQModel quantizes (act-order on/off, sym/asym); gptqkit, GPTQModel and AutoGPTQ load the checkpoint;
  (b) gptqkit quantizes (gptqkit.pipeline.quantize); the same three load it.
Every load is compared with the maker's own loader on the same input ids: max |logit difference| and top-1
agreement, WikiText-2 perplexity on the same windows, and the dequantized weights of every quantized layer
(gptqkit.kernels.reference.dequantize on gptqkit's QuantLinear vs the peer's own dequantization, float32).
Both quantizers get the same calibration token ids, damp_percent 0.01, and classic GPTQ ordering
(GPTQModel's act_group_aware is off). Everything runs in float32: fp16 matmuls on a CPU are ~20x slower.

    python benchmarks/interop.py                       # both models, all variants; creates the venvs if missing
    python benchmarks/interop.py --models tiny --json /tmp/interop.json

The peer venvs live in $GPTQKIT_PEERS_DIR (default ~/.cache/gptqkit/peers), made by benchmarks/peers/setup.sh.
Checkpoints and per-checkpoint results are cached in --work (default ~/.cache/gptqkit/interop); a rerun reuses
them unless --fresh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEERS_SRC = Path(__file__).resolve().parent / "peers"
ASSETS = ROOT.parent / "shared" / "assets"
CORPORA = ASSETS / "corpora"
PEERS = ("gptqmodel", "autogptq")  # the venvs setup.sh makes
# Loaders that run inside another peer's venv: transformers' GPTQ integration (with optimum) in GPTQModel's, as it
# chooses its layer (on CPU torch's int4 op, bf16 arithmetic) and asked for GPTQModel's torch layer in float32
# (which under from_pretrained still rounds about as fp16 does: see peers/peer_eval.py).
VENV = {"transformers": "gptqmodel", "transformers-fp32": "gptqmodel"}
log = logging.getLogger("interop")


def peers_dir() -> Path:
    return Path(os.environ.get("GPTQKIT_PEERS_DIR", Path.home() / ".cache" / "gptqkit" / "peers")).expanduser()


def peer_python(peer: str) -> Path | None:
    """The venv interpreter for `peer`, or None when that venv has not been created."""
    py = peers_dir() / VENV.get(peer, peer) / "bin" / "python"
    return py if py.exists() else None


def setup_peers(peers=PEERS) -> None:
    subprocess.run(["bash", str(PEERS_SRC / "setup.sh"), *peers], check=True)


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), GPTQMODEL_CPU_WORKERS="2",
               CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the peer venvs must not see gptqkit's packages
    return env


def run_peer(peer: str, script: str, args: list, logfile: Path, threads: int | None = None,
             timeout: float = 3600) -> str:
    """Run benchmarks/peers/<script> with the peer's venv (threads: OMP_NUM_THREADS, default ours, else 2);
    the output goes to `logfile` and is returned."""
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "2"))
    py = peer_python(peer)
    if py is None:
        raise RuntimeError(f"the {peer} venv is missing in {peers_dir()}; run benchmarks/peers/setup.sh")
    cmd = [str(py), str(PEERS_SRC / script), *map(str, args)]
    with open(logfile, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(threads), timeout=timeout)
    out = logfile.read_text()
    if r.returncode != 0:
        raise RuntimeError(f"{peer} {script} failed (exit {r.returncode}); last lines of {logfile}:\n"
                           + "\n".join(out.splitlines()[-15:]))
    return out


# ------------------------------------------------------------------------------------------------ models and data


def make_tiny_llama(out: Path) -> Path:
    """A random LlamaForCausalLM: hidden 128, intermediate 256, 2 layers, 4 heads of 32, vocab 512 (stories260K's
    tokenizer), untied lm_head, float32. Every Linear width is a multiple of 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(ASSETS / "models" / "stories260K" / f, tmp / f)
    os.replace(tmp, out)
    return out


@dataclass
class Setup:
    name: str
    model_dir: Path
    group_size: int
    nsamples: int
    seqlen: int  # calibration
    ppl_seqlen: int
    ppl_windows: int
    max_chars: int


def model_setups(work: Path, nsamples: int | None, seqlen: int | None) -> dict[str, Setup]:
    from gptqkit import bundled

    return {
        "tiny": Setup("tiny-llama-128", make_tiny_llama(work / "tiny-llama"), 32, nsamples or 16, seqlen or 128,
                      256, 2, 8000),
        # hidden 576 = 9 * 64, intermediate 1536 = 24 * 64: group 64 divides every layer.
        "smollm2": Setup("SmolLM2-135M-Instruct", bundled.smollm2(), 64, nsamples or 32, seqlen or 256, 512, 2,
                         12000),
    }


def prepare_job(s: Setup, work: Path) -> tuple[Path, Path, dict]:
    """Calibration ids (shared by both quantizers) and the evaluation job (probe ids + perplexity windows)."""
    from transformers import AutoTokenizer

    from gptqkit.data import calibration_samples, eval_tokens

    tok = AutoTokenizer.from_pretrained(s.model_dir)
    calib = calibration_samples(tok, CORPORA / "c4" / "c4_sample.txt", nsamples=s.nsamples, seqlen=s.seqlen, seed=0)
    calib_ids = [c["input_ids"][0].tolist() for c in calib]
    tokens = eval_tokens(tok, "wikitext2", data_dir=CORPORA, max_chars=s.max_chars)
    need = s.ppl_windows * s.ppl_seqlen
    if tokens.shape[1] < need + 128:
        raise ValueError(f"{s.name}: {tokens.shape[1]} WikiText-2 tokens from {s.max_chars} characters, need "
                         f"{need + 128}; raise max_chars")
    job = {"probe_ids": tokens[0, need:need + 128].reshape(2, 64).clone(), "ppl_tokens": tokens[:, :need].clone(),
           "ppl_seqlen": s.ppl_seqlen, "ppl_windows": s.ppl_windows, "dtype": "float32"}
    d = work / s.name
    d.mkdir(parents=True, exist_ok=True)
    torch.save(job, d / "job.pt")
    return d / "job.pt", d, {"calibration": calib_ids}


# ------------------------------------------------------------------------------------------------ quantizers


@dataclass(frozen=True)
class Variant:
    maker: str  # "gptqmodel" | "gptqkit"
    desc_act: bool
    sym: bool
    checkpoint_format: str = "gptq"
    bits: int = 4
    lm_head: bool = False  # quantize the output layer too (GPTQModel's default for it: 8 bits, group 32)

    @property
    def tag(self) -> str:
        fmt = "" if self.checkpoint_format == "gptq" else f"-{self.checkpoint_format}"
        return (f"{self.maker}-{self.bits}b-{'sym' if self.sym else 'asym'}-"
                f"{'actorder' if self.desc_act else 'noact'}{fmt}{'-lmhead' if self.lm_head else ''}")

    def settings(self, group: int) -> str:
        return (f"{self.bits}b g{group} {'sym' if self.sym else 'asym'} desc_act={'on' if self.desc_act else 'off'}"
                + ("" if self.checkpoint_format == "gptq" else f" {self.checkpoint_format}")
                + (" lm_head" if self.lm_head else ""))


VARIANTS = [Variant("gptqmodel", False, True), Variant("gptqmodel", True, True), Variant("gptqmodel", False, False),
            Variant("gptqmodel", True, False), Variant("gptqkit", False, True), Variant("gptqkit", True, True),
            Variant("gptqkit", True, False), Variant("gptqkit", True, False, "gptq_v2"),
            Variant("gptqmodel", False, True, lm_head=True), Variant("gptqkit", False, True, lm_head=True)]


def _stamp(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def quantize_variant(s: Setup, v: Variant, d: Path, calib: dict, fresh: bool) -> tuple[Path, float]:
    """The checkpoint of variant `v` (cached under d/<tag> with a stamp of its inputs), and the seconds it took."""
    out = d / v.tag
    job = {"bits": v.bits, "group_size": s.group_size, "desc_act": v.desc_act, "sym": v.sym, "damp_percent": 0.01,
           "dtype": "float32", "checkpoint_format": v.checkpoint_format, "lm_head": v.lm_head, **calib}
    stamp = d / f"{v.tag}.stamp"
    if not fresh and out.exists() and stamp.exists() and stamp.read_text() == _stamp(job):
        return out, json.loads((d / f"{v.tag}.time.json").read_text())["seconds"]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if v.maker == "gptqmodel":
        if v.checkpoint_format != "gptq":
            raise ValueError("GPTQModel variants are written in its default format (gptq v1)")
        (d / f"{v.tag}.job.json").write_text(json.dumps(job))
        run_peer("gptqmodel", "gptqmodel_quantize.py", [s.model_dir, out, d / f"{v.tag}.job.json"],
                 d / f"{v.tag}.quantize.log")
    else:
        from gptqkit.config import QuantConfig
        from gptqkit.pipeline import quantize

        cfg = QuantConfig(bits=v.bits, group_size=s.group_size, desc_act=v.desc_act, sym=v.sym, damp_percent=0.01,
                          checkpoint_format=v.checkpoint_format, lm_head=v.lm_head)
        quantize(s.model_dir, out, cfg, dataset=CORPORA / "c4" / "c4_sample.txt", nsamples=s.nsamples,
                 seqlen=s.seqlen, seed=0, progress=False)
    seconds = time.perf_counter() - t0
    (d / f"{v.tag}.time.json").write_text(json.dumps({"seconds": seconds}))
    stamp.write_text(_stamp(job))
    return out, seconds


# ------------------------------------------------------------------------------------------------ loaders


def gptqkit_side(ckpt: Path, job: dict, out: Path) -> dict:
    """gptqkit's load (reference kernel, float32): logits and perplexity, saved to `out` like a peer's."""
    from gptqkit.checkpoint import load
    from gptqkit.evaluate import perplexity

    t0 = time.perf_counter()
    model = load(ckpt, kernel="torch", dtype=torch.float32)
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        logits = model(job["probe_ids"], use_cache=False).logits.float()
    t1 = time.perf_counter()
    ppl = perplexity(model, job["ppl_tokens"], seqlen=job["ppl_seqlen"], max_windows=job["ppl_windows"],
                     progress=False)
    r = {"logits": logits, "ppl": ppl, "load_s": load_s, "ppl_s": time.perf_counter() - t1,
         "kernel": ["gptqkit reference (torch)"]}
    torch.save(r, out)
    return r


def gptqkit_dequant(ckpt: Path) -> dict[str, torch.Tensor]:
    """gptqkit.kernels.reference.dequantize of every QuantLinear gptqkit loads: [K, N] float32 each."""
    from gptqkit.checkpoint import load
    from gptqkit.kernels import reference
    from gptqkit.qlinear import QuantLinear

    model = load(ckpt, kernel="torch", dtype=torch.float32)
    return {n: reference.dequantize(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def transformers4_copy(ckpt: Path) -> tuple[Path | None, list[str]]:
    """A sibling folder that transformers 4 / AutoGPTQ 0.7.1 read as intended, or None when nothing needs fixing:
    - transformers 5 writes rope_theta only inside rope_parameters; transformers 4 reads the top-level key and
      silently falls back to 10000 (SmolLM2 uses 100000);
    - a tied lm_head is stored once, as the embedding (HF convention); AutoGPTQ 0.7.1 loads the weights with
      accelerate after tying, which leaves lm_head at zeros unless lm_head.weight is in the file itself.
    Everything else is symlinked."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    conf = json.loads((ckpt / "config.json").read_text())
    fixes = []
    theta = (conf.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in conf and float(theta) != 10000.0:
        conf["rope_theta"] = theta
        fixes.append("top-level rope_theta")
    weights = ckpt / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        keys = set(f.keys())
    tied = not keys & {"lm_head.weight", "lm_head.qweight"} and any(k.endswith("embed_tokens.weight") for k in keys)
    if tied:
        fixes.append("lm_head.weight stored")
    if not fixes:
        return None, []
    alt = ckpt.with_name(ckpt.name + ".t4")
    shutil.rmtree(alt, ignore_errors=True)
    alt.mkdir()
    for f in ckpt.iterdir():
        if f.name != "config.json" and not (tied and f.name == weights.name):
            (alt / f.name).symlink_to(f.resolve())
    (alt / "config.json").write_text(json.dumps(conf, indent=2))
    if tied:
        sd = load_file(str(weights))
        embed = next(k for k in sd if k.endswith("embed_tokens.weight"))
        sd["lm_head.weight"] = sd[embed].clone()
        save_file(sd, str(alt / weights.name), metadata={"format": "pt"})
    return alt, fixes


def peer_side(peer: str, ckpt: Path, job_path: Path, out: Path, deq: Path | None, log_path: Path) -> dict:
    run_peer(peer, "peer_eval.py", [peer, ckpt, job_path, out, *([deq] if deq else [])], log_path)
    return torch.load(out, weights_only=True)


def compare(ref: dict, other: dict) -> dict:
    diff = (other["logits"] - ref["logits"]).abs()
    top1 = (other["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
    return {"max_dlogit": diff.max().item(), "top1": top1}


def dequant_diff(ours: dict[str, torch.Tensor], peer_file: Path) -> dict:
    from safetensors import safe_open

    worst, layers, fp16_same = 0.0, 0, True
    with safe_open(str(peer_file), "pt") as f:
        names = set(f.keys())
        for n, W in ours.items():
            if n not in names:
                raise ValueError(f"{peer_file} has no dequantized weight for {n}")
            worst = max(worst, (f.get_tensor(n) - W).abs().max().item())
            fp16_same &= bool(f.get_tensor(f"{n}.fp16_same").item())
            layers += 1
    return {"dequant_max_diff": worst, "dequant_layers": layers, "dequant_fp16_same": fp16_same}


def evaluate_checkpoint(s: Setup, v: Variant, ckpt: Path, job_path: Path, d: Path, peers: list[str],
                        stamp: str = "") -> list[dict]:
    """One row per loader; the maker's own loader is the reference of its checkpoint. Each loader's result is
    cached in d/<tag>.<loader>.json under `stamp` (the checkpoint's), so an interrupted run resumes."""
    job = torch.load(job_path, weights_only=True)
    ours_deq: dict[str, torch.Tensor] | None = None
    # (row name, library, folder, full: perplexity and dequantized weights too, else logits only)
    loaders: list[tuple[str, str, Path, bool]] = [("gptqkit", "gptqkit", ckpt, True)]
    for peer in peers:
        alt, fixes = transformers4_copy(ckpt) if peer == "autogptq" and v.checkpoint_format == "gptq" else (None, [])
        # The checkpoint as it is first; when it needs fixing for transformers 4, its logits are enough to show
        # that, and the fixed copy (same quantized tensors) gets the full comparison.
        loaders.append((peer, peer, ckpt, alt is None))
        if alt is not None:
            loaders.append((f"autogptq ({' + '.join(fixes)})", peer, alt, True))
    maker = v.maker if v.maker in peers or v.maker == "gptqkit" else "gptqkit"
    loaders.sort(key=lambda x: x[0] != maker)  # the reference first
    results: dict[str, dict] = {}
    rows = []
    for name, lib, folder, full in loaders:
        key = re.sub(r"[^\w.-]+", "_", name)
        cache = d / f"{v.tag}.{key}.json"
        if stamp and cache.exists() and json.loads(cache.read_text()).get("stamp") == stamp:
            rows.append(json.loads(cache.read_text())["row"])
            pt = d / f"{v.tag}.{key}.pt"
            results[name] = torch.load(pt, weights_only=True) if pt.exists() else {}
            continue
        row = {"model": s.name, "made_by": v.maker, "settings": v.settings(s.group_size), "tag": v.tag,
               "loaded_by": name, "reference": maker}
        if lib == "autogptq" and v.checkpoint_format == "gptq_v2":
            row["skipped"] = "not run: AutoGPTQ 0.7.1 reads only checkpoint_format gptq (v1)"
        elif lib == "gptqkit":
            results[name] = gptqkit_side(folder, job, d / f"{v.tag}.{key}.pt")
        else:
            deq = d / f"{v.tag}.{key}.dequant.safetensors"
            pjob = job_path
            if not full:
                pjob = d / "job.logits-only.pt"
                torch.save({**job, "ppl_windows": 0}, pjob)
            try:
                # transformers runs GPTQModel's layers (whose dequantization the gptqmodel row already checks) and
                # leaves some of their int buffers in another dtype, which dequantize_weight() cannot shift: for it,
                # logits and perplexity only.
                full = full and not lib.startswith("transformers")
                results[name] = peer_side(lib, folder, pjob, d / f"{v.tag}.{key}.pt", deq if full else None,
                                          d / f"{v.tag}.{key}.log")
            except RuntimeError as e:  # a peer that refuses the checkpoint is a result, not a crash
                why = [ln for ln in str(e).splitlines() if "Error" in ln]
                row["skipped"] = f"refused: {(why or [str(e)])[-1].strip()}"
            else:
                if full:
                    if ours_deq is None:
                        ours_deq = gptqkit_dequant(ckpt)
                    row.update(dequant_diff(ours_deq, deq))
                    deq.unlink()
        if "skipped" not in row:
            r, ref = results[name], results.get(maker)
            if ref is None or "logits" not in ref:
                raise RuntimeError(f"{v.tag}: the maker's own load ({maker}) has no result to compare with")
            row.update(compare(ref, r), ppl=r["ppl"], ppl_maker=ref["ppl"], kernel=", ".join(r["kernel"]),
                       load_s=r["load_s"], ppl_s=r["ppl_s"])
        if stamp:
            cache.write_text(json.dumps({"stamp": stamp, "row": row}, indent=1))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ report


def table(rows: list[dict]) -> str:
    head = ("| model | made by | settings | loaded by | max abs dlogit vs maker | top-1 agree | ppl (maker) | "
            "ppl (loader) | dequant max abs diff vs gptqkit |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['made_by']} | {r['settings']} | {r['loaded_by']} | "
                         f"{r['skipped']} | | | | |")
            continue
        deq = "(reference)" if r["loaded_by"] == "gptqkit" else (
            f"{r['dequant_max_diff']:.1e} ({r['dequant_layers']} layers"
            + (", fp16 path = fp32 rounded" if r.get("dequant_fp16_same") and r["loaded_by"] == "gptqmodel" else "")
            + ")" if "dequant_max_diff" in r else "")
        ppl = "(logits only)" if r["ppl"] != r["ppl"] else f"{r['ppl']:.4f}"  # NaN: not measured
        lines.append(f"| {r['model']} | {r['made_by']} | {r['settings']} | {r['loaded_by']} | "
                     f"{r['max_dlogit']:.2e} | {r['top1']:.4f} | {r['ppl_maker']:.4f} | {ppl} | {deq} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2", help="comma list of tiny, smollm2")
    ap.add_argument("--makers", default="gptqmodel,gptqkit", help="comma list of gptqmodel, gptqkit")
    ap.add_argument("--variants", default="", help="comma list of variant tags to run (default: all)")
    ap.add_argument("--peers", default="gptqmodel,autogptq,transformers,transformers-fp32",
                    help="loaders besides gptqkit")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "gptqkit" / "interop"))
    ap.add_argument("--nsamples", type=int, default=None, help="calibration samples (tiny 16, smollm2 32)")
    ap.add_argument("--seqlen", type=int, default=None, help="calibration tokens per sample (tiny 128, smollm2 256)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--no-setup", action="store_true", help="fail instead of creating missing peer venvs")
    ap.add_argument("--fresh", action="store_true", help="requantize even when a cached checkpoint matches")
    ap.add_argument("--json", help="write all rows here as JSON")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)

    peers = [p for p in a.peers.split(",") if p]
    missing = [p for p in {*peers, "gptqmodel"} if peer_python(p) is None]
    if missing:
        if a.no_setup:
            print(f"peer venvs missing in {peers_dir()}: {', '.join(missing)}; run benchmarks/peers/setup.sh")
            return 2
        setup_peers(sorted({VENV.get(p, p) for p in missing}))
    work = Path(a.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    setups = model_setups(work, a.nsamples, a.seqlen)
    tags = [t for t in a.variants.split(",") if t]
    chosen = [v for v in VARIANTS if v.maker in a.makers.split(",") and (not tags or v.tag in tags)]
    rows: list[dict] = []
    for key in a.models.split(","):
        s = setups[key]
        job_path, d, calib = prepare_job(s, work)
        for v in chosen:
            t0 = time.perf_counter()
            ckpt, qs = quantize_variant(s, v, d, calib, a.fresh)
            log.info("%s %s: quantized in %.0f s", s.name, v.tag, qs)
            stamp = _stamp({"ckpt": (d / f"{v.tag}.stamp").read_text(), "job": _stamp(calib),
                            "eval": [s.ppl_seqlen, s.ppl_windows, s.max_chars]})
            new = evaluate_checkpoint(s, v, ckpt, job_path, d, peers, "" if a.fresh else stamp)
            for r in new:
                r["quantize_s"] = qs
            rows.extend(new)
            log.info("%s %s: evaluated in %.0f s", s.name, v.tag, time.perf_counter() - t0)
            print(table(new), flush=True)
    print()
    for s in {r["model"] for r in rows}:
        setup = next(x for x in setups.values() if x.name == s)
        print(f"{s}: calibration {setup.nsamples} x {setup.seqlen} tokens of c4_sample.txt (seed 0); perplexity on "
              f"the first {setup.ppl_windows} windows of {setup.ppl_seqlen} WikiText-2 test tokens (BOS once, at the "
              "start); logits on 2 x 64 following tokens; all loaders in float32 with their torch kernels, except "
              "transformers (the layer it picks on CPU: torch's int4 op, bf16 arithmetic) and transformers-fp32 "
              "(GPTQModel's torch layer, fp16-sized rounding under from_pretrained)")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
