"""How many augmented views of a photo extraction can embed, and what they are (no heavy imports: configs read it).

View 0 is the whole photo, views 1-5 are crops of a scale of each side (CROP_SCALE unless extraction's
crop_scale says otherwise: top-left, top-right, bottom-left, bottom-right, centre), each resized to the
backbone's input. Flips were measured too and added nothing on the grocery photos; crops of 80% added 7 points,
and crops of 60% a further 4 to 6 (docs/reports/model-quality.md). The scale is recorded in the shards' manifest; shards
from before it was recorded used 80%.
"""

CROP_SCALE = 0.6
LEGACY_CROP_SCALE = 0.8  # shards (and runs) whose manifest records no crop scale
MAX_VIEWS = 6


def recorded_crop_scale(record: dict) -> float:
    """The crop scale of a manifest's settings or image-encoder record: extraction writes it only where it differs
    from the one folders used before it was recorded."""
    return float(record.get("crop_scale", LEGACY_CROP_SCALE))
