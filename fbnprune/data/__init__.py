"""Task data: offline corpora (``corpora``), lm-eval tasks as sources (``lmeval``), and the
disjoint calibration / held-out / healing documents and prompts of a task (``tasks``)."""
