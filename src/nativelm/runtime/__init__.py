"""The board runtime: run an exported nativelm model with ONNX Runtime, nothing else.

This package is what ships to a board (as one zipapp, see `pack.py`), so it imports nothing from
the rest of nativelm but the stdlib-only `nativelm.jsonfile` (shipped with it), and nothing beyond
numpy, onnxruntime and tokenizers (onnxruntime and tokenizers
only when a model is loaded, so `--help` stays quick on a slow board).

    from nativelm.runtime import load_model, generate, stream, Sampling, benchmark
    model = load_model("models/export")            # verifies every file's sha256 first
    print(generate(model, "The king", max_new_tokens=20).text)
    for piece in stream(model, "The king", sampling=Sampling(temperature=0.8, top_p=0.9, seed=1)):
        print(piece, end="", flush=True)

The command line (`python -m nativelm.runtime`, or `python nativelm-runtime.pyz`) offers
`generate`, `bench` and `health`; see `__main__.py`.
"""

from __future__ import annotations

__version__ = "0.1.0"

# numpy is the only third-party import here; onnxruntime and tokenizers load with the first model.
# (Eager, not lazy: the function `generate` shares its name with the module `generate`.)
from .bench import benchmark
from .errors import RuntimeFailure
from .generate import Generation, Sampling, TextStream, generate, stream
from .health import check_health
from .session import Model, load_model, verify_folder

__all__ = ["Generation", "Model", "RuntimeFailure", "Sampling", "TextStream", "__version__", "benchmark",
           "check_health", "generate", "load_model", "stream", "verify_folder"]
