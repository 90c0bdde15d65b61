"""Measurements and export: the training-step and inference benchmarks (`bench`,
`inference`), the FLOP model (`flops`), the search's overhead (`overhead`) and whether it pays
(`efficiency`), and the deployable export (`export`)."""
