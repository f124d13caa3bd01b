"""Publishing a run: the export folder (``export``), its model card (``card``), the Hub
upload (``hub``) and the extra formats (``formats``: int8, ONNX)."""
