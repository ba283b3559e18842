"""gptqkit.evaluate.perplexity on the real stories260K model, against a reference written here: one batched forward
over the same windows and torch.nn.functional.cross_entropy summed over all predictions."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptqkit.data import eval_tokens
from gptqkit.evaluate import perplexity

ASSETS = Path(__file__).resolve().parents[2] / "shared/assets"
MODEL = ASSETS / "models/stories260K"
TINY = ASSETS / "corpora/calibration/tiny.txt"

pytestmark = pytest.mark.skipif(
    not (MODEL / "model.safetensors").is_file() or not TINY.is_file(),
    reason=f"shared assets not found under {ASSETS} (models/stories260K and corpora/calibration/tiny.txt are needed)",
)

SEQLEN = 256


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    yield


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokens():
    from transformers import AutoTokenizer

    return eval_tokens(AutoTokenizer.from_pretrained(MODEL), TINY)


def reference_ppl(model, tokens, seqlen, nwindows):
    """exp(total NLL / number of predictions) over windows [nwindows, seqlen] run as one batch."""
    windows = tokens[0, : nwindows * seqlen].view(nwindows, seqlen)
    with torch.no_grad():
        logits = model(windows).logits.float()  # [nwindows, seqlen, vocab]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum")
    return math.exp(nll.item() / (nwindows * (seqlen - 1)))


def test_perplexity_is_finite_and_plausible(model, tokens):
    ppl = perplexity(model, tokens, seqlen=SEQLEN, max_windows=8, progress=False)
    assert math.isfinite(ppl) and 2 < ppl < 30


def test_perplexity_equals_reference_loop(model, tokens):
    ppl = perplexity(model, tokens, seqlen=SEQLEN, max_windows=6, progress=False)
    assert ppl == pytest.approx(reference_ppl(model, tokens, SEQLEN, 6), rel=1e-4)
    # All windows of a short slice, with the progress bar on: nwindows = N // seqlen, the tail is ignored.
    short = tokens[:, : 3 * SEQLEN + 100]
    assert perplexity(model, short, seqlen=SEQLEN, progress=True) == pytest.approx(
        reference_ppl(model, short, SEQLEN, 3), rel=1e-4
    )
    assert perplexity(model, short[0], seqlen=SEQLEN, progress=False) == pytest.approx(
        reference_ppl(model, short, SEQLEN, 3), rel=1e-4  # a 1-D stream is accepted too
    )


def test_random_model_is_much_worse(model, tokens):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    trained = perplexity(model, tokens, seqlen=SEQLEN, max_windows=3, progress=False)
    untrained = perplexity(random_model, tokens, seqlen=SEQLEN, max_windows=3, progress=False)
    assert untrained > 10 * trained


def test_training_flag_is_restored(model, tokens):
    model.train()
    try:
        ppl = perplexity(model, tokens, seqlen=SEQLEN, max_windows=2, progress=False)
        assert model.training
    finally:
        model.eval()
    assert ppl == pytest.approx(perplexity(model, tokens, seqlen=SEQLEN, max_windows=2, progress=False), rel=1e-6)


def test_errors_name_the_fix(model, tokens):
    with pytest.raises(ValueError, match="max_position_embeddings=512; pass seqlen<=512"):
        perplexity(model, tokens, seqlen=1024, progress=False)
    with pytest.raises(ValueError, match="fewer than one window of seqlen=256; lower seqlen"):
        perplexity(model, tokens[:, :100], seqlen=SEQLEN, progress=False)
    with pytest.raises(ValueError, match=r"tokens must be \[1, N\]"):
        perplexity(model, tokens[:, :1024].view(2, 512), seqlen=SEQLEN, progress=False)
