"""Quantize a Hugging Face causal LM with GPTQModel on CPU (run with the gptqmodel venv's python).

    python gptqmodel_quantize.py MODEL_DIR OUT_DIR JOB.json

JOB.json: {"bits": 4, "group_size": 64, "desc_act": false, "act_group_aware": false, "sym": true,
           "damp_percent": 0.01, "dtype": "float32", "lm_head": false, "calibration": [[token ids], ...]}

The calibration token ids come from gptqkit.data.calibration_samples, so both quantizers see the same samples.
GPTQModel's group-aware reordering (act_group_aware, its default when desc_act is off) follows the job (off when
absent): gptqkit's rows name the order they compare. Prints one JSON line starting with RESULT.
"""

import os

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def main() -> None:
    model_dir, out_dir, job_path = (os.path.abspath(p) for p in sys.argv[1:4])
    job = json.loads(open(job_path).read())
    # GPTQModel writes ./logs/gptq_log_*.log into the working directory: keep that out of the caller's tree.
    os.chdir(tempfile.mkdtemp(prefix="gptqmodel-cwd-"))

    import torch
    from transformers import AutoTokenizer

    import gptqmodel
    from gptqmodel import GPTQModel, QuantizeConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in job["calibration"]]
    qcfg = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], desc_act=job["desc_act"], sym=job["sym"],
                          act_group_aware=bool(job.get("act_group_aware")) and not job["desc_act"], damp_percent=job["damp_percent"],
                          lm_head=bool(job.get("lm_head")))
    t0 = time.perf_counter()
    model = GPTQModel.load(model_dir, qcfg, device="cpu", dtype=getattr(torch, job["dtype"]))
    t1 = time.perf_counter()
    model.quantize(calib, batch_size=1, tokenizer=tok)
    t2 = time.perf_counter()
    model.save(out_dir)
    tok.save_pretrained(out_dir)
    for extra in ("tokenizer.model",):
        if os.path.exists(os.path.join(model_dir, extra)):
            shutil.copy(os.path.join(model_dir, extra), out_dir)
    print("RESULT " + json.dumps({"gptqmodel": gptqmodel.__version__, "load_s": t1 - t0, "quantize_s": t2 - t1,
                                  "files": sorted(os.listdir(out_dir))}))


if __name__ == "__main__":
    main()
