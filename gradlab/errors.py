"""Typed errors a user can cause. The CLI turns each into one line and exit code 2."""


class GradlabError(Exception):
    """Base of every error a user can cause; its message is one line, ready to print."""


class ConfigError(GradlabError):
    """A config file, key or value is wrong: the message names the file, the key and what is allowed.

    `key` is the dotted config key at fault, where the raiser knows it (an experiment's
    validate() does; config.load then names the file and whether the key came from the CLI).
    """

    def __init__(self, message: str = "", key: str | None = None):
        super().__init__(message)
        self.key = key


class ExperimentError(GradlabError):
    """An experiment name is unknown or an experiment cannot be built from the config."""


class ResultsError(GradlabError):
    """A run folder or results file is unwritable, missing, corrupt or from another version."""


class ArgumentError(GradlabError, TypeError):
    """A Python API call got an argument of the wrong type (the message says what it takes)."""


class FigureError(ResultsError):
    """An experiment's figure cannot be drawn from these results (a sweep narrowed by the user)."""


class SweepTooLarge(GradlabError):
    """A sweep's compiled program needs more memory than a device has."""


class SetupError(GradlabError):
    """The runtime cannot be set up as asked: a device count, a conflicting XLA flag, a cluster."""


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM); like Ctrl-C, a rerun resumes from the last checkpoint."""


class LapackOnCpuWarning(UserWarning):
    """A sweep compiled for the CPU calls LAPACK (QR, SVD, eigh, ...), which can hang there.

    jaxlib 0.10's batched LAPACK kernels split their batch over XLA:CPU's thread pool and wait for
    the parts; two running at once on a small pool (an LSTM's four recurrent kernels from flax's
    orthogonal init, vmapped over seeds) can each hold a thread the other needs, and never return.
    """
