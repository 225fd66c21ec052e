"""ONNX export: weight packing (`pack`), one builder per ONNX Runtime operator (`ops`), graph and parity checks.

Lowest layer first: `pack` turns integer weights into the byte layouts ONNX Runtime 1.32's quantized
contrib operators read (pure numpy); `ops` wraps each operator in one function returning its nodes
and initializers, and `kernels` says which kernel path a node takes (rules) and really ran on (profiler).
"""
