"""The errors meshlm reports to a user, and the exit code each one means.

    ConfigError   a user error found before work (a key, a layout, a path, the data): exit 2
    RunError      a failure during work (a full disk, a lost worker, training that diverged),
                  always with a message that says what is kept and what to do next: exit 1
    Terminated    SIGTERM, raised in the main thread so that cleanup runs: exit 143
                  (a KeyboardInterrupt, so code that cleans up after Ctrl-C does so here too;
                  Ctrl-C itself is Python's KeyboardInterrupt: exit 130)

Every message is one paragraph naming the path or key and the fix; the command line prints it
without a traceback. They live at the bottom of the layers so that any module can raise them
(meshlm.config re-exports ConfigError, where most code imports it from).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: what is wrong and how to fix it."""


class RunError(Exception):
    """A failure during work, phrased for the user: what happened, what is kept, what to do."""


class DiskFullError(RunError):
    """Not enough free space for a file meshlm must write (found before or during the write)."""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (raised by the handler the command line installs)."""


# Set on the copy of an error that ranks other than 0 raise when every rank raises it alike
# (rank 0 prints the message; the command line does not print it again on the others).
REPORTED_BY_RANK0 = "reported_by_rank0"

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
