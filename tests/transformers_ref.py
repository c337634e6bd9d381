"""Greedy decoding with transformers (float32), the reference the engine is checked
against: returns the greedy tokens and the logprob of each under the model."""
from __future__ import annotations

import numpy as np


def load_hf(path: str, gguf_file: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, **kw)
    model.eval()
    return model


def greedy_reference(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    import torch

    ids = list(prompt)
    toks, lps = [], []
    with torch.no_grad():
        past = None
        inp = torch.tensor([ids])
        for _ in range(n):
            out = model(inp, past_key_values=past, use_cache=True)
            past = out.past_key_values
            lp = torch.log_softmax(out.logits[0, -1].double(), -1)
            t = int(torch.argmax(lp))
            toks.append(t)
            lps.append(float(lp[t]))
            inp = torch.tensor([[t]])
    return toks, lps


def random_prompt(n: int, vocab: int, seed: int) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(3, vocab, n)]
