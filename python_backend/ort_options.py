"""ONNX Runtime session options of the engines: one source for the served engine models
(model_repository/onnx_runtime) and the in-process engines, so that both run the same sessions."""

from __future__ import annotations

import onnxruntime as ort


def session_options(threads: int = 0, spinning: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per core
    # Without the arena, activation memory is returned after each run instead of kept at its peak (full-size
    # UNet: 4.5 GB kept at 512 px; the same speed within the noise).
    options.enable_cpu_mem_arena = False
    if not spinning:
        # Several engine processes share the cores: threads that spin after a run starve the next engine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
