"""Plumbing of the layer loop, apart from the maths: where dense weights come from (`source`),
devices and copies (`device`), forward hooks and the calibration context (`hooks`), and the
host-side activation stream that runs one decoder layer at a time (`stream`)."""
