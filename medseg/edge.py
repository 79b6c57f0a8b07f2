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

__all__ = ["EdgePredictor", "read_metadata", "FORMATS", "PROVIDERS", "session_providers", "trt_cache_dir"]

#: ``--provider`` → onnxruntime execution provider. ``auto`` (the default) takes
#: CUDA when this onnxruntime has it, else the CPU; TensorRT only when asked,
#: because its first run builds an engine (minutes; cached on disk after).
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}

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




def trt_cache_dir(model: str | Path, cache: str | Path | None = None) -> Path:
    """Where TensorRT keeps the engines built for `model`: `cache` when given, else
    ``$MEDSEG_TRT_CACHE`` or ``~/.cache/medseg/tensorrt``, in a folder named by the
    model file's content hash (another model never reuses an engine)."""
    import hashlib
    import os
    root = Path(cache or os.environ.get("MEDSEG_TRT_CACHE") or Path.home() / ".cache" / "medseg" / "tensorrt")
    digest = hashlib.sha256(Path(model).read_bytes()).hexdigest()[:16]
    return root / f"{Path(model).stem}-{digest}"


def session_providers(provider: str, available: Sequence[str], model: str | Path | None = None,
                      input_name: str = "input", roi: Sequence[int] = (), batch: int = 1,
                      cache: str | Path | None = None) -> list:
    """``--provider`` → the provider list for `ort.InferenceSession`, or a
    `MedsegError` saying why the provider is not available here and what gives it.

    TensorRT runs in fp16 with its engine and timing caches in `trt_cache_dir`, and
    one optimisation profile for window batches of 1 … `batch` (the last batch of a
    sliding window can be smaller), so the engine is built once per model and GPU."""
    if provider == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    if provider not in PROVIDERS:
        raise MedsegError(f"--provider {provider!r}: expected auto or one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in available:
        need = {"cuda": "the onnxruntime-gpu package (pip install 'medseg[gpu]', then pip uninstall "
                        "onnxruntime, see README \"GPU\") and an NVIDIA GPU with its CUDA libraries",
                "tensorrt": "the onnxruntime-gpu package built with TensorRT (pip install 'medseg[gpu]', then "
                            "pip uninstall onnxruntime), the TensorRT libraries (libnvinfer, e.g. pip install "
                            "tensorrt) and an NVIDIA GPU"}.get(provider, "")
        raise MedsegError(f"--provider {provider}: this onnxruntime offers {', '.join(available)} only; "
                          f"{provider} needs {need}. Without it, use --provider auto (CUDA when present, "
                          "else the CPU)")
    if provider == "cpu":
        return [name]
    if provider == "cuda":
        return [name, "CPUExecutionProvider"]
    folder = trt_cache_dir(model, cache) if model is not None else Path(cache or ".")
    folder.mkdir(parents=True, exist_ok=True)
    window = "x".join(str(int(r)) for r in roi)
    opts = {"trt_fp16_enable": True,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder)}
    if window:
        opts.update(trt_profile_min_shapes=f"{input_name}:1x4x{window}",
                    trt_profile_opt_shapes=f"{input_name}:{batch}x4x{window}",
                    trt_profile_max_shapes=f"{input_name}:{batch}x4x{window}")
    return [(name, opts), "CUDAExecutionProvider", "CPUExecutionProvider"]


class EdgePredictor(Engine):
    """An exported medseg ONNX model → masks on each input's grid (`Engine`).

    `min_component_ml` / `et_min_ml` override the post-processing recorded at export;
    `mirror` runs the 8-flip TTA."""

    engine = "onnx"

    def __init__(self, model: str | Path, providers: Sequence | None = None,
                 threads: int | None = None, min_component_ml: float | None = None,
                 et_min_ml: float | None = None, mirror: bool = False, provider: str = "auto",
                 trt_cache: str | Path | None = None):
        import onnxruntime as ort
        meta = read_metadata(model)
        spec = PipelineSpec.from_meta(meta, str(model)).replace(min_component_ml=min_component_ml,
                                                                 et_min_ml=et_min_ml)
        if providers is None:
            import onnx
            graph = onnx.load(str(model), load_external_data=False).graph
            providers = session_providers(provider, ort.get_available_providers(), model, graph.input[0].name,
                                          spec.roi, spec.sw_batch_size, trt_cache)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model), opts, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise MedsegError(f"{model}: onnxruntime could not start the providers "
                              f"{[p[0] if isinstance(p, tuple) else p for p in providers]} ({exc})") from None
        wanted = PROVIDERS.get(provider)
        if wanted and wanted not in self.session.get_providers():
            # onnxruntime falls back to the next provider with a warning when one fails to load
            raise MedsegError(f"--provider {provider}: onnxruntime offers {wanted} but could not start it "
                              f"(the session runs on {self.session.get_providers()}); check its libraries "
                              "(for TensorRT: libnvinfer of the version this onnxruntime-gpu was built with)")
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        super().__init__(spec, meta, int(meta["folds"]), mirror, [model])

    def describe(self) -> str:
        return f"{self.meta['network']['name']}, {Path(self.sources[0]).name}, {self.provider}"

    def _window_logits(self, windows: list) -> np.ndarray:
        batch = np.stack(windows).astype(np.float32, copy=False)
        return self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)
