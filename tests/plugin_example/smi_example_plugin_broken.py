"""A plugin that fails to import, to show smi names it and carries on."""

raise ImportError("this plugin needs a package that is not installed")
