"""meshlm: parallel language modelling on one CPU or many GPUs.

    import meshlm
    lm = meshlm.LanguageModel("tiny-cpu", steps=100)
    lm.fit("python-stdlib", workers=2)

The Python API's names (LanguageModel, load, TextClassifier, Tagger, Layout, History,
Callback, WorkerError) are imported on first use, so `import meshlm` stays light.
"""

# Registers the model families (their [model] config sections) before any config is read.
from meshlm.model import registry as _registry  # noqa: F401

_API_NAMES = ("Callback", "History", "LanguageModel", "Layout", "Tagger", "TextClassifier", "WorkerError", "load")
__all__ = list(_API_NAMES)


def __getattr__(name: str):
    if name in _API_NAMES:
        from meshlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'meshlm' has no attribute '{name}'")
