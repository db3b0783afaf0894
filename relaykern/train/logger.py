"""Training metrics to TensorBoard (``<out>/tb``) and JSON lines (``<out>/metrics.jsonl``), from rank 0 only."""
from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class MetricsLogger:
    """On resume from step ``resume_step``, JSONL lines of later steps (logged before the kill) are dropped, so
    the file reads like the uninterrupted run's; TensorBoard gets the replayed points again (it shows the last)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.jsonl_path.is_file():
            kept = [line for line in self.jsonl_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.jsonl_path.write_text("".join(line + "\n" for line in kept))
        elif self.jsonl_path.is_file():
            self.jsonl_path.unlink()
        self.writer = SummaryWriter(str(out_dir / "tb"))
        self.jsonl = self.jsonl_path.open("a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
