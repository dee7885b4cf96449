"""dspref: DeepSpeed-native preference alignment (BCO, CPO, KTO, reward modeling).

Importing the package is cheap: torch, transformers and deepspeed are imported by the
modules that need them, never here.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
