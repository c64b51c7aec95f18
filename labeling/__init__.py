"""Stage 1: pseudo-label generation (DiffCut segments, pseudo-classes, pairs)."""
