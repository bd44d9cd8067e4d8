"""Built-in tools for tool-calling environments: plain, typed, documented Python functions."""
