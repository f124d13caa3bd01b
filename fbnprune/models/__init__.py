"""Models: names to loaded models (``loading``), the per-family table of MLP weights
(``adapters``) and owned hooks on every MLP (``hooks``)."""
