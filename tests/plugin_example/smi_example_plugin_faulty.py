"""Plugins whose parts fail, to show that smi names the plugin and keeps working: one whose
command registration raises, one whose loss and task raise when they run."""

from smi_engine import hookimpl


class CommandsPlugin:
    @hookimpl
    def register_commands(self, cli):
        raise RuntimeError("the command registration exploded")


def exploding_loss():
    def loss(state):
        raise RuntimeError("the loss exploded")

    return loss


class ExplodingTask:
    description = "a task that always fails"

    def run(self, context):
        raise RuntimeError("the task exploded")


class RuntimePlugin:
    @hookimpl
    def register_losses(self, register):
        register("exploding", exploding_loss)

    @hookimpl
    def register_tasks(self, register):
        register("exploding", ExplodingTask)


commands = CommandsPlugin()
runtime = RuntimePlugin()
