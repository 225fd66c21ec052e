"""Parameters of the `evaluate` stage (the `evaluate` section of params.yaml).

The stage measures the export folder (``export.out_dir``) as a board would run it — perplexity of
the ONNX model on validation tokens, size, CPU speed — and packs a *release folder*: the export's
files, the board runtime zipapp and a release manifest, registered as a new version of a model in
the MLflow model registry when a tracking server is reachable.
"""

from __future__ import annotations

from pydantic import Field

from nativelm.params.base import StrictModel


class EvaluateParams(StrictModel):
    """The whole `evaluate` section."""

    # JSON metrics of the stage (a DVC metrics file): perplexity, size, speed, registered version
    metrics_file: str = Field("metrics/evaluate.json", min_length=1, description="metrics JSON of the stage")
    # the release folder (replaced atomically): the export folder's files + nativelm-runtime.pyz
    # + release.json (sha256 of every file, git commit, data hash, params hash, source model sha256)
    release_dir: str = Field("models/release", min_length=1, description="release folder (replaced atomically)")
    # name in the MLflow model registry; each evaluate run with tracking registers a new version of it
    registered_model: str = Field("nativelm", min_length=1, description="MLflow registered model name")
    # benchmark: tokens of the (pseudo-random) prompt that is prefilled
    bench_prompt_len: int = Field(64, ge=1, description="benchmark prompt tokens")
    # benchmark: tokens decoded greedily with the KV cache after the prompt (eos ignored)
    bench_new_tokens: int = Field(32, ge=2, description="benchmark decoded tokens")
    # benchmark: timed runs (medians are reported), after one untimed warm-up run
    bench_repeats: int = Field(3, ge=1, description="benchmark timed repeats")
    # validation tokens scored by the ONNX model for its perplexity (0 = the whole validation split)
    ppl_tokens: int = Field(16384, ge=0, description="validation tokens of the ONNX perplexity (0: all)")
    # intra-op threads of the ONNX Runtime sessions of the stage (0: every CPU this process may use; the board
    # runtime refuses more than 4 x the CPUs)
    threads: int = Field(0, ge=0, le=1024, description="ONNX Runtime intra-op threads (0: default)")
