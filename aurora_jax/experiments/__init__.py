"""Research experiments built on the library: objectives.py asks whether rejected proposals
help the draft learn (`scripts/exp_objectives.py`)."""
