"""Data plumbing shared by the algorithms: model calls on dataset items, one layer's inputs."""
