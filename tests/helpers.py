"""Small pieces shared by several test modules."""

import textwrap

# Put at the top of a subprocess script to simulate a user who has not installed latentheat:
# any import of hf_models / trainers fails, and the script checks that it does.
BLOCK_LATENTHEAT = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):  # simulate a user without latentheat installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hf_models", "trainers"):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, _Block())
    for _name in [m for m in sys.modules if m.split(".")[0] in ("hf_models", "trainers")]:
        del sys.modules[_name]
    try:
        import hf_models  # noqa: F401
        raise SystemExit("hf_models importable")
    except ModuleNotFoundError:
        pass
    """
)
