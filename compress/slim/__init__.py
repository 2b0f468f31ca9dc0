"""The slim model: its modeling files and configuration file, copied into every export."""

from pathlib import Path

from .configuration_slim import SlimConfig
from .modeling_slim import SlimForCausalLM

__all__ = ["SlimConfig", "SlimForCausalLM", "SOURCE_FILES"]

# Files copied next to the weights so the folder loads with trust_remote_code and nothing else.
SOURCE_FILES = [Path(__file__).with_name(name) for name in ("configuration_slim.py", "modeling_slim.py",
                                                            "probing_slim.py")]
AUTO_MAP = {
    "AutoConfig": "configuration_slim.SlimConfig",
    "AutoModelForCausalLM": "modeling_slim.SlimForCausalLM",
}
