"""Artifact formats: the only contracts between stages (see docs/architecture.md).

One module per artifact, each owning its layout, writing, reading and validation:
`prepared` (token shards + tokenizer, from `prepare`), `trained_model` (from `train`),
`export_folder` (the ONNX folder, from `export`) and `release` (what boards receive, from
`evaluate`). Stages import these, never another stage's code.
"""
