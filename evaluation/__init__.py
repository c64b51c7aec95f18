"""Stage 3: the in-context (nearest-neighbour retrieval) benchmark."""
