"""The Textual dashboard: one app for live runs (``smi invert --tui``) and run directories
(``smi watch``), fed by the same event stream."""
