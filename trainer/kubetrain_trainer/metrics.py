"""Prometheus metrics and the /progress endpoint, served from one small HTTP server per node.

Local rank 0 of every node serves /metrics (so each pod exposes its own); global rank 0 also serves
/progress, the JSON the operator reads into the job's status.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from kubetrain_api.contract import HEALTH_PATH, METRICS_PATH, PROGRESS_KEYS, PROGRESS_PATH
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12, "MI300X": 1307e12,
}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s of one device: the datasheet value on known GPUs, else a measured matmul peak."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value if dtype == torch.bfloat16 else value / 2
    return measured_matmul_flops(device, dtype)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


class TrainingMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.loss = Gauge("kubetrain_loss", "Training loss (mean over the global batch) of the last step", registry=r)
        self.eval_loss = Gauge("kubetrain_eval_loss", "Validation loss at the last evaluation", registry=r)
        self.eval_perplexity = Gauge("kubetrain_eval_perplexity", "Validation perplexity", registry=r)
        self.learning_rate = Gauge("kubetrain_learning_rate", "Learning rate of the last step", registry=r)
        self.grad_norm = Gauge("kubetrain_grad_norm", "Global gradient norm before clipping", registry=r)
        self.tokens_per_second = Gauge("kubetrain_tokens_per_second", "Global training throughput", registry=r)
        self.mfu = Gauge("kubetrain_mfu_ratio", "Model FLOPs utilisation (0-1) of the last step", registry=r)
        self.step = Gauge("kubetrain_step", "Optimizer steps completed", registry=r)
        self.max_steps = Gauge("kubetrain_max_steps", "Optimizer steps the job will run", registry=r)
        self.tokens = Counter("kubetrain_tokens", "Tokens trained on by this node's processes", registry=r)
        self.step_seconds = Histogram(
            "kubetrain_step_duration_seconds", "Wall time of one optimizer step", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80))
        self.data_wait = Counter("kubetrain_data_wait_seconds", "Time spent waiting for batches", registry=r)
        self.checkpoint_seconds = Histogram(
            "kubetrain_checkpoint_save_seconds", "Wall time of a checkpoint save", registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.checkpoint_blocked = Histogram(
            "kubetrain_checkpoint_blocked_seconds", "Training time blocked by a checkpoint save (staging)",
            registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 120))
        self.checkpoint_bytes = Counter("kubetrain_checkpoint_written_bytes", "Checkpoint bytes this process wrote",
                                        registry=r)
        self.checkpoint_throughput = Gauge("kubetrain_checkpoint_write_bytes_per_second",
                                           "Write throughput of this process's last checkpoint", registry=r)
        self.checkpoint_failures = Counter("kubetrain_checkpoint_failures", "Checkpoint saves that failed",
                                           registry=r)
        self.checkpoint_step = Gauge("kubetrain_checkpoint_last_step", "Newest committed checkpoint step", registry=r)
        self.parameters = Gauge("kubetrain_model_parameters", "Model parameters", registry=r)
        self.flops_per_token = Gauge("kubetrain_model_flops_per_token", "Training FLOPs per token", registry=r)
        self.world_size = Gauge("kubetrain_world_size", "Training processes in the job", registry=r)


class ProgressState:
    """What /progress returns; updated by the training loop, read by the HTTP thread."""

    def __init__(self, max_steps: int):
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {"step": 0, "maxSteps": max_steps, "loss": None, "evalLoss": None,
                                      "evalPerplexity": None, "tokensPerSecond": None, "mfu": None,
                                      "etaSeconds": None, "checkpoint": None, "checkpoints": [],
                                      "phase": "starting", "updatedAt": time.time()}

    def update(self, **fields: Any) -> None:
        unknown = set(fields) - PROGRESS_KEYS
        if unknown:  # the operator reads only the contract's keys
            raise ValueError(f"/progress keys {sorted(unknown)} are not in kubetrain_api.contract.Progress")
        with self._lock:
            self._data.update(fields, updatedAt=time.time())

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._data)


class MetricsServer:
    def __init__(self, metrics: TrainingMetrics, progress: ProgressState | None, port: int, host: str = "0.0.0.0"):
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == METRICS_PATH:
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif path == PROGRESS_PATH and progress is not None:
                    self._send(200, "application/json", json.dumps(progress.snapshot()).encode())
                elif path == HEALTH_PATH:
                    self._send(200, "text/plain", b"ok\n")
                else:
                    self._send(404, "text/plain", b"not found\n")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes every few seconds would flood the log
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
