"""Typed parameters: one module per params.yaml section, and `root` for the whole file.

A leaf of the house: these modules import only pydantic, the standard library and the project's
own leaves (`errors`, `yamlio`), so every stage can take its section without pulling in the
others. `root.load_params` reads params.yaml; a bad key, type or value is one ParamsError line.
"""
