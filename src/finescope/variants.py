"""The experiment matrix: every variant `finescope run` can produce (a row of the paper's tables) and its recipe.

This table is the one definition of the variants: `PipelineConfig.variants` is validated against it, the
pipeline plans each variant's chain of stages from it, and the report labels rows with it. Pure data, no imports
from the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VariantSpec:
    """How one row of the results table is produced."""

    label: str
    """Row label in the results table."""
    data: str | None
    """Curation the data comes from: sae | sae:<selector> | embedding | random | full; None = no data."""
    prune: str | None
    """Calibration of pruning: "data" (the variant's data), "generic", or None (no pruning)."""
    recovery: str | None
    """tgd (teacher rewrites) | kd (logit distillation: recover.kd_*, with or without rewrites) | sft | None."""
    description: str


VARIANTS: dict[str, VariantSpec] = {
    "dense": VariantSpec("dense", None, None, None, "the dense model, untouched (reference row)"),
    "dense_curated": VariantSpec(
        "dense + FineScope data",
        "sae",
        None,
        "tgd",
        "no pruning; LoRA with TGD on the curated set (the paper's unpruned FineScope row)",
    ),
    "pruned": VariantSpec(
        "pruned, no recovery", "sae", "data", None, "pruned with curated calibration, no fine-tuning"
    ),
    "pruned_generic": VariantSpec(
        "pruned (generic calib.), no recovery",
        "sae",
        "generic",
        None,
        "pruned with generic news/wiki calibration, no fine-tuning",
    ),
    "pruned_tgd": VariantSpec(
        "FineScope (pruned + TGD)",
        "sae",
        "data",
        "tgd",
        "curated calibration, TGD recovery on the curated set: the method",
    ),
    "pruned_kd": VariantSpec(
        "FineScope + KD",
        "sae",
        "data",
        "kd",
        "curated data and calibration, recovered by logit distillation from the dense teacher (recover.kd_*)",
    ),
    "pruned_sft": VariantSpec(
        "pruned + SFT (w/o TGD)", "sae", "data", "sft", "as FineScope but plain SFT on the original responses"
    ),
    "pruned_random": VariantSpec(
        "pruned + Random", "random", "data", "tgd", "random subset of the same size for calibration and recovery"
    ),
    "random_kd": VariantSpec(
        "pruned + Random + KD",
        "random",
        "data",
        "kd",
        "random subset of the same size, recovered like FineScope + KD (does curation still matter?)",
    ),
    "pruned_full": VariantSpec(
        "pruned + Full pool", "full", "data", "tgd", "the whole (sampled) pool for calibration and recovery"
    ),
    "generic_tgd": VariantSpec(
        "pruned (generic calib.) + TGD",
        "sae",
        "generic",
        "tgd",
        "generic calibration, TGD recovery on the curated set (Table 4's BookCorpus column)",
    ),
    "embedding_tgd": VariantSpec(
        "embedding-kNN selection + TGD",
        "embedding",
        "data",
        "tgd",
        "sentence-embedding kNN selection instead of SAE codes (Table 5)",
    ),
    **{
        f"selector_{s}": VariantSpec(
            f"selector {s} + TGD",
            f"sae:{s}",
            "data",
            "tgd",
            f"SAE selection reading coordinates chosen by the {s} selector",
        )
        for s in ("gradient", "magnitude", "variance", "pca", "random")
    },
}
