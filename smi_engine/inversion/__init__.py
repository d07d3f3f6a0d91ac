"""Model inversion: the loop (``loop``: ``InversionConfig``, ``Inverter``), its losses and patch
selections (plugin interfaces), the stopping schedule and its cost model, a run in a run
directory (``run``), previews, and the jobs built on it (``bench``, ``demo``)."""
