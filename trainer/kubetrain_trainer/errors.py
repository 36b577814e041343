"""The trainer's errors; each carries the exit code (kubetrain_api.exit_codes) the process ends with."""

from kubetrain_api.exit_codes import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_NON_FINITE


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
