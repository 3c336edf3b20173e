"""Training settings: the one preset table (model size + training settings) and TrainConfig.

A config is a preset with overrides: `TrainConfig.from_preset("demo", epochs=5)` is
`dataclasses.replace(PRESETS["demo"], epochs=5)`; a TrainConfig(preset=...) with fields left None
takes them from the preset (`resolved()`). No dagster here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from comic_pipeline.schema import TASK_NAMES, PageFeatures

if TYPE_CHECKING:  # model.py imports torch; the Dagster config classes need this module without it
    from comic_pipeline.model import ModelConfig


# --- configuration -----------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Model size and training settings. The fields left None take the preset's value (PRESETS)."""

    preset: str = "demo"  # a name in PRESETS: "tiny", "demo" or "full"
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    dropout: float | None = None
    lr: float | None = None  # peak learning rate
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", after warmup
    min_lr_ratio: float = 0.1
    batch_size: int = 64  # samples per task per step
    strip_batch_size: int | None = None  # pages per step for the strip objective (None = batch_size)
    epochs: int | None = None  # upper bound; early stopping may end sooner
    max_steps: int | None = None  # stop after this many optimizer steps in all (0: untrained)
    loss_weights: dict[str, float] = field(default_factory=dict)  # task or "strip" -> weight (1.0)
    seed: int = 0
    patience: int | None = 3  # epochs without a better val mean accuracy before stopping (0/None: never)
    log_every: int = 50  # steps
    grad_clip: float | None = 1.0  # (0/None: no clipping)
    strip_keep_prob: float = 0.6  # panel-dropout views of the strip objective
    strip_temperature: float = 0.1
    eval_batch_size: int = 512

    def __post_init__(self):
        if self.preset not in PRESET_NAMES:
            raise ValueError(f"unknown model preset {self.preset!r}; known: {', '.join(PRESET_NAMES)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        for name in ("batch_size", "epochs", "log_every", "eval_batch_size", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {value}")
        if (self.lr is not None and self.lr <= 0) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig: lr must be positive and warmup_steps >= 0, got "
                             f"lr={self.lr}, warmup_steps={self.warmup_steps}")
        if self.max_steps is not None and self.max_steps < 0:
            # 0 is allowed: the model at its seeded initialization, a random-weights baseline
            raise ValueError(f"TrainConfig.max_steps must be >= 0 or None, got {self.max_steps}")
        if not 0.0 < self.strip_keep_prob <= 1.0:
            raise ValueError(f"TrainConfig.strip_keep_prob must be in (0, 1], got {self.strip_keep_prob}")
        unknown = set(self.loss_weights) - set(TASK_NAMES) - {"strip"}
        if unknown:
            raise ValueError(f"TrainConfig.loss_weights: unknown keys {sorted(unknown)}; "
                             f"use task names or 'strip'")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        """The preset `name` with `overrides` (None values are ignored: the preset's stands)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESET_NAMES)}")
        return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})

    def resolved(self) -> "TrainConfig":
        """Every None that the preset decides, filled in from PRESETS[preset]."""
        preset = PRESETS.get(self.preset)
        if preset is None or preset is self:
            return self
        return dataclasses.replace(self, **{name: getattr(preset, name) for name in PRESET_DECIDES
                                            if getattr(self, name) is None})

    def learning_rate(self) -> float:
        return float(self.resolved().lr)

    def weight(self, name: str) -> float:
        return float(self.loss_weights.get(name, 1.0))

    def model_config(self, features: PageFeatures) -> ModelConfig:
        """The model for these features: the preset's size fitted to their dim/panels/boxes/modalities."""
        return self.sized_for(dim=features.dim, max_panels=features.max_panels, max_boxes=features.max_boxes,
                              modalities=features.modalities)

    def sized_for(self, *, dim: int, max_panels: int, max_boxes: int, modalities) -> ModelConfig:
        """The model of this config's size for inputs of this shape (e.g. a Stage 3 store's)."""
        from comic_pipeline.model import ModelConfig

        sizes = self.resolved()
        return ModelConfig(dim=dim, max_panels=max_panels, max_boxes=max_boxes, modalities=tuple(sorted(modalities)),
                           d_model=sizes.d_model, n_layers=sizes.n_layers, n_heads=sizes.n_heads,
                           dropout=sizes.dropout)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


PRESET_NAMES = ("tiny", "demo", "full")
PRESET_DECIDES = ("d_model", "n_layers", "n_heads", "dropout", "lr", "epochs")
# The one table of named sizes and their training settings. Small models take (and need) larger
# steps; the demo preset trains on the demo corpus in ~3 min on two CPU cores.
PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig("tiny", d_model=32, n_layers=2, n_heads=2, dropout=0.0, lr=3e-3, epochs=15),
    "demo": TrainConfig("demo", d_model=96, n_layers=2, n_heads=4, dropout=0.0, lr=1e-3, epochs=3),
    # the default size for real use (DESIGN §5)
    "full": TrainConfig("full", d_model=512, n_layers=6, n_heads=8, dropout=0.1, lr=3e-4, epochs=10),
}
