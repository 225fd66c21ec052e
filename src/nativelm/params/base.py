"""Base class for every parameter section: unknown keys and silent type coercion are errors."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Frozen, strict pydantic model: a typo'd key or a quoted number stops the command."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
