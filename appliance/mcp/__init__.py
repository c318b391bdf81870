"""The MCP gateway: the appliance's capabilities as Model Context Protocol tools at /mcp."""
