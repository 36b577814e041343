"""Errors with an exit-code contract the launcher and the operator rely on."""

EXIT_CONFIG = 2  # bad manifest, data, tokenizer or checkpoint: retrying cannot help
EXIT_NON_FINITE = 3  # loss or gradients became NaN/inf: deterministic, so retrying cannot help either
EXIT_CHECKPOINT = 4  # checkpoints kept failing (storage down or misconfigured): retry after fixing it
EXIT_PREEMPTED = 143  # SIGTERM honoured: a checkpoint was committed; restart to resume (128 + SIGTERM)


class ConfigError(Exception):
    """A problem the user fixes in the manifest or its inputs. The message names the field and the fix."""

    exit_code = EXIT_CONFIG


class NonFiniteError(Exception):
    exit_code = EXIT_NON_FINITE

    def __init__(self, step: int, what: str, last_checkpoint: int | None):
        where = f"the last committed checkpoint is step {last_checkpoint}" if last_checkpoint else "no checkpoint"
        super().__init__(
            f"step {step}: {what} is not finite; training stopped ({where}). Lower training.optimizer.lr, "
            f"raise training.schedule.warmupSteps, or set training.gradClip"
        )
        self.step = step


class CheckpointFailedError(Exception):
    exit_code = EXIT_CHECKPOINT

    def __init__(self, failures: int, last_checkpoint: int | None):
        super().__init__(
            f"{failures} checkpoint saves in a row failed (see the log for the storage errors); stopping so that "
            f"no more training is lost. The newest committed checkpoint is step {last_checkpoint}. Check "
            f"checkpoint.uri, the s3 settings and the credentials, or raise checkpoint.maxConsecutiveFailures"
        )
