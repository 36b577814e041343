"""kubetrain_trainer.optim: the learning-rate schedule (warmup, then cosine, linear or constant decay)."""

from __future__ import annotations

import pytest
from kubetrain_api.config import TrainingSpec
from kubetrain_trainer.optim import lr_at


def test_schedule_warmup_and_decays() -> None:
    spec = TrainingSpec(max_steps=110, optimizer={"lr": 1.0}, schedule={"warmup_steps": 10, "min_lr_ratio": 0.1})
    assert lr_at(0, spec) == pytest.approx(0.1) and lr_at(9, spec) == pytest.approx(1.0)
    assert lr_at(10, spec) == pytest.approx(1.0)
    assert lr_at(60, spec) == pytest.approx(0.55)  # cosine midpoint between 1.0 and 0.1
    assert lr_at(109, spec) == pytest.approx(0.1, abs=1e-3)
    linear = spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"decay": "linear"})})
    assert lr_at(60, linear) == pytest.approx(0.55) and lr_at(35, linear) == pytest.approx(0.775)
    const = spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"decay": "constant"})})
    assert lr_at(100, const) == 1.0
