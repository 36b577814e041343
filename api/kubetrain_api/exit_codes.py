"""What a trainer's exit code means. The trainer exits with these, the pod entrypoint passes them on
(torchrun itself exits 1 whatever its workers returned), `kubetrain run` returns them and the operator
classifies a failed worker pod by them (kubetrain_operator.pods.classify)."""

EXIT_CONFIG = 2  # bad manifest, data, tokenizer or checkpoint: retrying cannot help
EXIT_NON_FINITE = 3  # loss or gradients became NaN/inf: deterministic, so retrying cannot help either
EXIT_CHECKPOINT = 4  # checkpoints kept failing (storage down or misconfigured): retry after fixing it
EXIT_STORAGE_UNAVAILABLE = 5  # storage unreachable at start (5xx, connection, DNS, credentials not yet there): retry
EXIT_PREEMPTED = 143  # SIGTERM honoured: a checkpoint was committed; restart to resume (128 + SIGTERM)
