"""Measurements and export: the training-step and inference benchmarks (`bench`,
`inference`), the FLOP model (`flops`), the search's overhead (`overhead`), whether it pays
(`efficiency`), whether a ranking transfers (`transfer`), what a warm start buys (`warmgain`),
what those three share (`children`: a child search, a Ctrl-C), and the deployable export
(`export`)."""
