"""MAT training: the controller, selection policies, the frozen-slice optimizer, FLOP accounting, head pruning."""
