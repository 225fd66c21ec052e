"""The `evaluate` stage: ONNX quality and CPU speed of the export, a release folder, a registered version."""
