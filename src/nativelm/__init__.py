"""nativelm: natively lightweight language models, from corpus to a fleet of edge boards."""

__version__ = "0.1.0"
