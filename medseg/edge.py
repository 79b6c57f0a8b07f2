"""The ONNX engine: an exported model → masks, with onnxruntime, numpy and nibabel only.

This module must never import torch or MONAI (a test runs it where importing
them fails). `EdgePredictor` implements `medseg.engine.Engine` over an
onnxruntime session: it reads the pipeline spec that `medseg export` copied
unchanged from the checkpoint into the ONNX metadata and runs the same
reading, preprocessing, sliding-window blending, TTA, restoring and
post-processing code as the PyTorch engine (`medseg.pipeline`). Only the
window logits come from another runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.engine import Engine
from medseg.errors import MedsegError
from medseg.pipeline import PipelineSpec

__all__ = ["EdgePredictor", "read_metadata", "FORMATS"]

#: The metadata formats this runtime reads (see medseg.export.FORMAT): 3 carries the
#: pipeline spec; 2 (logits per model, values as separate keys) is read through
#: `PipelineSpec.from_meta`.
FORMATS = ("medseg-onnx-3", "medseg-onnx-2")

def read_metadata(path: str | Path) -> dict:
    """The medseg metadata of an ONNX file (values are JSON)."""
    import onnxruntime as ort
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise MedsegError(f"{path}: not a readable ONNX model ({exc})") from None
    meta = sess.get_modelmeta().custom_metadata_map
    if "medseg" not in meta:
        raise MedsegError(f"{path}: no medseg metadata; export the model with `medseg export`")
    info = json.loads(meta["medseg"])
    if info.get("format") not in FORMATS:
        raise MedsegError(f"{path}: ONNX format {info.get('format')!r}, expected one of {FORMATS} (per-model "
                          "logits); re-export it with this medseg: `medseg export --model RUN --out FILE`")
    return info




class EdgePredictor(Engine):
    """An exported medseg ONNX model → masks on each input's grid (`Engine`).

    `min_component_ml` / `et_min_ml` override the post-processing recorded at export;
    `mirror` runs the 8-flip TTA."""

    engine = "onnx"

    def __init__(self, model: str | Path, providers: Sequence[str] | None = None,
                 threads: int | None = None, min_component_ml: float | None = None,
                 et_min_ml: float | None = None, mirror: bool = False):
        import onnxruntime as ort
        meta = read_metadata(model)
        spec = PipelineSpec.from_meta(meta, str(model)).replace(min_component_ml=min_component_ml,
                                                                 et_min_ml=et_min_ml)
        available = ort.get_available_providers()
        wanted = providers or [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                                           "CPUExecutionProvider") if p in available]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model), opts, providers=list(wanted))
        self.input_name = self.session.get_inputs()[0].name
        super().__init__(spec, meta, int(meta["folds"]), mirror, [model])

    def describe(self) -> str:
        return f"{self.meta['network']['name']}, {Path(self.sources[0]).name}"

    def _window_logits(self, windows: list) -> np.ndarray:
        batch = np.stack(windows).astype(np.float32, copy=False)
        return self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)
