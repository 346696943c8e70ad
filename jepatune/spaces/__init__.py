"""Named search spaces over `TrainConfig` knobs and their constraints (to come with the search)."""
