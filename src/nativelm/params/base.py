"""Base class for every parameter section: unknown keys and silent type coercion are errors."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Frozen, strict pydantic model: a typo'd key, a quoted number or an infinite / NaN float stops the command."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
