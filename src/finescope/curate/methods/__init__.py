"""Curate's selection methods, one module each; the names, what each needs and which module implements it are
declared once in `finescope.registry.SELECTION_METHODS`.

A method module has `score(inputs: SelectionInputs) -> Scored` (curate/scored.py). Methods that need the MODEL
score on every rank (their forwards are sharded) and may add `finish(scored, inputs) -> Scored`, run on rank 0
before the selection is written; the others score on rank 0 only. See docs/extending.md.
"""
