"""Hook specifications of the ``smi`` plugin system (entry-point group ``smi``).

Each hook receives a ``register`` callable; built-in losses and tasks use the very same hooks.
Every factory's keyword arguments are its options, converted to the types it annotates
(``smi_engine.plugins.call_factory``) from ``--loss-option``, ``--selection-option``,
``--sink-option``, ``--scheme-option`` or ``smi task -o``.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("smi")
hookimpl = pluggy.HookimplMarker("smi")


@hookspec
def register_losses(register):
    """Add dense inversion losses: ``register(name, factory)``.

    ``factory(**options)`` returns a callable ``loss(state: LossState)`` giving a scalar tensor
    or a dict of named scalar tensors (see ``smi_engine.inversion.losses`` for the optional extras).
    """


@hookspec
def register_selections(register):
    """Add patch-selection policies: ``register(name, factory)``; ``factory(**options)`` returns
    a policy deciding, at each stop, which patches leave the optimised set and whether they stay
    in the final image (see ``smi_engine.inversion.selection``). Choose one with ``--selection NAME``."""


@hookspec
def register_tasks(register):
    """Add downstream tasks: ``register(name, factory)``; ``factory(**options)`` returns a
    ``Task``, ``run(context) -> dict`` (see ``smi_engine.downstream.tasks``). Run one with
    ``smi task NAME -o KEY=VALUE``."""


@hookspec
def register_event_sinks(register):
    """Add run-event consumers: ``register(name, factory)``; ``factory(run_dir, config, **options)``
    returns a callable ``sink(event: dict)`` (optionally with ``close()``). Enable one with
    ``--sink NAME``, its options with ``--sink-option NAME.KEY=VALUE``."""


@hookspec
def register_quant_schemes(register):
    """Add post-training quantisation schemes: ``register(name, factory)``; ``factory(**options)``
    returns a ``QuantScheme`` (see ``smi_engine.quantization.scheme``), once per job. Choose one
    with ``smi quantize --scheme NAME``, its options with ``--scheme-option NAME.KEY=VALUE``."""


@hookspec
def register_commands(cli):
    """Add commands to the ``smi`` Typer app: ``@cli.command()``."""
