"""Pure projectors and detectors, and the projection worker: a thin loop around them."""
