"""Parameters of the gate between `evaluate` and the fleet (the `gate` section of params.yaml)."""

from pydantic import Field, model_validator

from nativelm.params.base import StrictModel

ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"


class GateParams(StrictModel):
    """When a new registered version may replace the champion, and what promotion announces."""

    # relative perplexity regression allowed against the champion: 0.02 = at most 2% worse
    max_ppl_regression: float = Field(0.02, ge=0.0, le=100.0)
    # also require the export's parity figures to meet export.min_top1_agreement / max_ppl_rel_diff
    require_parity: bool = True
    champion_alias: str = Field("champion", pattern=ALIAS_PATTERN)
    candidate_alias: str = Field("candidate", pattern=ALIAS_PATTERN)
    # Prefect event emitted on promotion; the `rollout` deployment's trigger listens for it
    event: str = Field("nativelm.model.promoted", pattern=r"^[a-z][a-z0-9_.-]{0,127}$")

    @model_validator(mode="after")
    def _distinct_aliases(self) -> "GateParams":
        if self.champion_alias == self.candidate_alias:
            raise ValueError(f"champion_alias and candidate_alias are both {self.champion_alias!r}")
        return self
