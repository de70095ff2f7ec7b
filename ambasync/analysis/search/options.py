"""The search's choices, in a module without numpy: the command line's parser (built in the run's
event-loop process, which never imports numpy) and the statistics read the same tuples."""

METHODS = ("pearson", "spearman")  # correlation: Pearson, or Spearman (each experiment ranked over its voxels)

__all__ = ["METHODS"]
