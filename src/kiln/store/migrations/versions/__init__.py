"""The store's schema revisions, oldest first (``NNNN_name.py``, each naming the one before)."""
