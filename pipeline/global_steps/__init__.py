"""Steps that decide over all records at once: dedupe and the geographic split."""
