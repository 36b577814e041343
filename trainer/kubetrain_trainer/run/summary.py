"""`kubetrain run`'s summary: a sample from the exported model, the loss plot, the printed summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .progress_bar import duration


def generate_sample(model_dir: Path, prompt: str | None, validation: str, seq_length: int, s3: Any = None,
                    max_new_tokens: int = 60, seed: int = 0) -> dict[str, str]:
    """Sample from the exported model as a user would: from_pretrained, then generate."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..shards import TokenShards

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    if prompt is None:  # the opening of the held-out text: meaningful for any corpus
        first = TokenShards(validation, seq_length, "data.validation", s3=s3).batch(np.array([0]))[0]
        ids = first[:12].unsqueeze(0)
        prompt = str(tok.decode(ids[0], skip_special_tokens=True))
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=True, top_k=40, temperature=0.8, pad_token_id=tok.eos_token_id)
    return {"prompt": prompt, "text": str(tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True))}


def plot_losses(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    history = results.get("trainLossHistory", [])
    if history:
        ax.plot([h[0] for h in history], [h[1] for h in history], label="train loss", lw=1.2)
    evals = results.get("evaluations", [])
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_summary(s: dict[str, Any], out: Path) -> None:
    ppl = s.get("validationPerplexity")
    lines = [
        "",
        f"done: {s['steps']} steps, {s['tokens']:,} tokens in {duration(s['trainingSeconds'])} "
        f"({s['tokensPerSecond']:,.0f} tokens/s, {s['parameters'] / 1e6:.1f}M parameters, {s['parallelism']} × "
        f"{s['worldSize']})",
        f"  train loss       {s['trainLoss']:.4f}",
        f"  validation loss  {s['initialValidationLoss']:.4f} → {s['validationLoss']:.4f}"
        f"  (perplexity {ppl:,.1f})" if ppl is not None and not math.isnan(ppl) else "",
    ]
    if "sample" in s:
        lines += ["  sample:", f"    {s['sample']['prompt']!r} → {s['sample']['text']!r}"]
    lines += [f"  wrote {out / 'summary.json'}, {out / 'loss.png'}, {out / 'model'}/"]
    print("\n".join(line for line in lines if line))
