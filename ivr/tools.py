"""`from ivr.tools import tool`: what a deployer's tool modules import (ivr/agent/tools.py).

The names are the registry's own objects, not copies: a tool registered
through this module is the one both modes offer the model.
"""

from .agent.tools import (
    MAX_RUNNING_PER_CALL,
    Tool,
    ToolAbandoned,
    ToolCall,
    ToolRegistry,
    end_call,
    load_modules,
    registry,
    tool,
    transfer_call,
)

__all__ = [
    "MAX_RUNNING_PER_CALL",
    "Tool",
    "ToolAbandoned",
    "ToolCall",
    "ToolRegistry",
    "end_call",
    "load_modules",
    "registry",
    "tool",
    "transfer_call",
]
