"""The command line: quantize -> inspect -> eval on the real tiny model, and one-line errors."""

import json

import pytest

from conftest import CORPORA
from gptqkit.cli import main


def test_quantize_inspect_eval(stories_dir, tmp_path, capsys):
    out = tmp_path / "q"
    tiny = str(CORPORA / "calibration" / "tiny.txt")
    rc = main(["-q", "quantize", str(stories_dir), str(out), "--bits", "4", "--group-size", "32", "--dataset", tiny,
               "--nsamples", "8", "--seqlen", "128", "--desc-act"])
    assert rc == 0
    line = capsys.readouterr().out
    assert "quantized 20 layers" in line
    peak = float(line.split("peak RSS ")[1].split(" GiB")[0])  # this process's peak resident set
    assert 0.1 < peak < 24
    assert not (tmp_path / "q.work").exists()  # the work folder goes once the checkpoint is written
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantization_config"]["desc_act"] is True and len(info["layers"]) == 20
    assert any(r["act_order"] for r in info["layers"])
    assert main(["-q", "eval", str(out), "--dataset", tiny, "--seqlen", "128", "--max-windows", "4"]) == 0
    line = capsys.readouterr().out
    assert "perplexity" in line and "quantized model" in line
    ppl = float(line.split("perplexity")[1].split()[0])
    assert 1.5 < ppl < 30


@pytest.mark.parametrize("args,msg", [
    (["--bits", "5"], "bits=5 is not supported"),
    (["--group-size", "0"], "group_size=0 is invalid"),
    (["--damp", "2"], "damp_percent=2.0 is out of range"),
])
def test_bad_settings_are_one_line_errors(stories_dir, tmp_path, capsys, args, msg):
    rc = main(["-q", "quantize", str(stories_dir), str(tmp_path / "q"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gptqkit: error: ") and msg in err[0]
    assert not (tmp_path / "q").exists()


def test_missing_model_is_one_line(tmp_path, capsys):
    rc = main(["-q", "quantize", str(tmp_path / "nope"), str(tmp_path / "q")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0]
