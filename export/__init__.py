"""Export to ONNX and TensorRT, and the engine cache."""
