"""Per-record stages, in pipeline order: read, validate, geocode, image, meta, clue, dialogue (+ their helpers)."""
