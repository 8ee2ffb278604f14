"""Many virtual nodes on one machine (or a Ray cluster) through Flower's simulation engine."""
