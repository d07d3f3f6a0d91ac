"""Built-in plugins: registered through the same ``smi`` hooks as third-party ones."""
