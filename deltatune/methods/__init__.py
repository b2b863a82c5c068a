"""Adapter methods, one file each; the lines below register them (``deltatune.adapters.method``).

A new method is a new file here (its config dataclass, its delta, a ``register_method`` call) and
one import line below; see docs/architecture.md.
"""

from deltatune.adapters.method import method_for, method_named, method_names, register_method
from deltatune.methods.lora import LORA, LoraConfig  # registers "lora"
from deltatune.methods.ia3 import IA3, IA3Config  # registers "ia3"
from deltatune.methods.loha import LOHA, LoHaConfig  # registers "loha"
from deltatune.methods.lokr import LOKR, LoKrConfig  # registers "lokr"
from deltatune.methods.bottleneck import BOTTLENECK, BottleneckConfig  # registers "bottleneck"
from deltatune.methods.pattern import PATTERN, PatternConfig  # registers "pattern"
from deltatune.methods.prompt_tuning import PROMPT_TUNING, PromptTuningConfig  # registers "prompt_tuning"
from deltatune.methods.p_tuning import P_TUNING, PTuningConfig  # registers "p_tuning"
from deltatune.methods.prefix_tuning import PREFIX_TUNING, PrefixTuningConfig  # registers "prefix_tuning"
from deltatune.methods.block_expansion import BLOCK_EXPANSION, BlockExpansionConfig  # registers "block_expansion"

__all__ = ["LoraConfig", "LORA", "IA3Config", "IA3", "LoHaConfig", "LOHA", "LoKrConfig", "LOKR", "BottleneckConfig", "BOTTLENECK", "PatternConfig", "PATTERN", "PromptTuningConfig", "PROMPT_TUNING",
           "PTuningConfig", "P_TUNING", "PrefixTuningConfig", "PREFIX_TUNING", "BlockExpansionConfig", "BLOCK_EXPANSION",
           "register_method", "method_named", "method_for", "method_names", "config_class"]


def config_class(name: str) -> type:
    """The config dataclass of the method registered as ``name`` (KeyError naming the known ones)."""
    return method_named(name).config
