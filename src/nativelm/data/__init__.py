"""The `prepare` stage: corpus sources, cleaning, split, tokenizer training, token shards.

`prepare.run_prepare` runs the stage; `shards.load_shards` / `shards.read_manifest` are what
training reads back (the prepared-data contract, see docs/architecture.md).
"""
