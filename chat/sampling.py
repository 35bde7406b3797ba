"""How tq-chat samples: mlx-lm's samplers and logits processors, with mlx-lm's defaults."""

from dataclasses import dataclass

from mlx_lm.sample_utils import make_logits_processors, make_sampler


@dataclass(frozen=True)
class Sampling:
    """temp 0 is greedy; top_k 0 and min_p 0 are off; repetition_penalty None (or 1) is off."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20

    def __post_init__(self):
        checks = [
            (self.temp >= 0, "temp must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0: off)"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty is None or self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.repetition_context_size >= 1, "repetition_context_size must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def sampler(self):
        return make_sampler(self.temp, self.top_p, self.min_p, top_k=self.top_k)

    def processors(self):
        return make_logits_processors(
            repetition_penalty=self.repetition_penalty, repetition_context_size=self.repetition_context_size
        )
