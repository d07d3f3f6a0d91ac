"""Model inversion: the loop (``loop``: ``InversionConfig``, ``Inverter``), its losses and patch
selections (plugin interfaces), the stopping schedule and its cost model, a run in a run
directory (``run``), previews, and the benchmark built on it (``bench``)."""
