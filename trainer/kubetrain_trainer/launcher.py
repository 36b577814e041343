"""`kubetrain run job.yaml`: the whole pipeline on one machine, no cluster.

manifest → (tokenizer, prepared shards) → trainer config → torchrun → progress → summary/plot/sample.
Everything that can be checked before processes start is checked here, with exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from .config import TrainerConfig
from .errors import EXIT_PREEMPTED, ConfigError


def prepare_inputs(cfg: TrainerConfig, workdir: Path, log: Any = print) -> TrainerConfig:
    """Return a copy of `cfg` whose data are prepared shard dirs and whose tokenizer is a saved one,
    preparing (and training a tokenizer) under `workdir` when the inputs are raw text. Cached: a rerun
    with unchanged inputs and settings reuses the earlier output."""
    from . import preparation as datamod
    from .tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe

    d = cfg.data
    if d.train.startswith("s3://") or datamod.is_prepared(d.train):
        if d.validation is None or not (d.validation.startswith("s3://") or datamod.is_prepared(d.validation)):
            raise ConfigError("data.validation: with prepared training shards, give the prepared validation "
                              "shards too (the validation/ directory `kubetrain prepare` wrote)")
        tok_path = cfg.tokenizer.path or d.train.rstrip("/").rsplit("/", 1)[0] + "/tokenizer"
        if tok_path.startswith("s3://"):
            from .storage import local_copy

            tok_path = local_copy(tok_path, workdir / "tokenizer-download", cfg.s3, "tokenizer.path")
        load_tokenizer(tok_path)
        return cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"path": tok_path})})

    train_files = datamod.resolve_inputs(d.train, "data.train")
    val_files = datamod.resolve_inputs(d.validation, "data.validation") if d.validation else None
    split = None if val_files else d.effective_validation_split

    if cfg.tokenizer.train is not None:
        t = cfg.tokenizer.train
        key = datamod.inputs_fingerprint(train_files, vocab=t.vocab_size, min_freq=t.min_frequency,
                                         sample=t.sample_chars, split=split, field=d.text_field)
        tok_dir = workdir / "tokenizer"
        stamp = tok_dir / "kubetrain-inputs.txt"
        if not (stamp.is_file() and stamp.read_text() == key):
            log(f"training a {t.vocab_size}-token byte-level BPE on {len(train_files)} file(s) ...")
            tok = train_bpe(datamod.iter_training_texts(train_files, d.text_field, split, t.sample_chars),
                            t.vocab_size, t.min_frequency)
            tok.save_pretrained(str(tok_dir))
            stamp.write_text(key)
        tok_path = str(tok_dir)
    else:
        tok_path = cfg.tokenizer.path or str(cfg.model.init_from)
    tokenizer = load_tokenizer(tok_path)

    key = datamod.inputs_fingerprint(train_files + (val_files or []), tokenizer=tokenizer_fingerprint(tokenizer),
                                     split=split, field=d.text_field, min_chars=d.min_document_chars,
                                     version=datamod.FORMAT_VERSION)
    out = workdir / "data"
    info = out / "prepare.json"
    if not (info.is_file() and json.loads(info.read_text()).get("inputs") == key):
        log(f"preparing {len(train_files)} training file(s) → {out} ...")
        t0 = time.perf_counter()
        stats = datamod.prepare(train_files, tokenizer, out, validation_files=val_files,
                                validation_split=split or 0.0, text_field=d.text_field,
                                min_document_chars=d.min_document_chars, extra_meta={"inputs": key})
        dt = time.perf_counter() - t0
        total = sum(stats.tokens.values())
        log(f"prepared {stats.documents['train']} train / {stats.documents['validation']} validation documents, "
            f"{stats.tokens['train']:,} / {stats.tokens['validation']:,} tokens ({total / dt:,.0f} tokens/s); "
            f"dropped {stats.documents_dropped_small} tiny and {stats.documents_duplicate} duplicate documents")
    data = d.model_copy(update={"train": str(out / "train"), "validation": str(out / "validation"),
                                "validation_split": None})
    return cfg.model_copy(update={"data": data,
                                  "tokenizer": cfg.tokenizer.model_copy(update={"path": tok_path, "train": None})})


def preflight(cfg: TrainerConfig, nproc: int, output: Path) -> None:
    """Checks that need the prepared inputs but no processes: batch layout, model overrides, checkpoint."""
    from .checkpoint import CheckpointManager
    from .model import llama_config, model_fingerprint
    from .shards import TokenShards
    from .storage import open_store
    from .tokenizer import load_tokenizer, tokenizer_fingerprint

    if (problem := cfg.training.batch_layout_error(nproc)) is not None:
        raise ConfigError(problem)
    tokenizer = load_tokenizer(str(cfg.tokenizer.path))
    mcfg = llama_config(cfg.model, len(tokenizer), cfg.data.seq_length)
    train = TokenShards(str(cfg.data.train), cfg.data.seq_length, "data.train", s3=cfg.s3)
    if len(train) < cfg.training.global_batch_size:
        raise ConfigError(f"data.train holds {len(train)} sequences of {cfg.data.seq_length} tokens, fewer than "
                          f"training.globalBatchSize ({cfg.training.global_batch_size}); add data or lower either")
    store = open_store(cfg.checkpoint.uri or str(output / "checkpoints"), cfg.s3)
    manager = CheckpointManager(store, cfg.checkpoint.keep, -1,
                                {"model": model_fingerprint(mcfg), "tokenizer": tokenizer_fingerprint(tokenizer)})
    try:
        latest = manager.latest()
    except Exception as exc:  # storage errors name the operation, never the credentials
        raise ConfigError(f"checkpoint.uri: cannot list {store.uri} ({type(exc).__name__}: {str(exc)[:200]}); check "
                          f"the bucket, s3.endpoint and the credentials") from exc
    if latest is not None:
        manager.check_compatible(latest)


class Progress:
    """A one-line progress bar on a terminal; periodic lines otherwise (CI logs)."""

    def __init__(self, max_steps: int, stream: Any = sys.stdout):
        self.max_steps, self.stream = max_steps, stream
        self.tty = stream.isatty()
        self.times: deque[float] = deque(maxlen=20)
        self.last_print = 0.0
        self.eval_loss: float | None = None

    def update(self, ev: dict[str, Any]) -> None:
        if ev["type"] == "eval":
            self.eval_loss = ev["loss"]
            self._line(f"  eval at step {ev['step']}: validation loss {ev['loss']:.4f}, "
                       f"perplexity {ev['perplexity']:.1f}")
        elif ev["type"] == "checkpoint":
            self._line(f"  checkpoint at step {ev['step']} committed ({ev['seconds']:.1f}s)")
        elif ev["type"] == "step":
            self.times.append(ev["seconds"])
            step = ev["step"]
            eta = (self.max_steps - step) * sum(self.times) / len(self.times)
            width = 24
            filled = int(width * step / self.max_steps)
            bar = "=" * filled + (">" if filled < width else "") + " " * max(0, width - filled - 1)
            text = (f"step {step}/{self.max_steps} [{bar}] loss {ev['loss']:.4f} | "
                    f"{ev['tokensPerSecond']:,.0f} tok/s | ETA {_duration(eta)}")
            now = time.monotonic()
            if self.tty:
                self.stream.write("\r" + text + " " * 4)
                self.stream.flush()
            elif now - self.last_print > 10 or step == self.max_steps:
                self.last_print = now
                self.stream.write(text + "\n")
                self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def launch(cfg: TrainerConfig, output: Path, nproc: int, progress: Progress) -> tuple[int, int]:
    """Run torchrun with `nproc` processes and follow rank 0's events until it exits.
    Returns the exit code and the events file offset this run's events start at."""
    config_path = output / "trainer-config.json"
    config_path.write_text(json.dumps(cfg.to_wire(), indent=1))
    events_path = output / "events.jsonl"
    offset = start = events_path.stat().st_size if events_path.exists() else 0
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:  # split the cores between the processes instead of oversubscribing
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", f"--shutdown-timeout={int(cfg.checkpoint.preemption_grace_seconds) + 10}",
           "-m", "kubetrain_trainer.train", "--config", str(config_path), "--output", str(output)]
    with (output / "train.log").open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def forward(signum: int, frame: Any) -> None:  # Ctrl-C or SIGTERM: let the trainer checkpoint first
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            offset = _follow(events_path, offset, progress)
            if proc.poll() is not None:
                _follow(events_path, offset, progress)
                return proc.returncode, start
            time.sleep(0.2)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _follow(path: Path, offset: int, progress: Progress) -> int:
    if not path.exists():
        return offset
    with path.open() as fh:
        fh.seek(offset)
        while True:
            line = fh.readline()
            if not line.endswith("\n"):
                break
            progress.update(json.loads(line))
            offset = fh.tell()
    return offset


def last_event(path: Path, kind: str, since: int = 0) -> dict[str, Any] | None:
    if not path.exists():
        return None
    found = None
    with path.open() as fh:
        fh.seek(since)
        lines = fh.read().splitlines()
    for line in lines:
        ev = json.loads(line)
        if ev.get("type") == kind:
            found = ev
    return found


def generate_sample(model_dir: Path, prompt: str | None, validation: str, seq_length: int, s3: Any = None,
                    max_new_tokens: int = 60, seed: int = 0) -> dict[str, str]:
    """Sample from the exported model as a user would: from_pretrained, then generate."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .shards import TokenShards

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


def run(manifest_path: str, output: str | None, nproc: int | None, prompt: str | None = None) -> int:
    from kubetrain_operator.spec import load_manifest

    job = load_manifest(manifest_path)
    out = Path(output or Path("runs") / job.metadata.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    nproc = nproc or job.spec.workers.proc_per_node
    print(f"kubetrain run: job {job.metadata.name}, {nproc} process(es), output {out}")
    cfg = prepare_inputs(job.spec.trainer_config(), out)
    if cfg.checkpoint.uri is None:
        cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"uri": str(out / "checkpoints")})})
    preflight(cfg, nproc, out)
    progress = Progress(cfg.training.max_steps)
    code, since = launch(cfg, out, nproc, progress)
    events = out / "events.jsonl"
    if progress.tty:
        print()
    preempted = last_event(events, "preempted", since)
    if code == EXIT_PREEMPTED or (code != 0 and preempted):
        ev = preempted
        print(f"stopped: checkpoint at step {ev['step'] if ev else '?'} committed; run the same command to resume")
        return EXIT_PREEMPTED
    if code != 0:
        err = last_event(events, "error", since)
        if err:
            print(f"error: {err['message']}", file=sys.stderr)
            return int(err.get("exitCode", code))
        tail = (out / "train.log").read_text(errors="replace").splitlines()[-30:]
        print(f"training failed (exit code {code}); the end of {out / 'train.log'}:\n" + "\n".join(tail),
              file=sys.stderr)
        return code if 0 < code < 256 else 1
    results = json.loads((out / "results.json").read_text())
    summary = dict(results)
    if cfg.checkpoint.export_hf:
        summary["sample"] = generate_sample(out / "model", prompt, str(cfg.data.validation), cfg.data.seq_length,
                                            s3=cfg.s3, seed=cfg.training.seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_losses(results, out / "loss.png")
    print_summary(summary, out)
    return 0


def print_summary(s: dict[str, Any], out: Path) -> None:
    ppl = s.get("validationPerplexity")
    lines = [
        "",
        f"done: {s['steps']} steps, {s['tokens']:,} tokens in {_duration(s['trainingSeconds'])} "
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
