"""The typed settings of the fine-tuning API: ``configs/fine_tuning.yaml`` is an instance of
``FineTuningConfig``; ``fine_tuning: {config: ...}`` in the Serve config names it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, PositiveInt, model_validator

from ray_app.schema import Strict, load_yaml, parse

__all__ = ["FineTuningConfig"]


class FineTuningConfig(Strict):
    max_running: PositiveInt = Field(1, description="Jobs training at once; the others wait, queued.")
    promote: bool = Field(True, description="A job's adapter becomes its line's champion when it is registered, "
                                            "so `fine_tuned_model` answers at once.")
    max_file_bytes: PositiveInt = Field(512 * 1024 * 1024, description="Larger training files are refused (413).")
    template: dict[str, Any] = Field(
        default_factory=dict, description="The TrainConfig (ray_app.training.config) each job starts from; a job "
                                          "sets its name, base model, data file, epochs, batch size and rate.")

    @model_validator(mode="after")
    def _template_is_a_train_config(self) -> FineTuningConfig:
        from ray_app.training.config import TrainConfig

        document = dict(self.template) | {"name": "check", "base_model": "check"}
        document["data"] = dict(document.get("data") or {}) | {"train": "check.jsonl"}
        TrainConfig.model_validate(document)  # a bad template fails at build time, not in the first job
        return self

    @classmethod
    def load(cls, source: str | Path | dict[str, Any]) -> FineTuningConfig:
        if isinstance(source, dict):
            return parse(cls, source, "fine_tuning.config")
        return parse(cls, load_yaml(source), str(source))
