"""Trajectories out of the store: OpenTelemetry GenAI spans (OTLP) and fine-tuning datasets.

    from honed.exporters import select_trajectories, write_jsonl, write_parquet, to_hf_dataset
    from honed.exporters import LiveExporter, replay      # needs honed[otlp]

Nothing heavy loads on import: the OpenTelemetry SDK only when `LiveExporter`, `replay` or
`honed.exporters.otel` is first used, Hugging Face `datasets` only when a Dataset or parquet file
is built.
"""

from __future__ import annotations

from honed._lazy import lazy_attributes
from honed.exporters.datasets import ExportResult, to_hf_dataset, write_jsonl, write_parquet
from honed.messages import NotExportable, chat_example
from honed.store.select import Selection, count_selected, select_trajectories

_OTEL = {"LiveExporter", "OTLPExportError", "ReplayResult", "replay"}

__all__ = [
    "ExportResult",
    "LiveExporter",
    "NotExportable",
    "OTLPExportError",
    "ReplayResult",
    "Selection",
    "chat_example",
    "count_selected",
    "replay",
    "select_trajectories",
    "to_hf_dataset",
    "write_jsonl",
    "write_parquet",
]


__getattr__ = lazy_attributes(__name__, dict.fromkeys(_OTEL, "honed.exporters.otel"))
