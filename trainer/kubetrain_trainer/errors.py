"""The trainer's errors; each carries the exit code (kubetrain_api.exit_codes) the process ends with."""

from kubetrain_api.exit_codes import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_NON_FINITE, EXIT_STORAGE_UNAVAILABLE


class TrainerError(Exception):
    """An error the trainer stops with: one line for people, and the exit code the operator classifies."""

    exit_code = 1


class ConfigError(TrainerError):
    """A problem the user fixes in the manifest or its inputs. The message names the field and the fix."""

    exit_code = EXIT_CONFIG


class StorageUnavailableError(TrainerError):
    """Storage could not be reached at start (S3 5xx or throttling after the retries, a refused connection,
    DNS, credentials not there yet): it may pass, so the job is restarted rather than failed."""

    exit_code = EXIT_STORAGE_UNAVAILABLE


class ConcurrentWriterError(ConfigError):
    """Another live writer commits checkpoints under the same prefix (two runs or jobs share checkpoint.uri):
    their checkpoints would interleave, so this run stops instead of retrying its saves. Built by
    `concurrent_writer` (one plain message: it crosses ranks by pickle)."""


def concurrent_writer(prefix: str, detail: str) -> ConcurrentWriterError:
    return ConcurrentWriterError(
        f"checkpoint.uri: another writer is saving checkpoints to {prefix} ({detail}); two runs or jobs share "
        f"this checkpoint.uri. Stop the other one, or give this job a checkpoint.uri of its own")


class NonFiniteError(TrainerError):
    exit_code = EXIT_NON_FINITE

    def __init__(self, step: int, what: str, last_checkpoint: int | None):
        where = f"the last committed checkpoint is step {last_checkpoint}" if last_checkpoint else "no checkpoint"
        super().__init__(
            f"step {step}: {what} is not finite; training stopped ({where}). Lower training.optimizer.lr, "
            f"raise training.schedule.warmupSteps, or set training.gradClip"
        )
        self.step = step


class CheckpointFailedError(TrainerError):
    exit_code = EXIT_CHECKPOINT

    def __init__(self, failures: int, last_checkpoint: int | None):
        super().__init__(
            f"{failures} checkpoint saves in a row failed (see the log for the storage errors); stopping so that "
            f"no more training is lost. The newest committed checkpoint is step {last_checkpoint}. Check "
            f"checkpoint.uri, the s3 settings and the credentials, or raise checkpoint.maxConsecutiveFailures"
        )


def first_cause(exc: BaseException) -> str:
    """The underlying error of a failed save, named (DCP wraps per-rank failures), never the request (which
    may be signed)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, inner = next(iter(failures.items()))
        inner_exc = inner[0] if isinstance(inner, tuple) else inner
        root = root_cause(inner_exc)
        return f"rank {rank}: {type(root).__name__}: {str(root)[:300]}"
    root = root_cause(exc)
    return f"{type(root).__name__}: {str(root)[:300]}" if root is not exc else str(exc)[:300]


def root_cause(exc: BaseException) -> BaseException:
    """The first error of a chain (e.g. the S3 error under torch.save's 'unexpected pos')."""
    seen = set()
    while (nxt := exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)) is not None \
            and id(nxt) not in seen:
        seen.add(id(exc))
        exc = nxt
    return exc

