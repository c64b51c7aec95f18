"""The whole of DIP end to end on built-in synthetic scenes: label -> train -> evaluate -> report."""
