"""The slim model: one modeling file and one configuration file, copied into every export."""

from pathlib import Path

from .configuration_slim import SlimConfig
from .modeling_slim import SlimForCausalLM

__all__ = ["SlimConfig", "SlimForCausalLM", "SOURCE_FILES"]

# Files copied next to the weights so the folder loads with trust_remote_code and nothing else.
SOURCE_FILES = [Path(__file__).with_name("configuration_slim.py"), Path(__file__).with_name("modeling_slim.py")]
AUTO_MAP = {
    "AutoConfig": "configuration_slim.SlimConfig",
    "AutoModelForCausalLM": "modeling_slim.SlimForCausalLM",
}
