"""`sft-ray eval`: base against tuned on held-out and retention sets, generated on a Ray Data pool of model replicas."""
