"""Running exported artifacts: `onnx_runner.OnnxRunner` generates with an exported ONNX graph
(numpy and onnxruntime only, no torch)."""
