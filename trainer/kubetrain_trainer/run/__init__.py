"""`kubetrain run job.yaml`: the whole pipeline on one machine, no cluster.

manifest → prepare.py (tokenizer, prepared shards) → preflight.py (every check that needs no process,
exit code 2) → supervise.py (torchrun, following rank 0's events) → progress_bar.py → summary.py
(summary, loss plot, a sample from the exported model). pipeline.py strings them together.
"""
