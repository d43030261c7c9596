"""Quantized GGUF files for the tests: an F32 GGUF (tinymodels.make_tiny_gguf) rewritten with chosen
tensor types, quantized by the `gguf` package's reference quantizer (what llama.cpp's Python tools use)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinymodels import read_gguf_metadata


def requantize_gguf(src, dst, type_of) -> Path:
    """Copy the GGUF `src` to `dst`, every 2-D tensor in the type `type_of(name)` gives (a gguf
    GGMLQuantizationType; None keeps it F32). Metadata is copied as it is."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, (vtype, val, item_type) in read_gguf_metadata(src).items():
        if key != "general.architecture":
            w.add_key_value(key, val, vtype, sub_type=item_type)
    for t in reader.tensors:
        a = np.array(t.data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        kind = type_of(t.name) if a.ndim == 2 else None
        if kind is None or kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, a)
        elif kind == gguf.GGMLQuantizationType.I32:  # not a weight type: for refusals
            w.add_tensor(t.name, a.astype(np.int32))
        else:
            q = gguf.quants.quantize(a, kind)
            w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)
