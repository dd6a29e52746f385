"""Ray executor: placement group, one worker actor per TP rank, the per-step broadcast."""
