"""Perplexity with the GPTQ paper's protocol.

Non-overlapping windows of seqlen tokens; in each window the model predicts tokens 1..seqlen-1 from their prefixes,
the window's loss is the mean NLL of those seqlen-1 predictions, and (exactly as the GPTQ repo computes it)
ppl = exp(sum_i(loss_i * seqlen) / (nwindows * seqlen)), i.e. exp of the mean of the per-window mean losses.
Report seqlen and the BOS handling of the token stream (see gptqkit.data) with every number.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.LongTensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of a causal LM (anything whose forward returns `.logits`) over windows of `tokens` [1, N].

    `device` is where the windows are sent (default: the device of the model's first parameter); the model itself is
    not moved. The model runs in eval mode (its training flag is restored afterwards).

    >>> tokens = eval_tokens(tokenizer, "wikitext2", data_dir="corpora")
    >>> perplexity(model, tokens, seqlen=2048)
    """
    tokens = tokens.reshape(1, -1) if tokens.dim() == 1 else tokens
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be [1, N], got shape {tuple(tokens.shape)}; pass eval_tokens(...) output")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 (a window of one token predicts nothing), got {seqlen}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise ValueError(f"seqlen={seqlen} exceeds the model's max_position_embeddings={max_pos}; "
                         f"pass seqlen<={max_pos}")
    n = tokens.shape[1]
    if n < seqlen:
        raise ValueError(f"only {n} tokens, fewer than one window of seqlen={seqlen}; lower seqlen or use more text")
    nwindows = n // seqlen if max_windows is None else min(n // seqlen, max_windows)
    if nwindows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    if device is None:
        device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    nll = 0.0  # sum over windows of mean loss * seqlen, in float64 on the host
    try:
        for i in tqdm(range(nwindows), desc="perplexity", disable=not progress):
            window = tokens[:, i * seqlen : (i + 1) * seqlen].to(device)  # [1, seqlen]
            logits = model(window, use_cache=False).logits  # [1, seqlen, vocab]
            loss = F.cross_entropy(logits[0, :-1].float(), window[0, 1:])  # mean over seqlen - 1 predictions
            nll += loss.item() * seqlen
    finally:
        model.train(was_training)
    ppl = math.exp(nll / (nwindows * seqlen))
    logger.info("perplexity %.4f over %d windows of %d tokens", ppl, nwindows, seqlen)
    return ppl
