"""How many augmented views of a photo extraction can embed, and what they are (no heavy imports: configs read it).

View 0 is the whole photo, views 1-5 are crops of CROP_SCALE of each side (top-left, top-right, bottom-left,
bottom-right, centre), each resized to the backbone's input. Flips were measured too and added nothing on the
grocery photos; these crops added 7 points (README).
"""

CROP_SCALE = 0.8
MAX_VIEWS = 6
