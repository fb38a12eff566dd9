"""export stage of the harness (see docs/design.md): PyTorch → ONNX in the variants users deploy.
`onnx_export.export_onnx` is the entry; `wrappers` / `nms_ops` are the traced graphs,
`quantize` / `calibration` the fp16 and int8 files, `variants` / `outputs` the output contract.
"""
