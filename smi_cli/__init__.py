"""The ``smi`` command line: Typer commands over the ``smi_engine`` library."""
