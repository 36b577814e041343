"""progress.py: the trainer's /progress (served by global rank 0) → the job's status.progress patch."""

from __future__ import annotations

from kubetrain_operator.progress import final_report_patch, progress_patch, readable


def test_progress_patch_moves_step_time_only_when_the_step_changes() -> None:
    data = {"step": 5, "maxSteps": 10, "loss": float("inf"), "mfu": 0.5, "checkpoint": None, "phase": "training",
            "updatedAt": 100.0}
    first = progress_patch({}, data, 200.0)
    assert first["progress"]["step"] == 5 and "loss" not in first["progress"] and "checkpoint" not in first
    status = {"progress": first["progress"]}
    assert progress_patch(status, data, 300.0) == {}  # nothing new
    moved = progress_patch(status, {**data, "step": 6}, 400.0)
    assert moved["progress"]["step"] == 6 and moved["progress"]["stepTime"] == "1970-01-01T00:06:40.000Z"
    assert progress_patch({}, {"step": "x"}, 1.0) == {} and progress_patch({}, ["nope"], 1.0) == {}


def test_status_shows_numbers_a_person_can_read() -> None:
    data = {"step": 7, "maxSteps": 10, "loss": 8.596933841705322, "evalLoss": 0.000123456, "mfu": 0.41234567,
            "tokensPerSecond": 2005.8081858554121, "etaSeconds": 12.5001}
    progress = progress_patch({}, data, 1.0)["progress"]
    assert (progress["loss"], progress["evalLoss"], progress["mfu"]) == (8.597, 0.0001235, 0.4123)
    assert (progress["tokensPerSecond"], progress["etaSeconds"]) == (2006, 13)
    assert isinstance(progress["tokensPerSecond"], int) and readable("loss", None) is None


def test_a_final_report_only_moves_forward() -> None:
    status = {"progress": {"step": 60, "loss": 2.0}, "checkpoint": {"step": 60, "uri": "s3://b/60"}}
    older = {"step": 45, "loss": 3.0, "checkpoint": {"step": 45, "uri": "s3://b/45", "time": 5.0}}
    assert final_report_patch(status, older, 1.0) == {}  # an earlier run's worker 0: nothing goes back
    stale_checkpoint = {"step": 61, "loss": 1.9, "checkpoint": {"step": 45, "uri": "s3://b/45", "time": 5.0}}
    patch = final_report_patch(status, stale_checkpoint, 1.0)
    assert patch["progress"]["step"] == 61 and "checkpoint" not in patch
    assert final_report_patch(status, None, 1.0) == {} and final_report_patch({}, {"step": "x"}, 1.0) == {}
