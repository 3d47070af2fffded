"""Experiments: the paper reproduction and the diagnosis studies behind DESIGN's choices.

Not installed with Ferry (run from the repository root: `python -m experiments.NAME`);
each writes where its report in bench/results/ reads. The tools users run stay in
`ferry bench` (bench/)."""
