"""Per-record stages, in pipeline order: read, validate, geocode, image, exclude (with --exclude), meta, clue,
dialogue (+ their helpers)."""
