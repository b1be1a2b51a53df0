"""Export: the packed model file (`export.packed`) and ONNX (`export.onnx`)."""
