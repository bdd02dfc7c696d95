"""transformers as the oracle: a torch causal LM's logits and greedy tokens for NumPy inputs."""

import numpy as np
import torch


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def hf_greedy(model, prompt, max_new_tokens, mask=None) -> np.ndarray:
    """transformers' greedy tokens, EOS off, the mask explicit (all ones unless given)."""
    mask = np.ones(prompt.shape, np.int64) if mask is None else mask
    with torch.no_grad():
        return model.generate(
            torch.tensor(prompt),
            attention_mask=torch.tensor(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        ).numpy()
