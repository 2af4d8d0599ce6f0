"""meshlm: parallel language modelling on one CPU or many GPUs."""

# Registers the model families (their [model] config sections) before any config is read.
from meshlm.model import registry as _registry  # noqa: F401
