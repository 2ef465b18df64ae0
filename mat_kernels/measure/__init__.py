"""λmax measurement: the layer entry points (layer), solvers, weight blocks, module discovery and its layouts, the
capture of a training backward, the model level."""
