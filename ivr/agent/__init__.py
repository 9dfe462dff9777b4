"""What the agent is: its prompts and hold lines, the LLM call, its tools, speakable text."""
