"""The `prepare` stage: corpus sources, cleaning, split, tokenizer training, token shards.

`prepare.run_prepare` runs the stage; what it writes is the prepared-data format of
`nativelm.formats.prepared` (see docs/architecture.md).
"""
