"""kubetrain_trainer.export's publication of the Hugging Face export to S3 (moto_server): the completion
marker goes last, and an older export's files never mix with the new one's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetrain_api.config import S3Spec
from kubetrain_trainer.export import EXPORT_MARKER, publish_export
from kubetrain_trainer.storage import S3Store
from support.s3 import MotoServer, objects


def _export_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_a_new_export_replaces_the_old_one_whole_with_its_marker_last(s3: MotoServer, bucket: str,
                                                                      tmp_path: Path) -> None:
    store = S3Store(f"s3://{bucket}/export/", S3Spec.model_validate(s3.s3_section()))
    old = _export_dir(tmp_path / "old", {"model-00001-of-00002.safetensors": b"a" * 10,
                                         "model-00002-of-00002.safetensors": b"b" * 10, "config.json": b"{}"})
    publish_export(store, old, "hf/")
    new = _export_dir(tmp_path / "new", {"model.safetensors": b"c" * 20, "config.json": b'{"n": 1}'})
    seen_during_upload: list[bool] = []  # was a marker there while the new files went up?
    real_upload = store.client.upload_file

    def upload_file(*args: Any, **kwargs: Any) -> Any:
        seen_during_upload.append(f"export/hf/{EXPORT_MARKER}" in objects(s3.client(), bucket, "export/hf/"))
        return real_upload(*args, **kwargs)

    store.client.upload_file = upload_file
    uri = publish_export(store, new, "hf/")
    stored = objects(s3.client(), bucket, "export/hf/")
    assert uri == f"s3://{bucket}/export/hf/" and seen_during_upload == [False, False]
    assert set(stored) == {"export/hf/model.safetensors", "export/hf/config.json", f"export/hf/{EXPORT_MARKER}"}
    marker = json.loads(store.get(f"hf/{EXPORT_MARKER}"))
    assert marker["files"] == {"config.json": 8, "model.safetensors": 20}
