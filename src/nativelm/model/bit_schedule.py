"""Progressive precision: the weight width of a run by fraction of training (``model.bit_schedule``),
which the training loop applies with `bitlinear.set_weight_bits`."""

from __future__ import annotations

from nativelm.params.model import check_bits


class BitSchedule:
    """Progressive precision: weight width by fraction of training.

    ``stages`` are (fraction_of_training, bits) pairs, the first at 0.0 and fractions increasing;
    from each fraction on, its width applies (e.g. ((0, 8), (0.25, 4), (0.5, 3), (0.75, 1.58))).
    """

    def __init__(self, stages: list[tuple[float, float]] | tuple[tuple[float, float], ...]) -> None:
        stages = [(float(f), check_bits(b)) for f, b in stages]
        if not stages or stages[0][0] != 0.0:
            raise ValueError("a bit schedule needs a first stage at fraction 0.0")
        if any(b[0] <= a[0] for a, b in zip(stages, stages[1:])):
            raise ValueError("bit schedule fractions must increase")
        self.stages = stages

    @classmethod
    def from_params(cls, params) -> BitSchedule:
        """The schedule of ``ModelParams.bit_schedule``."""
        return cls(params.schedule_stages())

    def bits_at(self, step: int, total_steps: int) -> float:
        """Weight width at optimizer step `step` (0-based) of a run of `total_steps` steps."""
        frac = step / max(total_steps, 1)
        bits = self.stages[0][1]
        for start, b in self.stages:
            if frac >= start:
                bits = b
        return bits

    def __repr__(self) -> str:
        return f"BitSchedule({self.stages})"
