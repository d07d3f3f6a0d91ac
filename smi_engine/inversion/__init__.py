"""Model inversion: its settings (``config``: ``InversionConfig``), the loop (``loop``: ``Inverter``;
``batch``: one batch of trajectories, ``BatchRun``), its losses and patch
selections (plugin interfaces), the stopping schedule and its cost model, a run in a run
directory (``run``), previews, and the benchmark built on it (``bench``)."""
