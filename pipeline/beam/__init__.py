"""The Beam side: the one stage wrapper, the build's graph, the writer's transform, the run."""
