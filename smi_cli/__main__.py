"""``python -m smi_cli`` (and ``torchrun -m smi_cli``) runs the ``smi`` command."""

from smi_cli.app import main

main()
